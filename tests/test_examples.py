"""The Python examples run against a real server, small and fast, so they cannot go stale."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import LiveServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_federated_rounds_improve_the_global_model(live_server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    before = len(live_server.registry)
    rounds = example("federated").main(["--address", live_server.address, "--clients", "3", "--rounds", "3",
                                        "--outer", "fedavg"])
    assert [r.number for r in rounds] == [1, 2, 3]
    assert all(r.gradient_norm > 0 for r in rounds)
    assert rounds[-1].accuracy > rounds[0].accuracy and rounds[-1].accuracy > 60.0  # ten classes: chance is 10%
    out = capsys.readouterr().out
    assert "3 clients, shards of [233, 467, 700] digits; outer step: fedavg" in out
    assert "round  test accuracy" in out
    assert len(live_server.registry) == before  # the example frees what it made


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
