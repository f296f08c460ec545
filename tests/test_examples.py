"""The Python examples run against a real server, small and fast, so they cannot go stale."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from conftest import Cluster, LiveServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:  # as `python examples/NAME.py` has it: their shared digits.py
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("outer", ["fedavg", "fedadagrad"])
def test_federated_rounds_improve_the_global_model(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str], outer: str
) -> None:
    pytest.importorskip("sklearn")
    before = len(live_server.registry)
    rounds = example("federated").main(["--address", live_server.address, "--clients", "3", "--rounds", "3",
                                        "--outer", outer])
    assert [r.number for r in rounds] == [1, 2, 3]
    assert all(r.gradient_norm > 0 for r in rounds)
    assert rounds[-1].accuracy > rounds[0].accuracy and rounds[-1].accuracy > 60.0  # ten classes: chance is 10%
    out = capsys.readouterr().out
    assert f"3 clients, shards of [233, 467, 700] digits; outer step: {outer}" in out
    assert "round  test accuracy" in out
    assert len(live_server.registry) == before  # the example frees what it made


def test_a_federated_round_that_fails_leaves_no_handle_behind(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example's client holds a session, so a round that raises frees what the example made on
    a server it does not own (before, the handles stayed until someone purged them)."""
    pytest.importorskip("sklearn")
    from weightavg import Client

    before = len(live_server.registry)
    run = Client.run

    def failing_in_round_two(self: Client, *args: object, **kwargs: object) -> object:
        if failing_in_round_two.calls == 3:  # type: ignore[attr-defined]
            raise RuntimeError("a client machine went away")
        failing_in_round_two.calls += 1  # type: ignore[attr-defined]
        return run(self, *args, **kwargs)  # type: ignore[arg-type]

    failing_in_round_two.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(Client, "run", failing_in_round_two)
    with pytest.raises(RuntimeError, match="went away"):
        example("federated").main(["--address", live_server.address, "--clients", "3", "--rounds", "3"])
    assert len(live_server.registry) == before


def test_a_greedy_soup_is_at_least_as_good_as_its_best_ingredient_on_the_held_out_digits(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")
    before = len(live_server.registry)
    result = example("soup").main(["--address", live_server.address, "--ingredients", "3", "--pretrain", "3",
                                   "--epochs", "1"])
    assert len(result.held_out) == 3 and result.kept
    assert result.soup_held_out >= max(result.held_out)
    assert result.held_out[result.kept[0]] == max(result.held_out)
    assert 10.0 < result.best_test <= 100.0 and 10.0 < result.soup_test <= 100.0
    assert "greedy soup of" in capsys.readouterr().out
    assert len(live_server.registry) == before


def test_local_sgd_on_a_two_rank_cluster_learns_and_leaves_the_ranks_alike(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three rounds on the synthetic set (chance 10%; the classes overlap, so about 85% is the most a
    model reaches) against a real torchrun cluster; after the last allreduce both ranks hold the same
    bits, read back per rank."""
    from weightavg import Client

    with Client(cluster.address) as c:
        before = [r["handles"] for r in c.info()["ranks"]]
    result = example("local_sgd").main(["--address", cluster.address, "--rounds", "3"])
    assert result.shards == [1200, 1200]
    assert len(result.accuracy) == 3 and result.accuracy[-1] > 60.0
    assert sorted(result.parameters) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    for name, (rank0, rank1) in result.parameters.items():
        assert np.array_equal(rank0, rank1), name
    assert "2 ranks, shards of [1200, 1200] rows" in capsys.readouterr().out
    with Client(cluster.address) as c:
        assert [r["handles"] for r in c.info()["ranks"]] == before  # the example frees what it made, on every rank


def test_local_sgd_with_a_hierarchy_on_four_ranks_learns_and_leaves_the_ranks_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pairs average after every epoch and all four ranks every third, on a 4-rank cluster of its own:
    the rounds of two epochs end alike on every rank (an average over all where the round's last epoch
    made none), and the model learns."""
    four = Cluster(tmp_path, ranks=4)
    try:
        result = example("local_sgd").main(
            ["--address", four.address, "--rounds", "3", "--epochs", "2", "--hierarchy", "1:2,3:4"]
        )
    finally:
        four.stop()
    assert result.shards == [600] * 4
    assert len(result.accuracy) == 3 and result.accuracy[-1] > 60.0
    for name, values in result.parameters.items():
        assert all(np.array_equal(v, values[0]) for v in values), name
    assert "4 ranks, shards of [600, 600, 600, 600] rows" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        example("local_sgd").main(["--hierarchy", "2-4"])
    assert "give PERIOD:SIZE pairs" in capsys.readouterr().err


def test_an_fsdp2_model_on_two_ranks_keeps_its_ema_per_rank_and_tests_it(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two FSDP2 ranks under torchrun train on digits with a per-rank EMA of their shards on the server:
    the EMA swapped in is the same full model on both ranks (the example checks) and tests well; the
    ranks' sessions free the averages."""
    before = len(live_server.registry)
    result = example("sharded_ema").main(["--address", live_server.address, "--epochs", "2"])
    assert result.ranks == 2 and result.steps == 2 * 22  # 700 rows a rank in batches of 32
    assert result.last > 80.0 and result.ema > 80.0
    assert "the same full EMA on every rank" in capsys.readouterr().out
    assert len(live_server.registry) == before


def test_remote_swa_and_ema_of_a_local_torch_model_match_averaged_model_and_load_into_plain_networks(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job most users come for: a model that trains in their own process, its SWA and EMA kept on
    the server (RemoteAveragedModel), batchnorm recomputed with torch's update_bn, the averages loaded
    into plain networks. The SWA equals torch's AveragedModel of the same models to float32 rounding
    (a few ulps of values near 1: the CPU AveragedModel computes avg + (p - avg) / (n + 1), the server
    lerps)."""
    pytest.importorskip("sklearn")
    before = len(live_server.registry)
    result = example("averaged_torch").main(["--address", live_server.address, "--epochs", "3", "--swa-start", "1"])
    assert result.samples == 2
    assert result.swa_vs_torch <= 1e-6
    assert min(result.last, result.swa, result.ema) > 60.0  # ten classes: chance is 10%
    out = capsys.readouterr().out
    assert "SWA of 2 epochs, EMA of every step (decay 0.999, warm-up)" in out
    assert len(live_server.registry) == before  # the session freed both averages


def test_merged_checkpoints_load_into_plain_networks_and_the_average_is_the_mean(
    live_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fine-tuned torch checkpoints pushed once, merged on the server by average, task arithmetic,
    TIES, DARE, Model Stock, multi-SLERP and a mergekit config, each fetched into a plain network
    (load_state_dict, strict) and tested."""
    pytest.importorskip("sklearn")
    before = len(live_server.registry)
    result = example("merge_checkpoints").main(["--address", live_server.address, "--models", "2", "--pretrain", "1",
                                               "--epochs", "1"])
    assert len(result.tuned) == 2
    assert sorted(result.merged) == ["average", "dare density .5", "karcher", "mergekit ties config", "model_stock",
                                     "multislerp", "sce select .5", "task_arithmetic lam .5", "ties density .3"]
    assert all(10.0 < score <= 100.0 for score in result.merged.values())
    assert result.merged["average"] > 60.0  # ten classes: chance is 10%; the mean of two close models
    assert "2 models fine-tuned from one base (1 epochs) for 1 epochs each" in capsys.readouterr().out
    assert len(live_server.registry) == before  # the session freed every dictionary
