"""An epoch that fails midway changes nothing, through a real server.

Each test builds two models with the same parameters, options and history: one runs an epoch that
fails after its first batch would have trained (a bad class label, an embedding index out of range,
a bce input torch refuses only when it sees it), the other never does. The failed call must leave
every handle as it was (`unchanged`: parameters, gradients, batchnorm statistics, optimizer state,
the data and their order), and the next successful epoch of both models must agree bit for bit
(weights, metrics, data order), which it can only do if the shuffle generator is untouched too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from weightavg import Client, InvalidArgumentError

N, W = 20, 5
"""Four batches of five: row 7 lies in the second batch, away from the last one that run probes."""
BN_NET = ["sequential", ["linear", "a", 3, 8], ["batchnorm1d", "b", 8], ["relu", "r"], ["linear", "d", 8, 4]]
OPTIMIZERS = [("sgd", 0.1, 0.9), ("adam", 0.01)]
METRICS = "loss,batchloss,predict,output"


def features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((N, 3), dtype=np.float32)


def labels(classes: int = 4) -> np.ndarray:
    return np.arange(N, dtype=np.int64) % classes


def twins(c: Client, spec: Any, loss: Any, optimizer: tuple[Any, ...], shuffle: bool) -> tuple[Any, Any]:
    """Two models over modules with the same parameters and the same train options."""
    first = c.module(spec)
    second = c.module(spec)
    for name, value in c.dict(c.parms(first)).items():
        c.parm(second, name, value)
    models = []
    for q in (first, second):
        m = c.model(q, c.loss(*loss), c.opt(optimizer[0], q, *optimizer[1:]))
        c.train(m, batchsize=W, shuffle=shuffle, seed=3, metrics=METRICS)
        models.append(m)
    return models[0], models[1]


def state(c: Client, m: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in {**c.dict(c.parms(m)), **c.dict(c.buffers(m))}.items()}


def assert_same_epoch(c: Client, failed: Any, never: Any, x: np.ndarray, y: np.ndarray) -> None:
    """One more epoch on each, both with x and y loaded afresh: the same metrics, parameters,
    buffers and data order, bit for bit."""
    got, expected = c.run(failed, x, y), c.run(never, x, y)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ours, theirs = state(c, failed), state(c, never)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    np.testing.assert_array_equal(c.tensor(c.input(failed)), c.tensor(c.input(never)))


def fails_and_changes_nothing(
    c: Client, unchanged: Any, twins_: tuple[Any, Any], good: tuple[Any, Any], bad: tuple[Any, Any], message: str
) -> None:
    """Both twins train an epoch on `good` (gradients, optimizer state, statistics, a drawn
    permutation); the first then fails an epoch on `bad` with `message`, changing nothing; then
    both train on `good` again and must agree bit for bit."""
    failed, never = twins_
    for m in (failed, never):
        c.train(m, *good)
        c.run(m)
    c.train(failed, *bad)
    with unchanged(), pytest.raises(InvalidArgumentError, match=message):
        c.run(failed)
    assert_same_epoch(c, failed, never, *good)


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_a_bad_label_in_a_middle_batch_changes_nothing(
    client: Client, unchanged: Any, optimizer: tuple[Any, ...], shuffle: bool
) -> None:
    x, y = features(), labels()
    bad = y.copy()
    bad[7] = 9
    fails_and_changes_nothing(client, unchanged, twins(client, BN_NET, ("ce",), optimizer, shuffle), (x, y), (x, bad),
                              r"run: target 9 of sample 7 is out of bounds: the output has 4 classes")


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_an_embedding_index_out_of_range_in_a_middle_batch_changes_nothing(
    client: Client, unchanged: Any, shuffle: bool
) -> None:
    net = ["sequential", ["embed", "e", 10, 4], ["linear", "d", 4, 3]]
    x, y = np.arange(N, dtype=np.int64) % 10, labels(3)
    bad = x.copy()
    bad[7] = 12
    fails_and_changes_nothing(client, unchanged, twins(client, net, ("ce",), ("sgd", 0.1, 0.9), shuffle), (x, y),
                              (bad, y), r"run: input 12 of sample 7 is out of range for the embedding's 10 rows")


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_a_bad_index_in_the_probed_last_batch_is_named_by_its_sample(
    client: Client, unchanged: Any, shuffle: bool
) -> None:
    """The last batch goes through the module and loss before training (the probe): a bad label or
    embedding input there got torch's "Target 9 is out of bounds." (which names no sample and, on
    CUDA, is a device-side assert that ends the process's use of the GPU) instead of the message
    docs/models.md quotes, which the indices are now checked for before the probe's loss and
    forward see them. With one batch of data, every bad index was in it."""
    bad_label = labels()
    bad_label[N - 1] = 9
    fails_and_changes_nothing(client, unchanged, twins(client, BN_NET, ("ce",), OPTIMIZERS[0], shuffle),
                              (features(), labels()), (features(), bad_label),
                              rf"run: target 9 of sample {N - 1} is out of bounds: the output has 4 classes")
    net = ["sequential", ["embed", "e", 10, 4], ["linear", "d", 4, 3]]
    x = np.arange(N, dtype=np.int64) % 10
    bad_input = x.copy()
    bad_input[N - 1] = 12
    fails_and_changes_nothing(client, unchanged, twins(client, net, ("ce",), ("sgd", 0.1, 0.9), shuffle), (x, labels(3)),
                              (bad_input, labels(3)),
                              rf"run: input 12 of sample {N - 1} is out of range for the embedding's 10 rows")


def test_a_bad_index_in_a_row_the_shuffled_epoch_drops_does_not_refuse_it(client: Client) -> None:
    """With shuffle and droplast the epoch leaves out the rows its permutation puts last; the probe
    read the last rows of the data as loaded instead of the epoch's last batch, so an embedding index
    out of range in a row the epoch never trains refused the epoch with torch's "index out of range in
    self" (on CUDA, a device-side assert). The probe now runs the epoch's own last batch."""
    n, w = 22, 5  # four batches of five train; two rows are dropped
    for seed in range(100):  # the server shuffles with randperm(n) from a generator seeded by `seed`
        dropped = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[4 * w:].tolist()
        loaded_last = [r for r in dropped if 3 * w <= r < 4 * w]  # where the old probe read
        if loaded_last:
            break
    net = ["sequential", ["embed", "e", 10, 4], ["linear", "d", 4, 3]]
    x = np.arange(n, dtype=np.int64) % 10
    x[loaded_last[0]] = 12
    q = client.module(net)
    m = client.model(q, client.loss("ce"), client.opt("sgd", q, 0.1))
    client.train(m, batchsize=w, shuffle=True, droplast=True, seed=seed)
    client.train(m, x, np.arange(n, dtype=np.int64) % 3)
    assert np.isfinite(client.run(m))


def test_an_index_out_of_range_in_the_last_batch_is_refused_before_the_probe_looks_it_up(
    client: Client, unchanged: Any
) -> None:
    """run probes the last batch (forward and loss) before checking every index of the epoch, so a
    bad label or embedding index there reached torch's own check first: on the CPU an error without
    the sample, on CUDA a device-side assert that ends the server's use of the GPU (found by
    review). The probe checks its batch first."""
    c = client
    net = ["sequential", ["embed", "e", 10, 4], ["linear", "d", 4, 3]]
    q = c.module(net)
    m = c.model(c.addref(q), c.loss("ce"), c.opt("sgd", q, 0.1))
    c.train(m, batchsize=W)
    x, y = np.arange(N, dtype=np.int64) % 10, labels(3)
    bad_x, bad_y = x.copy(), y.copy()
    bad_x[N - 2], bad_y[N - 1] = 12, 3
    c.train(m, bad_x, y)
    with unchanged(), pytest.raises(
        InvalidArgumentError, match=rf"^INVALID_ARGUMENT: run: input 12 of sample {N - 2} is out of range for the embedding"
    ):
        c.run(m)
    c.train(m, x, bad_y)
    with unchanged(), pytest.raises(
        InvalidArgumentError, match=rf"^INVALID_ARGUMENT: run: target 3 of sample {N - 1} is out of bounds: the output has 3"
    ):
        c.run(m)


def test_a_probe_that_renormalises_an_embedding_is_put_back(client: Client, unchanged: Any) -> None:
    """An embedding with max_norm renormalises the rows it reads, even without gradients: the
    last-batch probe ran outside the rollback, so a refused epoch still changed them (found by
    review)."""
    net = ["sequential", ["embed", "e", 10, 4, {"maxnorm": 0.5}], ["flatten"], ["linear", "d", 8, 3]]
    x, y = (np.arange(2 * N, dtype=np.int64) % 5).reshape(N, 2), labels(3)  # rows 0-4: renormalised by the first epoch
    far, bad = x.copy(), y.copy()
    far[N - W:] += 5  # the last batch, which the probe reads, reads rows 5-9: never renormalised yet
    bad[N - 1] = 7  # and is refused after the probe ran
    fails_and_changes_nothing(client, unchanged, twins(client, net, ("ce",), ("sgd", 0.5), False), (x, y), (far, bad),
                              r"run: [Tt]arget 7 .*out of bounds")


def test_failed_passes_put_back_the_rows_a_max_norm_embedding_renormalised(client: Client, unchanged: Any) -> None:
    """An embedding with max_norm renormalises the rows it reads in eval mode and without gradients
    too. testrun, evaluate, forward and batchnorm(m) that failed after a batch had read some left
    those rows renormalised though nothing was to change (found by review); now put back."""
    c = client
    net = ["sequential", ["embed", "e", 10, 4, {"maxnorm": 0.5}], ["flatten"], ["batchnorm1d", "b", 8], ["linear", "d", 8, 3]]
    q = c.module(net)
    m = c.model(c.addref(q), c.loss("ce"), c.opt("sgd", q, 0.1))
    x, y = (np.arange(2 * N, dtype=np.int64) % 10).reshape(N, 2), labels(3)
    bad = y.copy()
    bad[12] = 7  # the third test batch: the first two have read rows 0-9 by then
    c.train(m, batchsize=W)
    c.test(m, batchsize=W)
    c.test(m, x, bad)
    c.train(m, np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]]))  # a last batch of one: batchnorm fails there
    wrong = c.module(["sequential", ["embed", "e", 10, 4, {"maxnorm": 0.5}], ["flatten"], ["linear", "d", 5, 3]])
    for name, call in {
        "testrun": lambda: c.testrun(m), "batchnorm": lambda: c.batchnorm(m),
        "eforward": lambda: c.eforward(wrong, x), "forward": lambda: c.forward(wrong, x),
    }.items():
        with unchanged(), pytest.raises(InvalidArgumentError, match=rf"^INVALID_ARGUMENT: {name}"):
            call()
    m2 = c.model(c.addref(wrong), c.loss("ce"), c.opt("sgd", wrong))
    c.test(m2, batchsize=W)
    with unchanged(), pytest.raises(InvalidArgumentError, match="^INVALID_ARGUMENT: evaluate"):
        c.evaluate(m2, x)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_an_error_torch_raises_midway_is_rolled_back(client: Client, unchanged: Any, shuffle: bool) -> None:
    """bce takes probabilities: a linear output above 1 is refused only when a batch makes one (before
    the loss, since on CUDA torch's own check is a device-side assert), which no check before the
    epoch can foresee. The epoch's second batch makes one (rows 5-9, or shuffled the rows the
    permutation puts there); its last batch, which run probes, does not."""
    c = client
    failed, never = twins(c, ["linear", 1, 1], ("bce",), ("sgd", 0.1, 0.9), shuffle)
    x = np.linspace(0, 1, N, dtype=np.float32).reshape(N, 1)
    y = (np.arange(N) % 2).astype(np.float32).reshape(N, 1)
    for m in (failed, never):
        c.parm(m, "weight", np.full((1, 1), 0.1, np.float32))
        c.parm(m, "bias", np.full(1, 0.5, np.float32))
        c.train(m, x, y)
        c.run(m)
    rows = list(range(W, 2 * W))
    if shuffle:  # the second epoch's permutation from the generator `twins` seeds with 3, as the server draws it
        generator = torch.Generator().manual_seed(3)
        torch.randperm(N, generator=generator)
        rows = torch.randperm(N, generator=generator)[W:2 * W].tolist()
    far = x.copy()
    far[rows] = 100.0
    c.train(failed, far, y)
    with unchanged(), pytest.raises(
        InvalidArgumentError, match=r"run \(batch 2 of 4\): the bce loss takes probabilities in \[0, 1\], and the "
        r"output holds -?[\d.]+: end the module with a sigmoid, or use the bcelogits loss"
    ):
        c.run(failed)
    assert_same_epoch(c, failed, never, x, y)


def test_a_failed_epoch_leaves_the_data_at_their_batch(client: Client, unchanged: Any) -> None:
    c = client
    q = c.module(["linear", 3, 4])
    m = c.model(q, c.loss("ce"), c.opt("sgd", q, 0.5))
    bad = labels()
    bad[7] = 9
    c.train(m, features(), bad)
    c.train(m, batchsize=W)
    xi = c.input(m)
    assert c.batch(m) and c.batch(m)  # the data stand at their second batch
    with unchanged(), pytest.raises(InvalidArgumentError, match="out of bounds"):
        c.run(m)
    assert c.size(xi) == (W, 3)
    np.testing.assert_array_equal(c.tensor(xi), features()[W:2 * W])


def test_labels_the_loss_ignores_and_rows_droplast_drops_are_not_refused(client: Client) -> None:
    """A label equal to the loss's ignore index trains (it adds nothing to the loss), and a bad label
    in the rows an unshuffled droplast epoch never reaches is never seen, as before."""
    c = client
    q = c.module(["linear", 3, 4])
    m = c.model(q, c.loss("ce", -1), c.opt("sgd", q, 0.5))
    ignored = labels()
    ignored[7] = -1
    c.train(m, batchsize=W)
    assert isinstance(c.run(m, features(), ignored), float)
    ignored[7] = -2
    c.train(m, features(), ignored)
    with pytest.raises(InvalidArgumentError, match="target -2 of sample 7 is out of bounds.*ignores -1"):
        c.run(m)
    tail = labels()[:N - 2]
    tail[-1] = 9  # sample 17: in the last batch, which droplast leaves out of 18 rows in batches of 5
    c.train(m, droplast=True)
    assert isinstance(c.run(m, features()[:N - 2], tail), float)


@pytest.mark.parametrize("bad_target", [2.0, -1.0])
def test_a_bce_target_outside_0_1_in_a_middle_batch_is_refused_before_the_loss(
    client: Client, unchanged: Any, bad_target: float
) -> None:
    """torch checks bce targets inside the loss: on the CPU with an error, but on CUDA with a
    device-side assert that ends the server's use of the GPU. So they are checked before each
    batch's loss (found by review): row 7, in the second batch, holds a label bce cannot take; a
    NaN there is refused too (`unchanged` cannot compare data holding NaN: the epoch after shows
    that nothing changed)."""
    c = client
    net = ["sequential", ["linear", "a", 3, 1], ["sigmoid", "s"]]
    failed, never = twins(c, net, ("bce",), ("adam", 0.01), True)
    x, y = features(), (np.arange(N) % 2).astype(np.float32).reshape(N, 1)
    bad = y.copy()
    bad[7] = bad_target
    fails_and_changes_nothing(
        c, unchanged, (failed, never), (x, y), (x, bad),
        rf"run \(batch \d of 4\): the bce loss takes probabilities in \[0, 1\], and the targets hold {bad_target}: "
        "send labels",
    )
    bad[7] = np.nan
    c.train(failed, x, bad)
    with pytest.raises(InvalidArgumentError, match=r"run \(batch \d of 4\): .* targets hold nan"):
        c.run(failed)
    assert_same_epoch(c, failed, never, x, y)
    bad[7] = bad_target
    c.test(never, x, bad)
    with unchanged(), pytest.raises(InvalidArgumentError, match=rf"testrun \(batch 1 of 1\): .* targets hold {bad_target}"):
        c.testrun(never)
