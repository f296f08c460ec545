"""Averages large enough for the server's native CPU kernels (domain/lerp.py, weighted_sum.py),
through a real server, each equal to torch's own operations on the same numbers in this process,
bit for bit: a running average and an EMA of a float32 module, an EMA of a bfloat16 module kept in
float32 (torch's `lerp_`), and a weighted average of five dictionaries (torch's `mul`, `add_`,
`div_`). They run whichever kernels the server has (the start-up log says which), so they hold
with them and without."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightavg import Client
from weightavg_server.domain import lerp, native, weighted_sum

NET = ["sequential", ["linear", 512, 384], ["linear", 384, 256]]
"""Two weights of 196608 and 98304 elements, and two biases, in one flat buffer: enough for the
kernel to split them over threads."""
assert 512 * 384 + 384 * 256 >= 2 * lerp.ELEMENTS_PER_THREAD


def params(c: Client, m: object) -> dict[str, torch.Tensor]:
    d = c.copyparms(m)
    values = {name: _tensor(np.array(value)) for name, value in c.dict(d).items() if name != ".n"}
    c.free(d)
    return values


def _tensor(a: np.ndarray) -> torch.Tensor:
    """numpy to torch; a bfloat16 array (ml_dtypes) by its bits."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def scramble(c: Client, m: object, seed: int) -> None:
    """New parameters for m, drawn here so the expectation can be computed from them."""
    g = torch.Generator().manual_seed(seed)
    for name, value in params(c, m).items():
        c.parm(m, name, (torch.randn(value.shape, generator=g, dtype=torch.float64) * 2 + 0.5).numpy().astype(np.float32))


def test_a_large_running_average_is_torchs_lerp_bit_for_bit(client: Client) -> None:
    m = client.module(NET)
    d = client.copyparms(m)
    expected = params(client, m)
    for n in range(2, 5):
        scramble(client, m, seed=n)
        for name, value in params(client, m).items():
            expected[name].lerp_(value, 1.0 / n)
        assert client.avgparms(m, d) == n
    got = client.dict(d)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name].view(np.int32), value.numpy().view(np.int32), err_msg=name)


def test_a_running_average_of_uploaded_dictionaries_is_torchs_lerp_bit_for_bit(client: Client) -> None:
    """Uploads are not flat (a tensor each): the kernel takes all their pairs, of every size, in one
    call, and a float64 entry in another."""
    g = torch.Generator().manual_seed(3)
    shapes = {"w1": (512, 384), "b1": (384,), "w2": (384, 256), "tiny": (3,), "w64": (300, 301)}

    def draw() -> dict[str, torch.Tensor]:
        return {name: torch.randn(shape, generator=g, dtype=torch.float64 if name == "w64" else torch.float32)
                for name, shape in shapes.items()}

    first = draw()
    d = client.dict({name: value.numpy() for name, value in first.items()})
    expected = {name: value.clone() for name, value in first.items()}
    for n in range(2, 5):
        values = draw()
        upload = client.dict({name: value.numpy() for name, value in values.items()})
        for name, value in values.items():
            expected[name].lerp_(value, 1.0 / n)
        assert client.avgparms(upload, d) == n
        client.free(upload)
    got = client.dict(d)
    for name, value in expected.items():
        width = np.int64 if value.dtype == torch.float64 else np.int32
        np.testing.assert_array_equal(got[name].view(width), value.numpy().view(width), err_msg=name)


def test_a_large_ema_of_a_bfloat16_module_kept_in_float32_is_torchs_bit_for_bit(client: Client) -> None:
    m = client.module(NET)
    scramble(client, m, seed=1)
    client.to(m, dtype="bfloat16")
    e = client.copyparms(m, dtype="float32")
    expected = {name: value.float() for name, value in params(client, m).items()}
    decay = 0.9
    assert client.ema(m, e, decay=decay) == 1  # the first step copies
    for step in range(2, 5):
        scramble(client, m, seed=step)  # the server casts the float32 values to the module's bfloat16
        for name, value in params(client, m).items():
            assert value.dtype == torch.bfloat16
            expected[name].lerp_(value.float(), 1 - decay)
        assert client.ema(m, e, decay=decay) == step
    got = client.dict(e)
    for name, value in expected.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name].view(np.int32), value.numpy().view(np.int32), err_msg=name)


@pytest.mark.parametrize("source", ["copies", "uploads"])
def test_a_large_average_of_dictionaries_is_torchs_weighted_mean_bit_for_bit(client: Client, source: str) -> None:
    """`average` of five dictionaries into one of them and into a new one (the native one-pass sum on
    a CPU server, every entry in one call), against torch's mul / add_ / div_ in this process: flat
    copies (`copyparms`) and uploads (a tensor per entry)."""
    m = client.module(NET)
    dicts, values = [], []
    for k in range(5):
        scramble(client, m, seed=10 + k)
        values.append(params(client, m))
        if source == "copies":
            dicts.append(client.copyparms(m))
        else:
            dicts.append(client.dict({name: value.numpy() for name, value in values[-1].items()}))
    weights = [600.0, 300.0, 100.0, 50.0, 7.0]
    expected = {}
    for name in values[0]:
        acc = torch.mul(values[0][name], weights[0])
        for v, w in zip(values[1:], weights[1:]):
            acc.add_(v[name], alpha=w)
        expected[name] = acc.div_(sum(weights))
    for into in (None, dicts[2]):
        got = client.dict(client.average(dicts, weights=weights, into=into))
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name].view(np.int32), value.numpy().view(np.int32), err_msg=name)


def test_more_intra_op_threads_than_the_kernels_take_still_average_and_merge(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's thread count defaults to the host's cores, and the kernels take at most 256 threads: on
    a host with more, every large average answered INTERNAL (the kernel's ValueError) and `average`
    too. Here 300 threads, and shares of 64 elements (`ELEMENTS_PER_THREAD` lowered so a small model
    asks for them all), give the same numbers as torch."""
    monkeypatch.setattr(lerp, "ELEMENTS_PER_THREAD", 64)
    monkeypatch.setattr(weighted_sum, "ELEMENTS_PER_THREAD", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(300)
    try:
        m = client.module(NET)
        d = client.copyparms(m)
        expected = params(client, m)
        scramble(client, m, seed=5)
        values = params(client, m)
        for name, value in values.items():
            expected[name].lerp_(value, 0.5)
        assert client.avgparms(m, d) == 2
        got = client.dict(d)
        merged = client.dict(client.average([d, client.copyparms(m)], weights=[1.0, 3.0]))
    finally:
        torch.set_num_threads(before)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name].view(np.int32), value.numpy().view(np.int32), err_msg=name)
        mean = torch.mul(value, 1.0).add_(values[name], alpha=3.0).div_(4.0)
        np.testing.assert_array_equal(merged[name].view(np.int32), mean.numpy().view(np.int32), err_msg=name)


def test_a_thread_count_above_the_kernels_limit_is_cut_to_it() -> None:
    assert native.threads_for(1000) == native.MAX_THREADS == 256
    assert native.threads_for(0) == 1
    assert native.threads_for(7) == 7
