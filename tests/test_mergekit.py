"""The merge methods against mergekit itself: mergekit 0.1.5's `run_merge` (a dev dependency) merges
small Llama checkpoints from YAML-shaped configs, and the server merges the same tensors over real
gRPC with the equivalent call; every tensor must agree.

The configs use what mergekit users write: gradients over the layers (`weight: [1, 0]`, `t: [...]`),
per-model weights and densities with filters, lambda, mergekit's README TIES example, Model Stock.
Each config also runs through `weightavg.mergekit.merge`, which must give the hand-written call's
bits. DARE and DELLA run at density 1 only: mergekit draws their masks from torch's global
generator, the server from a seeded one of its own (docs/merging.md), so below 1 their masks differ
by design; at 1 every element is kept and the rest (signs, weights, rescale, defaults) must agree.

Tolerance: 2e-6 absolute. Both compute in float32, but in different orders (mergekit stacks the
models and sums along the stack; the server sums one model at a time), so sums of values of order 1
differ by a few ulps (an ulp at 1 is 1.2e-7).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import LiveServer  # the fixture's type; pytest puts tests/ on sys.path
from weightavg import Client, Handle, ResourceExhaustedError
from weightavg import lora
from weightavg import mergekit as configs

TOL = 2e-6
LAYERS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base Llama of four layers and two models fine-tuned from it (the base plus small deltas), each
    saved as a Hugging Face checkpoint; the norms are random too, so no entry is the same everywhere."""
    root = tmp_path_factory.mktemp("mergekit")
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" in name:
                p.normal_()
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i, name in enumerate(("a", "b")):
        tuned = LlamaForCausalLM(config)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for (_, p), (_, q) in zip(tuned.named_parameters(), base.named_parameters()):
                p.copy_(q + 0.05 * torch.randn(q.shape, generator=g))
        paths[name] = root / name
        tuned.save_pretrained(paths[name])
    return paths


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in load_file(str(path / "model.safetensors")).items()}


def mergekit(config: Mapping[str, Any], out: Path) -> dict[str, np.ndarray]:
    """mergekit's own merge of a config, its tensors by name."""
    run_merge(MergeConfiguration.model_validate({**config, "dtype": "float32"}), str(out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return tensors(out)


@pytest.fixture
def uploaded(client: Client, checkpoints: dict[str, Path]) -> Iterator[dict[str, Handle]]:
    yield {name: client.dict(tensors(path)) for name, path in checkpoints.items()}


MLP_MIRROR = [1.0, 0.5, 0.7, 0.3, 0.0]
ATTN = [0.0, 0.5, 0.3, 0.7, 1.0]

Case = tuple[Callable[[dict[str, Path]], dict[str, Any]], Callable[[Client, dict[str, Handle]], Handle]]

CASES: dict[str, Case] = {
    "linear, a gradient weight and a filtered one": (
        lambda p: {"merge_method": "linear", "models": [
            {"model": str(p["a"]), "parameters": {"weight": [1.0, 0.0]}},
            {"model": str(p["b"]), "parameters": {"weight": [{"filter": "mlp", "value": [2.0, 0.5]}, {"value": 1.0}]}},
        ]},
        lambda c, h: c.merge("linear", [h["a"], h["b"]], weights=[[1.0, 0.0], 1.0],
                             per_tensor={"*mlp*": {"weights": [[1.0, 0.0], [2.0, 0.5]]}}),
    ),
    "linear without normalising, three-point gradients": (
        lambda p: {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
            {"model": str(p["a"]), "parameters": {"weight": [0.2, 0.9, 0.4]}},
            {"model": str(p["b"]), "parameters": {"weight": [0.8, 0.1, 0.6]}},
        ]},
        lambda c, h: c.merge("linear", [h["a"], h["b"]], weights=[[0.2, 0.9, 0.4], [0.8, 0.1, 0.6]], normalize=False),
    ),
    "slerp, t gradients for attention and the MLPs": (
        lambda p: {"merge_method": "slerp", "base_model": str(p["a"]),
                   "models": [{"model": str(p["a"])}, {"model": str(p["b"])}],
                   "parameters": {"t": [{"filter": "self_attn", "value": ATTN}, {"filter": "mlp", "value": MLP_MIRROR},
                                        {"value": 0.5}]}},
        lambda c, h: c.merge("slerp", [h["a"], h["b"]], t=0.5,
                             per_tensor={"*self_attn*": {"t": ATTN}, "*mlp*": {"t": MLP_MIRROR}}),
    ),
    "slerp in mergekit's README form: one slice over every layer": (
        lambda p: {"slices": [{"sources": [{"model": str(p["a"]), "layer_range": [0, LAYERS]},
                                           {"model": str(p["b"]), "layer_range": [0, LAYERS]}]}],
                   "merge_method": "slerp", "base_model": str(p["a"]), "dtype": "bfloat16",
                   "parameters": {"t": [{"filter": "self_attn", "value": ATTN}, {"filter": "mlp", "value": MLP_MIRROR},
                                        {"value": 0.5}]}},
        lambda c, h: c.merge("slerp", [h["a"], h["b"]], t=0.5,
                             per_tensor={"*self_attn*": {"t": ATTN}, "*mlp*": {"t": MLP_MIRROR}}),
    ),
    "task arithmetic, gradient weights and lambda": (
        lambda p: {"merge_method": "task_arithmetic", "base_model": str(p["base"]), "parameters": {"lambda": 0.8},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": [0.3, 1.0]}},
                              {"model": str(p["b"]), "parameters": {"weight": 0.7}}]},
        lambda c, h: c.merge("task_arithmetic", [h["a"], h["b"]], base=h["base"], weights=[[0.3, 1.0], 0.7], lam=0.8),
    ),
    "ties, a density gradient and filtered weights": (
        lambda p: {"merge_method": "ties", "base_model": str(p["base"]), "parameters": {"density": [0.3, 0.8]},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.4},
                                                                             {"value": 1.0}]}},
                              {"model": str(p["b"]), "parameters": {"weight": [1.0, 0.5]}}]},
        lambda c, h: c.merge("ties", [h["a"], h["b"]], base=h["base"], density=[0.3, 0.8], weights=[1.0, [1.0, 0.5]],
                             per_tensor={"*self_attn*": {"weights": [0.4, [1.0, 0.5]]}}),
    ),
    "ties, mergekit's README example: a density gradient for one model, a weight gradient for the other": (
        lambda p: {"merge_method": "ties", "base_model": str(p["base"]), "parameters": {"normalize": True},
                   "models": [{"model": str(p["a"]), "parameters": {"density": [1.0, 0.7, 0.1], "weight": 1.0}},
                              {"model": str(p["b"]), "parameters": {"density": 0.5, "weight": [0.0, 0.3, 0.7, 1.0]}}]},
        lambda c, h: c.merge("ties", [h["a"], h["b"]], base=h["base"], densities=[[1.0, 0.7, 0.1], 0.5],
                             weights=[1.0, [0.0, 0.3, 0.7, 1.0]], normalize=True),
    ),
    "ties, per-model densities with a filter": (
        lambda p: {"merge_method": "ties", "base_model": str(p["base"]),
                   "models": [{"model": str(p["a"]), "parameters": {"density": [{"filter": "mlp", "value": 0.3},
                                                                              {"value": 0.8}], "weight": 0.6}},
                              {"model": str(p["b"]), "parameters": {"density": [0.9, 0.2], "weight": 1.0}}]},
        lambda c, h: c.merge("ties", [h["a"], h["b"]], base=h["base"], densities=[0.8, [0.9, 0.2]], weights=[0.6, 1.0],
                             per_tensor={"*mlp*": {"densities": [0.3, [0.9, 0.2]]}}),
    ),
    "ties rescaled (mergekit's L1 rescale of each trimmed delta)": (
        lambda p: {"merge_method": "ties", "base_model": str(p["base"]), "parameters": {"rescale": True},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 1.0, "density": 0.3}},
                              {"model": str(p["b"]), "parameters": {"weight": [0.5, 1.0], "density": [0.6, 0.2]}}]},
        lambda c, h: c.merge("ties", [h["a"], h["b"]], base=h["base"], weights=[1.0, [0.5, 1.0]],
                             densities=[0.3, [0.6, 0.2]], rescale=True),
    ),
    "breadcrumbs_ties rescaled": (
        lambda p: {"merge_method": "breadcrumbs_ties", "base_model": str(p["base"]),
                   "parameters": {"rescale": True, "density": 0.5, "gamma": 0.1},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 1.0}},
                              {"model": str(p["b"]), "parameters": {"weight": 0.7}}]},
        lambda c, h: c.merge("breadcrumbs", [h["a"], h["b"]], base=h["base"], weights=[1.0, 0.7], densities=[0.5, 0.5],
                             gamma=0.1, consensus=True, rescale=True),
    ),
    "dare_ties at density 1 (every element kept, so the signs, weights and defaults show)": (
        lambda p: {"merge_method": "dare_ties", "base_model": str(p["base"]),
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 0.7, "density": 1.0}},
                              {"model": str(p["b"]), "parameters": {"weight": [1.0, 0.2], "density": 1.0}}]},
        lambda c, h: c.merge("dare", [h["a"], h["b"]], base=h["base"], weights=[0.7, [1.0, 0.2]], densities=[1.0, 1.0],
                             consensus=True, rescale_norm="l1"),
    ),
    "dare_linear at density 1, normalised": (
        lambda p: {"merge_method": "dare_linear", "base_model": str(p["base"]), "parameters": {"normalize": True},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 0.7, "density": 1.0}},
                              {"model": str(p["b"]), "parameters": {"weight": [1.0, 0.2], "density": 1.0}}]},
        lambda c, h: c.merge("dare", [h["a"], h["b"]], base=h["base"], weights=[0.7, [1.0, 0.2]], density=1.0,
                             rescale_norm="l1", normalize=True),
    ),
    "della at density 1 (every element kept: its signs, weights and defaults show)": (
        lambda p: {"merge_method": "della", "base_model": str(p["base"]),
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 0.9, "density": 1.0}},
                              {"model": str(p["b"]), "parameters": {"weight": [0.3, 1.0], "density": 1.0}}]},
        lambda c, h: c.merge("della", [h["a"], h["b"]], base=h["base"], weights=[0.9, [0.3, 1.0]], densities=[1.0, 1.0],
                             consensus=True, normalize=True, rescale_norm="l1"),
    ),
    "breadcrumbs, per-model densities and a gradient gamma": (
        lambda p: {"merge_method": "breadcrumbs", "base_model": str(p["base"]), "parameters": {"gamma": [0.05, 0.2]},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 0.8, "density": 0.6}},
                              {"model": str(p["b"]), "parameters": {"weight": [1.0, 0.3], "density": [0.9, 0.4]}}]},
        lambda c, h: c.merge("breadcrumbs", [h["a"], h["b"]], base=h["base"], weights=[0.8, [1.0, 0.3]],
                             densities=[0.6, [0.9, 0.4]], gamma=[0.05, 0.2]),
    ),
    "breadcrumbs_ties, normalised, lambda": (
        lambda p: {"merge_method": "breadcrumbs_ties", "base_model": str(p["base"]),
                   "parameters": {"normalize": True, "lambda": 1.3, "density": 0.7, "gamma": 0.1},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 1.0}},
                              {"model": str(p["b"]), "parameters": {"weight": 0.5}}]},
        lambda c, h: c.merge("breadcrumbs", [h["a"], h["b"]], base=h["base"], weights=[1.0, 0.5], densities=[0.7, 0.7],
                             gamma=0.1, consensus=True, normalize=True, lam=1.3),
    ),
    "nuslerp of two models, t from their weights": (
        lambda p: {"merge_method": "nuslerp",
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 0.3}},
                              {"model": str(p["b"]), "parameters": {"weight": [{"filter": "mlp", "value": 2.0},
                                                                              {"value": 0.7}]}}]},
        lambda c, h: c.merge("slerp", [h["a"], h["b"]], t=0.7, threshold=1.0, per_tensor={"*mlp*": {"t": 2.0 / 2.3}}),
    ),
    "nuslerp, a weight gradient: t per layer": (
        lambda p: {"merge_method": "nuslerp",
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 1.0}},
                              {"model": str(p["b"]), "parameters": {"weight": [0.5, 2.0]}}]},
        lambda c, h: c.merge("slerp", [h["a"], h["b"]], t=0.5 / 1.5, threshold=1.0, per_tensor={
            f"model.layers.{i}.*": {"t": w / (1.0 + w)}
            for i in range(1, LAYERS) for f in [i / (LAYERS - 1)] for w in [(1 - f) * 0.5 + f * 2.0]}),
    ),
    "nuslerp of the offsets from a base": (
        lambda p: {"merge_method": "nuslerp", "base_model": str(p["base"]),
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 1.0}},
                              {"model": str(p["b"]), "parameters": {"weight": 3.0}}]},
        lambda c, h: c.merge("slerp", [h["a"], h["b"]], base=h["base"], t=0.75, threshold=1.0),
    ),
    "nuslerp row by row, from a base": (
        lambda p: {"merge_method": "nuslerp", "base_model": str(p["base"]), "parameters": {"nuslerp_flatten": False},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 1.0}},
                              {"model": str(p["b"]), "parameters": {"weight": 2.0}}]},
        lambda c, h: c.merge("slerp", [h["a"], h["b"]], base=h["base"], t=2.0 / 3.0, threshold=1.0, vectors="rows"),
    ),
    "nuslerp column by column": (
        lambda p: {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 0.4}},
                              {"model": str(p["b"]), "parameters": {"weight": 0.6}}]},
        lambda c, h: c.merge("slerp", [h["a"], h["b"]], t=0.6, threshold=1.0, vectors="columns"),
    ),
    "multislerp of three without a base, gradient weights": (
        lambda p: {"merge_method": "multislerp",
                   "models": [{"model": str(p["a"]), "parameters": {"weight": [1.0, 0.2]}},
                              {"model": str(p["b"]), "parameters": {"weight": 0.5}},
                              {"model": str(p["base"]), "parameters": {"weight": 0.3}}]},
        lambda c, h: c.merge("multislerp", [h["a"], h["b"], h["base"]], weights=[[1.0, 0.2], 0.5, 0.3]),
    ),
    "multislerp of the offsets from a base, weights as given": (
        lambda p: {"merge_method": "multislerp", "base_model": str(p["base"]),
                   "parameters": {"normalize_weights": False},
                   "models": [{"model": str(p["a"]), "parameters": {"weight": 0.6}},
                              {"model": str(p["b"]), "parameters": {"weight": 0.7}}]},
        lambda c, h: c.merge("multislerp", [h["a"], h["b"]], base=h["base"], weights=[0.6, 0.7], normalize=False),
    ),
    "model stock": (
        lambda p: {"merge_method": "model_stock", "base_model": str(p["base"]),
                   "models": [{"model": str(p["a"])}, {"model": str(p["b"])}]},
        lambda c, h: c.merge("model_stock", [h["a"], h["b"]], base=h["base"]),
    ),
    "karcher of three, the base among them": (
        lambda p: {"merge_method": "karcher",
                   "models": [{"model": str(p["a"])}, {"model": str(p["b"])}, {"model": str(p["base"])}]},
        lambda c, h: c.merge("karcher", [h["a"], h["b"], h["base"]]),
    ),
    "karcher with the base added by mergekit, more steps": (
        lambda p: {"merge_method": "karcher", "base_model": str(p["base"]), "parameters": {"max_iter": 20, "tol": 1e-6},
                   "models": [{"model": str(p["b"])}, {"model": str(p["a"])}]},
        lambda c, h: c.merge("karcher", [h["b"], h["a"], h["base"]], max_iter=20, tol=1e-6),
    ),
    "sce, every element": (
        lambda p: {"merge_method": "sce", "base_model": str(p["base"]),
                   "models": [{"model": str(p["a"])}, {"model": str(p["b"])}]},
        lambda c, h: c.merge("sce", [h["a"], h["b"]], base=h["base"]),
    ),
    "sce, select_topk a gradient and filtered": (
        lambda p: {"merge_method": "sce", "base_model": str(p["base"]),
                   "parameters": {"select_topk": [{"filter": "mlp", "value": 0.5}, {"value": [0.2, 0.9]}]},
                   "models": [{"model": str(p["a"])}, {"model": str(p["b"])}, {"model": str(p["base"])}]},
        lambda c, h: c.merge("sce", [h["a"], h["b"]], base=h["base"], select_topk=[0.2, 0.9],
                             per_tensor={"*mlp*": {"select_topk": 0.5}}),
    ),
    "nearswap, t filtered": (
        lambda p: {"merge_method": "nearswap", "base_model": str(p["base"]),
                   "parameters": {"t": [{"filter": "mlp", "value": 0.02}, {"value": 0.05}]},
                   "models": [{"model": str(p["a"])}, {"model": str(p["base"])}]},
        lambda c, h: c.merge("nearswap", [h["a"]], base=h["base"], t=0.05, per_tensor={"*mlp*": {"t": 0.02}}),
    ),
    "ram, an epsilon that some changes fall under": (
        lambda p: {"merge_method": "ram", "base_model": str(p["base"]), "parameters": {"epsilon": 0.04},
                   "models": [{"model": str(p["a"])}, {"model": str(p["b"])}]},
        lambda c, h: c.merge("ram", [h["a"], h["b"]], base=h["base"], epsilon=0.04),
    ),
    "ramplus_tl, epsilon a gradient": (
        lambda p: {"merge_method": "ramplus_tl", "base_model": str(p["base"]),
                   "parameters": {"epsilon": [0.02, 0.08], "r": 0.3},
                   "models": [{"model": str(p["a"])}, {"model": str(p["b"])}]},
        lambda c, h: c.merge("ram", [h["a"], h["b"]], base=h["base"], epsilon=[0.02, 0.08], r=0.3, alpha=0.2),
    ),
    "arcee fusion": (
        lambda p: {"merge_method": "arcee_fusion", "base_model": str(p["base"]),
                   "models": [{"model": str(p["b"])}]},
        lambda c, h: c.merge("arcee_fusion", [h["b"]], base=h["base"]),
    ),
    "passthrough of one model, scaled by a filtered gradient": (
        lambda p: {"merge_method": "passthrough",
                   "models": [{"model": str(p["b"]), "parameters": {"scale": [{"filter": "mlp", "value": [1.0, 0.5]},
                                                                             {"value": 1.0}]}}]},
        lambda c, h: c.merge("linear", [h["b"]], normalize=False, per_tensor={"*mlp*": {"weights": [[1.0, 0.5]]}}),
    ),
    "model stock, filter-wise": (
        lambda p: {"merge_method": "model_stock", "base_model": str(p["base"]), "parameters": {"filter_wise": True},
                   "models": [{"model": str(p["a"])}, {"model": str(p["b"])}]},
        lambda c, h: c.merge("model_stock", [h["a"], h["b"]], base=h["base"], filter_wise=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_merge_equals_mergekits_on_every_tensor(
    case: str, client: Client, checkpoints: dict[str, Path], uploaded: dict[str, Handle], tmp_path: Path
) -> None:
    config, call = CASES[case]
    want = mergekit(config(checkpoints), tmp_path / "out")
    got = client.dict(call(client, uploaded))
    assert sorted(got) == sorted(want)
    inputs = tensors(checkpoints["a"])
    for name in want:
        assert got[name].dtype == want[name].dtype == np.float32, name
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL, err_msg=name)
    assert sum(np.abs(got[name] - inputs[name]).max() > 1e-4 for name in want) > len(want) // 2  # not just a copy


@pytest.mark.parametrize("case", list(CASES))
def test_the_config_itself_merged_on_the_server_equals_mergekits(
    case: str, client: Client, checkpoints: dict[str, Path], uploaded: dict[str, Handle], tmp_path: Path
) -> None:
    """`weightavg.mergekit.merge` reads the very config mergekit ran: the same tensors, and the same call
    as the hand-written one above."""
    config_of, call = CASES[case]
    config = config_of(checkpoints)
    want = mergekit(config, tmp_path / "out")
    handles = {str(path): uploaded[name] for name, path in checkpoints.items()}
    got = client.dict(configs.merge(client, config, handles))
    hand = client.dict(call(client, uploaded))
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL, err_msg=name)
        np.testing.assert_array_equal(got[name], hand[name], err_msg=name)


def test_mergekit_gives_the_head_and_final_norm_a_gradients_first_value(
    client: Client, checkpoints: dict[str, Path], uploaded: dict[str, Handle], tmp_path: Path
) -> None:
    """Where mergekit places what lies outside the layers: the embeddings and also the final norm and
    the head take a gradient's first value (mergekit plans them at its module's start), so a linear
    merge from all-a to all-b keeps a's head; the last layer is b's."""
    want = mergekit({"merge_method": "linear", "models": [
        {"model": str(checkpoints["a"]), "parameters": {"weight": [1.0, 0.0]}},
        {"model": str(checkpoints["b"]), "parameters": {"weight": [0.0, 1.0]}},
    ]}, tmp_path / "out")
    got = client.dict(client.merge("linear", [uploaded["a"], uploaded["b"]], weights=[[1.0, 0.0], [0.0, 1.0]]))
    a, b = tensors(checkpoints["a"]), tensors(checkpoints["b"])
    last = f"model.layers.{LAYERS - 1}.mlp.up_proj.weight"
    for name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"):
        np.testing.assert_array_equal(want[name], a[name], err_msg=name)
        np.testing.assert_array_equal(got[name], a[name], err_msg=name)
    np.testing.assert_array_equal(want[last], b[last])
    np.testing.assert_array_equal(got[last], b[last])


@pytest.mark.parametrize("address, local", [
    ("127.0.0.1:50051", True), ("localhost:50051", True), ("[::1]:50051", True), ("127.3.4.5:1", True),
    ("0.0.0.0:50051", True), ("[::]:50051", True), ("unix:/tmp/weightavg.sock", True),
    ("10.1.2.3:50051", False), ("example.com:50051", False), ("[2001:db8::1]:50051", False),
])
def test_weightavg_merge_takes_shared_memory_by_default_only_for_a_server_on_this_host(address: str, local: bool) -> None:
    """`weightavg merge` without --shm/--no-shm tries shared memory for an address on this machine:
    loopback, localhost, a Unix socket, and the unspecified address (a connection to 0.0.0.0 or ::
    reaches this host: what a server started with --host 0.0.0.0 prints)."""
    from weightavg import _cli

    assert _cli._on_this_host(address) is local


def _merge_on_a_terminal(argv: list[str]) -> tuple[int, str]:
    """Run `weightavg merge ARGV` with its stderr on a pseudo-terminal (as a person at a shell sees it):
    the exit status and what it wrote there."""
    import pty

    primary, secondary = pty.openpty()
    try:
        child = subprocess.Popen([str(Path(sys.executable).parent / "weightavg"), "merge", *argv],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary)
        os.close(secondary)
        seen = b""
        while True:
            try:
                data = os.read(primary, 1 << 16)
            except OSError:  # EIO: the child closed the terminal's last writer
                break
            if not data:
                break
            seen += data
        return child.wait(timeout=300), seen.decode(errors="replace")
    finally:
        os.close(primary)


def test_weightavg_merge_shows_a_progress_line_on_a_terminal_and_none_with_quiet(
    live_server: LiveServer, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """On a terminal `weightavg merge` redraws one line per merged batch and ends it at the last
    (`N/N tensors`); `--quiet` shows none, and its merge writes the same tensors."""
    config = CASES["ties, a density gradient and filtered weights"][0](checkpoints)
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(config))
    status, shown = _merge_on_a_terminal([live_server.address, str(tmp_path / "ties.yml"), str(tmp_path / "shown"),
                                          "--batch-bytes", "16KiB"])
    assert status == 0, shown
    lines = re.findall(r"weightavg merge: (\d+)/(\d+) tensors", shown)
    total = len(tensors(tmp_path / "shown"))
    assert len(lines) > 1 and lines[-1] == (str(total), str(total))  # several batches, the last one whole
    assert [int(done) for done, _ in lines] == sorted(int(done) for done, _ in lines)
    status, quiet = _merge_on_a_terminal([live_server.address, str(tmp_path / "ties.yml"), str(tmp_path / "quiet"),
                                          "--batch-bytes", "16KiB", "--quiet"])
    assert status == 0, quiet
    assert "tensors" not in quiet and "weightavg merge:" not in quiet
    got, want = tensors(tmp_path / "quiet"), tensors(tmp_path / "shown")
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_weightavg_merge_turns_checkpoint_files_and_a_yaml_config_into_mergekits_checkpoint(
    live_server: LiveServer, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """The command line over the files themselves, as `mergekit-yaml config.yml out/` runs: `weightavg
    merge ADDRESS config.yml OUT` reads each checkpoint directory, merges on the server and writes
    OUT/model.safetensors with mergekit's numbers, beside the base's config.json, loadable by
    transformers; nothing stays on the server; the config it ran from and a model card beside them, as
    mergekit-yaml writes them (none with --no-model-card). With out_dtype the tensors are written in it."""
    config = CASES["ties, a density gradient and filtered weights"][0](checkpoints)
    want = mergekit(config, tmp_path / "mergekit")
    before = {handle_id for handle_id, _ in live_server.registry.items()}
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run([str(Path(sys.executable).parent / "weightavg"), "merge", live_server.address,
                           str(tmp_path / "ties.yml"), str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / 'out' / 'model.safetensors'}"
    got = tensors(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL, err_msg=name)
    assert (tmp_path / "out" / "config.json").read_text() == (checkpoints["base"] / "config.json").read_text()
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    np.testing.assert_array_equal(loaded.state_dict()["lm_head.weight"].numpy(), got["lm_head.weight"])
    assert {handle_id for handle_id, _ in live_server.registry.items()} == before
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == (tmp_path / "ties.yml").read_text()
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- merge\n- mergekit\n- weightavg\n---\n\n# out\n")
    assert "method `ties`, base model `" + str(checkpoints["base"]) + "`." in card
    assert f"- `{checkpoints['a']}`\n- `{checkpoints['b']}`\n- `{checkpoints['base']}` (the base)\n" in card
    assert "```yaml\n" + (tmp_path / "ties.yml").read_text().rstrip() + "\n```\n" in card

    (tmp_path / "bf16.json").write_text(json.dumps({**config, "out_dtype": "bfloat16"}))
    done = subprocess.run([str(Path(sys.executable).parent / "weightavg"), "merge", live_server.address,
                           str(tmp_path / "bf16.json"), str(tmp_path / "bf16"), "--no-model-card"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "bf16" / "README.md").exists() and not (tmp_path / "bf16" / "mergekit_config.yml").exists()
    low = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"  # as mergekit writes it
    assert LlamaForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype="auto").dtype == torch.bfloat16
    for name in want:
        assert low[name].dtype == torch.bfloat16, name
        np.testing.assert_allclose(low[name].float().numpy(), got[name], rtol=2**-8, atol=0, err_msg=name)


def test_weightavg_merge_names_what_it_cannot_read(live_server: LiveServer, checkpoints: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """A model given by a Hugging Face ID that cannot be downloaded (the Hub unreachable: offline), a
    local path that is not there, a config that is no mapping and a checkpoint cut short (after
    another model was uploaded): one line each on stderr that says what is wrong,
    exit status 1, nothing left on the server."""
    before = {handle_id for handle_id, _ in live_server.registry.items()}
    config = {**CASES["model stock"][0](checkpoints), "base_model": "org/not-downloaded"}
    (tmp_path / "c.json").write_text(json.dumps(config))
    (tmp_path / "list.yml").write_text("- 1\n- 2\n")
    (tmp_path / "cut").mkdir()  # a checkpoint cut short: its header says more than the file holds
    (tmp_path / "cut" / "model.safetensors").write_bytes((checkpoints["b"] / "model.safetensors").read_bytes()[:4096])
    cut = {**CASES["model stock"][0](checkpoints), "models": [{"model": str(checkpoints["a"])},
                                                              {"model": str(tmp_path / "cut")}]}
    (tmp_path / "cut.json").write_text(json.dumps(cut))
    (tmp_path / "missing.json").write_text(json.dumps({**config, "base_model": str(tmp_path / "missing")}))
    for path, message in ((tmp_path / "c.json", "model 'org/not-downloaded' is not a local path, and as a Hugging Face "
                                                "repository it could not be downloaded: it is not in the Hugging Face cache"),
                          (tmp_path / "missing.json", f"model '{tmp_path / 'missing'}' of the config is not a local directory"),
                          (tmp_path / "list.yml", "holds no mergekit config"),
                          (tmp_path / "cut.json", "outside the file's")):
        done = subprocess.run([str(Path(sys.executable).parent / "weightavg"), "merge", live_server.address, str(path),
                               str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
        assert done.returncode == 1 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert {handle_id for handle_id, _ in live_server.registry.items()} == before


def test_weightavg_merge_through_shared_memory_writes_the_same_bytes(
    start_server: Callable[..., LiveServer], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """--shm against a server on this host with --allow-shm: the read-only mapped checkpoints go up and
    the merge comes back through shared memory regions, and the file written is the stream's
    (--no-shm), byte for byte; no handle is left. Without either flag a loopback address takes shared
    memory, and a server that refuses it (no --allow-shm) gets the stream, the same bytes. ADDRESS
    `local` (a server the command starts in its own process) writes the same bytes."""
    server, closed = start_server(allow_shm=True), start_server()
    config = CASES["sce, select_topk a gradient and filtered"][0](checkpoints)
    (tmp_path / "sce.json").write_text(json.dumps(config))
    script = str(Path(sys.executable).parent / "weightavg")

    def shm_fetches(at: LiveServer) -> int:
        with Client(at.address) as c:
            calls = c.stats()["methods"]
        return int(calls.get("/weightavg.v1.WeightAveragingService/FetchTensorsToSharedMemory", {}).get("count", 0))

    ways = {"stream": (server, ["--no-shm"], False), "shm": (server, ["--shm"], True), "default": (server, [], True),
            "shm batches": (server, ["--shm", "--batch-bytes", "8KiB"], True), "refused": (closed, [], False),
            "local": (None, [], None)}
    for way, (at, flags, shared) in ways.items():
        before = shm_fetches(at) if at is not None else 0
        address = "local" if at is None else at.address  # local: a server in the command's own process
        done = subprocess.run([script, "merge", address, str(tmp_path / "sce.json"), str(tmp_path / way), *flags],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        if at is not None:
            assert (shm_fetches(at) > before) == shared, way  # the merge came back through shared memory, or not
    for way in ways:  # a region reused batch after batch gives the same bytes
        assert (tmp_path / way / "model.safetensors").read_bytes() == \
            (tmp_path / "stream" / "model.safetensors").read_bytes(), way
    assert not list(server.registry.items()) and not list(closed.registry.items())  # every handle freed


WITH_DARE = {**CASES, "dare_ties at density .5, its masks seeded by each entry's name": (
    lambda p: {"merge_method": "dare_ties", "base_model": str(p["base"]), "parameters": {"density": [0.3, 0.7]},
               "models": [{"model": str(p["a"]), "parameters": {"weight": 1.0}},
                          {"model": str(p["b"]), "parameters": {"weight": [0.5, 1.0]}}]},
)}


def merge_calls(c: Client) -> int:
    return int(c.stats()["methods"].get("/weightavg.v1.WeightAveragingService/MergeDictionaries", {}).get("count", 0))


@pytest.mark.parametrize("case", list(WITH_DARE))
def test_a_checkpoint_merged_a_tensor_at_a_time_has_the_whole_merges_bits(
    case: str, live_server: LiveServer, client: Client, checkpoints: dict[str, Path], uploaded: dict[str, Handle],
    tmp_path: Path,
) -> None:
    """merge_checkpoints sends a batch of tensors per call and places each gradient by the whole
    model's layers itself (a batch shows only its own); with batch_bytes=1, one tensor per call, the
    file holds the bits of one server call over the whole dictionaries, where the server places the
    gradients (DARE's masks too: each is seeded by its entry's name). Nothing is left on the server."""
    config = {k: v for k, v in WITH_DARE[case][0](checkpoints).items() if k != "dtype"}  # the server's float32 bits
    before, held = merge_calls(client), len(list(live_server.registry.items()))
    seen: list[tuple[int, int]] = []
    written = configs.merge_checkpoints(client, config, tmp_path / "out", batch_bytes=1,
                                        progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, len(seen)) for i in range(1, len(seen) + 1)]  # a call per batch, one tensor each
    assert written == tmp_path / "out" / "model.safetensors"
    got = tensors(tmp_path / "out")
    assert merge_calls(client) - before == len(got) > 20  # one call per tensor
    assert len(list(live_server.registry.items())) == held  # every batch's handles freed
    handles = {str(path): uploaded[name] for name, path in checkpoints.items()}
    whole = client.dict(configs.merge(client, config, handles))
    in_order = list(tensors(checkpoints["a"]))  # the checkpoint's order; slices write mergekit's (layers in order)
    assert list(got) == in_order if "slices" not in config else sorted(got) == sorted(in_order)
    for name in whole:
        np.testing.assert_array_equal(got[name], whole[name], err_msg=name)


def test_a_server_too_small_for_the_whole_models_merges_them_in_batches_it_splits(
    start_server: Callable[..., LiveServer], checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A server whose byte cap holds a few tensors of the three models but not the models whole refuses
    the first batch (RESOURCE_EXHAUSTED); merge_checkpoints splits it and retries until the batches fit,
    and writes what an uncapped server gives. A cap under one tensor's need fails with the server's
    message, nothing written to the output directory and nothing left on the server."""
    config = CASES["ties, a density gradient and filtered weights"][0](checkpoints)
    sizes = [sum(a.nbytes for a in tensors(checkpoints[name]).values()) for name in ("base", "a", "b")]
    largest = max(a.nbytes for a in tensors(checkpoints["a"]).values())
    roomy = start_server()
    with Client(roomy.address) as c:
        want = configs.merge_checkpoints(c, config, tmp_path / "roomy").read_bytes()
    small = start_server(max_device_bytes=sum(sizes) // 3)
    with Client(small.address) as c:
        with pytest.raises(ResourceExhaustedError):  # the three models whole do not fit
            for name in ("base", "a", "b"):
                c.dict(tensors(checkpoints[name]))
        c.purge()
        written = configs.merge_checkpoints(c, config, tmp_path / "small")
        codes = c.stats()["methods"]["/weightavg.v1.WeightAveragingService/CreateDictionary"]["codes"]
        assert codes.get("RESOURCE_EXHAUSTED", 0) >= 2  # the models whole above, and the first batch
        assert merge_calls(c) > 2
    assert written.read_bytes() == want
    assert not list(small.registry.items())

    tiny = start_server(max_device_bytes=largest * 2)  # the largest tensor's three copies never fit
    with Client(tiny.address) as c:
        with pytest.raises(ResourceExhaustedError, match="bytes"):
            configs.merge_checkpoints(c, config, tmp_path / "tiny")
    assert not list(tiny.registry.items())
    assert list((tmp_path / "tiny").iterdir()) == []  # not even the staging folder


class FailingRead(Mapping[str, Any]):
    """A model's tensors whose `bad` entry cannot be read once the upload reads it, on an upload thread
    (a file that went away under the merge, after the shapes were checked)."""

    def __init__(self, inner: Mapping[str, Any], bad: str) -> None:
        self.inner, self.bad = inner, bad

    def __getitem__(self, name: str) -> Any:
        if name == self.bad and threading.current_thread() is not threading.main_thread():
            raise OSError(f"{name}: input/output error")
        return self.inner[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def test_a_model_that_fails_to_go_up_frees_the_models_that_went_up_beside_it(
    live_server: LiveServer, client: Client, checkpoints: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's models go up at once, on threads; where one cannot be read, those already going up
    finish and their dictionaries are freed, those not started never start, the read's error is
    raised as it was, and nothing is written. The same merge then runs whole, as the models go up in
    any order."""
    config = CASES["ties, a density gradient and filtered weights"][0](checkpoints)
    read = configs._read
    bad = str(checkpoints["b"].resolve())
    monkeypatch.setattr(configs, "_read", lambda model, adapter: FailingRead(read(model, adapter), "model.norm.weight")
                        if str(Path(model).resolve()) == bad else read(model, adapter))
    held, created = len(list(live_server.registry.items())), creates(client)
    with pytest.raises(OSError, match="model.norm.weight: input/output error"):
        configs.merge_checkpoints(client, config, tmp_path / "out")
    assert 1 <= creates(client) - created <= 2  # a (listed before b, so started first) went up, the base perhaps
    assert len(list(live_server.registry.items())) == held
    assert list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(configs, "_read", read)
    want = configs.merge_checkpoints(client, config, tmp_path / "one", batch_bytes=1).read_bytes()
    assert configs.merge_checkpoints(client, config, tmp_path / "whole").read_bytes() == want


def test_a_write_that_fails_stops_the_merge_and_leaves_nothing(
    live_server: LiveServer, client: Client, checkpoints: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches are written on a thread one batch behind the merge; a write that fails (a full disk)
    is raised by the merge within a batch of it, nothing is left in the output directory, and every
    handle is freed."""
    config = CASES["ties, a density gradient and filtered weights"][0](checkpoints)
    add, written = configs.checkpoints.ShardWriter.add, []

    def full_on_the_third(writer: Any, name: str, value: Any) -> None:
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(name)
        add(writer, name, value)

    monkeypatch.setattr(configs.checkpoints.ShardWriter, "add", full_on_the_third)
    held, before = len(list(live_server.registry.items())), merge_calls(client)
    with pytest.raises(OSError, match="No space left on device"):
        configs.merge_checkpoints(client, config, tmp_path / "out", batch_bytes=1)  # a tensor a batch
    assert 3 <= merge_calls(client) - before <= 4  # the third batch's write fails as the fourth is merged
    assert len(list(live_server.registry.items())) == held
    assert list((tmp_path / "out").iterdir()) == []


def test_a_fetch_that_fails_frees_the_batch_going_up_beside_it(
    live_server: LiveServer, client: Client, checkpoints: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next batch's models go up while a batch's result comes back; where that fetch fails (here
    the third, as a dropped connection would), the merge raises its error, the batch going up beside
    it is waited for and freed with everything else, and nothing is written."""
    config = CASES["ties, a density gradient and filtered weights"][0](checkpoints)
    fetch, fetched = Client.dict, []

    def dropped_on_the_third(c: Client, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("arrays"):  # the merge's fetches; its uploads pass a mapping and no arrays=
            fetched.append(args[0])
            if len(fetched) == 3:
                raise OSError("connection reset by peer")
        return fetch(c, *args, **kwargs)

    monkeypatch.setattr(Client, "dict", dropped_on_the_third)
    held, created = len(list(live_server.registry.items())), creates(client)
    with pytest.raises(OSError, match="connection reset by peer"):
        configs.merge_checkpoints(client, config, tmp_path / "out", batch_bytes=1)  # a tensor a batch
    assert creates(client) - created == 3 * 4  # three models a batch: the fourth batch was going up
    assert len(list(live_server.registry.items())) == held
    assert list((tmp_path / "out").iterdir()) == []


def test_a_fetch_the_server_cannot_hold_is_merged_again_in_halves(
    live_server: LiveServer, client: Client, checkpoints: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's fetch reserves host copies on the server, beside the next batch going up; where the
    server refuses them (RESOURCE_EXHAUSTED, here the second fetch's, as a capped server would), the
    batch going up is called off and freed, the batch is merged again in halves, and the file holds
    the bytes of a merge that was never refused, in the same order; nothing is left on the server.
    (The refusal is raised in the client: it is the client's handling under test.)"""
    config = CASES["ties, a density gradient and filtered weights"][0](checkpoints)
    want = configs.merge_checkpoints(client, config, tmp_path / "want", batch_bytes=4096).read_bytes()
    fetch, fetched = Client.dict, []

    def refused_once(c: Client, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("arrays") and not fetched and len(c.size(args[0])) > 1:  # the first batch of several tensors
            fetched.append(args[0])
            raise ResourceExhaustedError("host copies of 2048 bytes do not fit", "RESOURCE_EXHAUSTED")
        return fetch(c, *args, **kwargs)

    monkeypatch.setattr(Client, "dict", refused_once)
    held, before = len(list(live_server.registry.items())), merge_calls(client)
    got = configs.merge_checkpoints(client, config, tmp_path / "got", batch_bytes=4096).read_bytes()
    assert got == want
    batches = len(configs._batches(configs._layout(config, {n: configs._read(*configs._located(n, {}))
                                                            for n in configs._referenced(config)})[0][0], 2048))
    assert merge_calls(client) - before == batches + 2  # the refused batch merged again as two halves
    assert len(list(live_server.registry.items())) == held


def creates(c: Client) -> int:
    return int(c.stats()["methods"].get("/weightavg.v1.WeightAveragingService/CreateDictionary", {}).get("count", 0))


def test_weightavg_merge_writes_shards_and_an_index_that_transformers_loads(
    live_server: LiveServer, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """--shard-bytes as mergekit's --out-shard-size: shards named model-0000i-of-0000N.safetensors of at
    most that many bytes (a larger tensor alone in its own), model.safetensors.index.json naming each
    tensor's shard and the total size, loaded by transformers to the same tensors as one file; a later
    merge into the same directory as one file removes the earlier shards and index, which a loader
    would otherwise read instead. --batch-bytes in units; a size of 0 or none is refused by the parser."""
    config = CASES["model stock"][0](checkpoints)
    (tmp_path / "c.json").write_text(json.dumps(config))
    script = str(Path(sys.executable).parent / "weightavg")
    one = subprocess.run([script, "merge", live_server.address, str(tmp_path / "c.json"), str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    whole = tensors(tmp_path / "one")
    limit = 2048
    done = subprocess.run([script, "merge", live_server.address, str(tmp_path / "c.json"), str(tmp_path / "out"),
                           "--shard-bytes", "2KiB", "--batch-bytes", "4k"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert done.stdout.strip() == f"wrote {tmp_path / 'out' / 'model.safetensors.index.json'}"
    shards = sorted(f.name for f in (tmp_path / "out").glob("model-*.safetensors"))
    count = len(shards)
    assert count > 3 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert set(index["weight_map"].values()) == set(shards) and sorted(index["weight_map"]) == sorted(whole)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in whole.values())
    for shard in shards:
        held = load_file(str(tmp_path / "out" / shard))
        assert sum(t.numel() * t.element_size() for t in held.values()) <= limit or len(held) == 1
        for name, t in held.items():
            assert index["weight_map"][name] == shard
            np.testing.assert_array_equal(t.numpy(), whole[name], err_msg=name)
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    for name, value in whole.items():
        np.testing.assert_array_equal(loaded[name].numpy(), value, err_msg=name)
    assert not (tmp_path / "out" / "model.safetensors").exists()

    again = subprocess.run([script, "merge", live_server.address, str(tmp_path / "c.json"), str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    left = sorted(f.name for f in (tmp_path / "out").iterdir() if "safetensors" in f.name or f.name.startswith("."))
    assert left == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()

    for flag, value, message in (("--batch-bytes", "0", "give a positive size"),
                                 ("--shard-bytes", "5 billion", "is not a size")):
        refused = subprocess.run([script, "merge", live_server.address, str(tmp_path / "c.json"), str(tmp_path / "x"),
                                  flag, value], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


@pytest.fixture(scope="module")
def adapters(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEFT LoRA adapters of model a, saved by PEFT itself: attention projections and the embeddings at
    rank 4 (lora_alpha 8), and the MLPs with rank-stabilised scaling (use_rslora, rank 8, alpha 16);
    both factors random (init_lora_weights=False), so every update is non-zero."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    found = {}
    for name, config in (
        ("attn", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                            init_lora_weights=False)),
        ("rslora", LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["up_proj", "down_proj"],
                              init_lora_weights=False)),
    ):
        torch.manual_seed(len(found))
        model = get_peft_model(LlamaForCausalLM.from_pretrained(str(checkpoints["a"])), config)
        model.save_pretrained(str(root / name))
        found[name] = root / name
    return found


@pytest.mark.parametrize("adapter", ["attn", "rslora"])
def test_a_lora_adapter_is_applied_as_peft_merges_it(checkpoints: dict[str, Path], adapters: dict[str, Path],
                                                     adapter: str) -> None:
    """weightavg.lora against PEFT's own merge_and_unload of the same adapter: every tensor within 2e-6
    (the adapted ones differ from the base), the others the base's own arrays."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(checkpoints["a"])),
                                       str(adapters[adapter])).merge_and_unload().state_dict()
    base = tensors(checkpoints["a"])
    got = lora.apply(base, adapters[adapter])
    assert sorted(got) == sorted(base) == sorted(merged)
    changed = [name for name in got if name in got.updates]
    assert len(changed) == {"attn": 2 * LAYERS + 1, "rslora": 2 * LAYERS}[adapter]
    for name in got:
        np.testing.assert_allclose(got[name], merged[name].numpy(), rtol=0, atol=TOL, err_msg=name)
        assert (np.abs(got[name] - base[name]).max() > 1e-3) == (name in changed), name


def test_weightavg_merge_of_model_plus_adapter_equals_mergekits(
    live_server: LiveServer, checkpoints: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """mergekit's `model+adapter` names: the adapter applied to its model before the merge. A TIES merge
    of a+attn and b+rslora against the base, through the command, equals mergekit's run_merge (which
    applies the adapters with PEFT)."""
    config = {"merge_method": "ties", "base_model": str(checkpoints["base"]), "parameters": {"density": 0.6},
              "models": [{"model": f"{checkpoints['a']}+{adapters['attn']}", "parameters": {"weight": 0.7}},
                         {"model": f"{checkpoints['b']}+{adapters['rslora']}", "parameters": {"weight": 0.5}}]}
    run_merge(MergeConfiguration.model_validate({**config, "dtype": "float32"}), str(tmp_path / "mergekit"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                   lora_merge_cache=str(tmp_path / "cache")))
    want = tensors(tmp_path / "mergekit")
    (tmp_path / "c.json").write_text(json.dumps(config))
    done = subprocess.run([str(Path(sys.executable).parent / "weightavg"), "merge", live_server.address,
                           str(tmp_path / "c.json"), str(tmp_path / "out"), "--batch-bytes", "8KiB"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = tensors(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL, err_msg=name)
    plain = {**config, "models": [{"model": str(checkpoints["a"]), "parameters": {"weight": 0.7}},
                                  {"model": str(checkpoints["b"]), "parameters": {"weight": 0.5}}]}
    unadapted = mergekit(plain, tmp_path / "plain")
    assert np.abs(got["model.layers.0.self_attn.q_proj.weight"] - unadapted["model.layers.0.self_attn.q_proj.weight"]).max() > 1e-3


def test_model_references_in_mergekits_mapping_form_read_as_its_names(
    client: Client, checkpoints: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """mergekit's ModelReference mappings ({model: {path, revision}, lora: ...}, which mergekit itself
    writes for a path with a space) name what its string form names: mergekit reads each mapping as
    the string given here, and the merge writes the bytes of the same config in string form. A
    mapping that is no reference, or asks for override_architecture, is refused."""
    from mergekit.common import ModelReference

    spaced = tmp_path / "model a"  # a path mergekit writes in the mapping form
    shutil.copytree(checkpoints["a"], spaced)
    strings = {"merge_method": "ties", "base_model": str(checkpoints["base"]), "parameters": {"density": 0.6},
               "models": [{"model": f"{spaced}+{adapters['attn']}", "parameters": {"weight": 0.7}},
                          {"model": str(checkpoints["b"]), "parameters": {"weight": 0.5}}]}
    mapped = {**strings, "base_model": {"model": {"path": str(checkpoints["base"])}},
              "models": [{"model": {"model": {"path": str(spaced)}, "lora": {"path": str(adapters["attn"])}},
                          "parameters": {"weight": 0.7}},
                         {"model": {"model": str(checkpoints["b"])}, "parameters": {"weight": 0.5}}]}
    named = configs.named_references(mapped)
    assert named == strings
    for ref in (mapped["base_model"], *(m["model"] for m in mapped["models"]),
                {"model": {"path": "org/x", "revision": "v2"}, "lora": {"path": "org/y", "revision": "r"}}):
        assert configs._reference_text(ref, "test") == str(ModelReference.model_validate(ref))
    want = configs.merge_checkpoints(client, strings, tmp_path / "strings").read_bytes()
    assert configs.merge_checkpoints(client, mapped, tmp_path / "mapped").read_bytes() == want
    sliced = configs.named_references({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": {"model": {"path": "m", "revision": "r"}}, "layer_range": [0, 2]}]}],
        "tokenizer": {"source": {"model": "t"}, "tokens": {"<x>": {"source": {"model": "u"}},
                                                          "<y>": {"source": {"kind": "model_token", "model": {"model": "v"},
                                                                             "token": "a"}}}}})
    assert sliced["slices"][0]["sources"][0]["model"] == "m@r" and sliced["tokenizer"]["source"] == "t"
    assert sliced["tokenizer"]["tokens"] == {"<x>": {"source": "u"},
                                             "<y>": {"source": {"kind": "model_token", "model": "v", "token": "a"}}}
    for bad, message in (({"model": "m", "override_architecture": "X"}, "override_architecture is not supported"),
                         ({"path": "m"}, "is not a model reference")):
        with pytest.raises(ValueError, match=message):
            configs.named_references({**strings, "base_model": bad})


def hub_cache(root: Path, repos: Mapping[str, Path]) -> Path:
    """A Hugging Face cache (HF_HUB_CACHE's layout) holding each repository ("org/name" or
    "org/name@revision") as the Hub's client leaves a download: refs/REVISION naming a commit,
    snapshots/COMMIT/ its files (copies of the local directory given)."""
    for i, (repo, source) in enumerate(repos.items()):
        name, _, revision = repo.partition("@")
        folder = root / ("models--" + name.replace("/", "--"))
        commit = f"{i + 1:040x}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / (revision or "main")).write_text(commit)
        shutil.copytree(source, folder / "snapshots" / commit)
    return root


def test_weightavg_merge_takes_hugging_face_ids_as_mergekit_does(
    live_server: LiveServer, checkpoints: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Models, a revision and LoRA adapters named by Hugging Face repository IDs (org/name@revision+
    org/adapter), read through huggingface_hub from its cache (HF_HUB_CACHE, or mergekit-yaml's
    --transformers-cache; HF_HUB_OFFLINE: the Hub is not reached here): the command writes the bytes
    it writes for the same models named by their directories, and the base's config beside them."""
    cache = hub_cache(tmp_path / "hub", {"org/base": checkpoints["base"], "org/a@v1": checkpoints["a"],
                                         "org/b": checkpoints["b"], "org/attn": adapters["attn"],
                                         "org/rslora": adapters["rslora"]})
    local = {"merge_method": "ties", "base_model": str(checkpoints["base"]), "parameters": {"density": 0.6},
             "models": [{"model": f"{checkpoints['a']}+{adapters['attn']}", "parameters": {"weight": 0.7}},
                        {"model": f"{checkpoints['b']}+{adapters['rslora']}", "parameters": {"weight": 0.5}}]}
    hub = {**local, "base_model": "org/base",
           "models": [{"model": "org/a@v1+org/attn", "parameters": {"weight": 0.7}},
                      {"model": "org/b+org/rslora", "parameters": {"weight": 0.5}}]}
    for name, config, cache_given in (("local", local, {}), ("hub", hub, {"HF_HUB_CACHE": str(cache)}),
                                      ("flag", hub, {"flags": ["--transformers-cache", str(cache)]})):
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"),
               **{k: v for k, v in cache_given.items() if k != "flags"}}
        done = subprocess.run([str(Path(sys.executable).parent / "weightavg"), "merge", live_server.address,
                               str(tmp_path / f"{name}.json"), str(tmp_path / name), *cache_given.get("flags", [])],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
    for name in ("hub", "flag"):  # the cache from HF_HUB_CACHE, then from mergekit-yaml's --transformers-cache
        assert (tmp_path / name / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
        assert (tmp_path / name / "config.json").read_text() == (checkpoints["base"] / "config.json").read_text()


def test_hugging_face_ids_that_cannot_be_read_are_refused_with_what_to_do(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository the cache lacks while the Hub cannot be reached, one that holds only pickled
    weights (pytorch_model.bin: never loaded), and a name with two revisions: each refused before
    anything is uploaded (no client is needed to get that far), saying what to do. Local paths are
    never taken for repository IDs."""
    import huggingface_hub

    from weightavg import hub

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", {"org/pickled": pickled})))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name, message in (("org/absent", "it is not in the Hugging Face cache and the Hub cannot be reached"),
                          ("org/pickled", "has no .safetensors files on the Hub (only pickled weights"),
                          ("org/a@v1@v2", "at most one @revision")):
        config = {"merge_method": "linear", "models": [{"model": str(checkpoints["a"]), "parameters": {"weight": 1}},
                                                       {"model": name, "parameters": {"weight": 1}}]}
        with pytest.raises(ValueError, match=re.escape(message)):
            configs.merge_checkpoints(None, config, tmp_path / "out")  # type: ignore[arg-type]  # refused before any call
    assert not (tmp_path / "out").exists()
    tokenizer = configs._local_or_downloaded("org/pickled", {}, "tokenizer source", hub.TOKENIZER_FILES)
    assert (tokenizer / "config.json").is_file()  # a tokenizer source needs no weights
    assert [hub.is_repo_id(n) for n in ("org/name", "org/name@v1.0", "Org-1/my_model.v2")] == [True] * 3
    assert not any(hub.is_repo_id(n) for n in ("./org/name", "/org/name", "org/name/sub", "name", "org/x.safetensors",
                                               "../x", "org/..", str(checkpoints["a"])))


def test_adapters_that_are_not_applied_are_refused_with_the_reason(
    checkpoints: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """DoRA, per-module alphas, another peft_type, a pickled adapter, a module the base lacks and
    factors that do not fit: each an AdapterError naming it, before anything is merged; a name with
    two adapters, or an adapter that is not there, a ValueError from the command's reading."""
    base = tensors(checkpoints["a"])
    source = adapters["attn"]
    config = json.loads((source / "adapter_config.json").read_text())
    weights = load_file(str(source / "adapter_model.safetensors"))

    def damaged(name: str, changes: dict[str, Any], tensors_: dict[str, torch.Tensor] | None = None) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        save_file(tensors_ if tensors_ is not None else weights, str(path / "adapter_model.safetensors"))
        return path

    key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    for path, message in (
        (damaged("dora", {"use_dora": True}), "DoRA"),
        (damaged("alpha", {"alpha_pattern": {"q_proj": 4}}), "alpha_pattern"),
        (damaged("ia3", {"peft_type": "IA3"}), "only LoRA adapters"),
        (damaged("other", {}, {**weights, **{k.replace("layers.0", "layers.9"): weights[k].clone()
                                             for k in (key, key.replace("lora_A", "lora_B"))}}), "does not hold"),
        (damaged("shape", {}, {**weights, key: weights[key][:, :3].contiguous()}), "do not make an update"),
        (damaged("half", {}, {k: v for k, v in weights.items() if k != key}), "without its other factor"),
    ):
        with pytest.raises(lora.AdapterError, match=message):
            lora.apply(base, path)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lora.AdapterError, match="pickled"):
        lora.apply(base, tmp_path / "pickled")
    for name, message in ((f"{checkpoints['a']}+{source}+{source}", "at most one LoRA adapter"),
                          (f"{checkpoints['a']}+{tmp_path / 'missing'}", "LoRA adapter .* is not a local directory")):
        with pytest.raises(ValueError, match=message):
            configs.merge_checkpoints(None, {"merge_method": "linear", "models": [  # type: ignore[arg-type]
                {"model": name, "parameters": {"weight": 1.0}}]}, tmp_path / "never")


def test_a_lora_adapter_on_a_bfloat16_model_is_rounded_once_as_peft_does(
    checkpoints: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """On a bfloat16 model PEFT keeps the adapter in float32 and computes the update there; a linear
    layer's is added to the bfloat16 weight in place (one rounding), an embedding's rounded to bfloat16
    first (two). weightavg.lora does the same, so the adapted tensors agree to the bit, or by one
    bfloat16 step where the two float32 products differ in their last bit at a rounding tie."""
    from peft import PeftModel

    LlamaForCausalLM.from_pretrained(str(checkpoints["a"]), dtype=torch.bfloat16).save_pretrained(str(tmp_path / "a16"))
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(tmp_path / "a16"), dtype=torch.bfloat16),
                                       str(adapters["attn"])).merge_and_unload().state_dict()
    got = lora.apply(checkpoints_read(tmp_path / "a16"), adapters["attn"])
    same = 0
    for name in got.updates:
        want = merged[name].float().numpy()
        mine = got[name].astype(np.float32)
        assert got[name].dtype == lora_bf16(), name
        np.testing.assert_allclose(mine, want, rtol=2**-7, atol=0, err_msg=name)
        same += int(np.sum(mine == want))
    assert same >= sum(got[name].size for name in got.updates) - 3  # bit for bit but for a rare rounding tie


def checkpoints_read(path: Path) -> dict[str, np.ndarray]:
    from weightavg import checkpoints as files

    return files.read(path)


def lora_bf16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


SLICED: dict[str, Callable[[dict[str, Path]], dict[str, Any]]] = {
    "passthrough: a's first three layers, then b's last three (six in all)": lambda p: {
        "merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(p["a"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(p["b"]), "layer_range": [1, 4]}]}]},
    "slerp by slices, a t gradient placed within its slice": lambda p: {
        "merge_method": "slerp", "base_model": str(p["a"]), "parameters": {"t": 0.3}, "slices": [
            {"sources": [{"model": str(p["a"]), "layer_range": [0, 2]}, {"model": str(p["b"]), "layer_range": [0, 2]}],
             "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}]}},
            {"sources": [{"model": str(p["a"]), "layer_range": [2, 4]}, {"model": str(p["b"]), "layer_range": [1, 3]}]},
            {"sources": [{"model": str(p["a"]), "layer_range": [3, 4]}, {"model": str(p["b"]), "layer_range": [3, 4]}],
             "parameters": {"t": [0.2, 0.9]}}]},
    "ties by slices, a base of its own in the second": lambda p: {
        "merge_method": "ties", "base_model": str(p["base"]), "parameters": {"density": 0.5, "weight": 1.0}, "slices": [
            {"sources": [{"model": str(p["base"]), "layer_range": [0, 2]}, {"model": str(p["a"]), "layer_range": [0, 2]},
                         {"model": str(p["b"]), "layer_range": [0, 2]}]},
            {"base_model": str(p["a"]),
             "sources": [{"model": str(p["a"]), "layer_range": [2, 4]},
                         {"model": str(p["b"]), "layer_range": [2, 4], "parameters": {"weight": 0.5}}]}]},
}


@pytest.mark.parametrize("case", list(SLICED))
def test_slices_that_cut_and_stack_layers_merge_as_mergekit_plans_them(
    case: str, live_server: LiveServer, client: Client, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Slices over checkpoint files, through merge_checkpoints (a batch of a few tensors at a time) and
    mergekit's run_merge: the same entries (the output's layers numbered on from slice to slice), each
    within 2e-6; config.json counts the output's layers and transformers loads the result."""
    config = SLICED[case](checkpoints)
    want = mergekit(config, tmp_path / "mergekit")
    before = {handle_id for handle_id, _ in live_server.registry.items()}
    configs.merge_checkpoints(client, config, tmp_path / "out", batch_bytes=4096)
    got = tensors(tmp_path / "out")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL, err_msg=name)
    layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in config["slices"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == layers
    assert json.loads((tmp_path / "mergekit" / "config.json").read_text())["num_hidden_layers"] == layers
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    np.testing.assert_array_equal(loaded[f"model.layers.{layers - 1}.mlp.up_proj.weight"].numpy(),
                                  got[f"model.layers.{layers - 1}.mlp.up_proj.weight"])
    assert {handle_id for handle_id, _ in live_server.registry.items()} == before


def test_slices_that_do_not_fit_the_models_are_refused_before_anything_goes_up(
    live_server: LiveServer, client: Client, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    a, b, base = (str(checkpoints[n]) for n in ("a", "b", "base"))
    before = {handle_id for handle_id, _ in live_server.registry.items()}
    for slices, message in (
        ([{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 3]}]}],
         r"lengths \[2, 3\]"),
        ([{"sources": [{"model": a, "layer_range": [2, 5]}]}], r"layer_range \[2, 5\]; give \[start, end\]"),
        ([{"sources": [{"model": a, "layer_range": [0, 1]}, {"model": a, "layer_range": [1, 2]}]}], "twice"),
        ([{"sources": [{"model": a, "layer_range": [0, 2]}], "residual_weight": 0.5}], "'residual_weight' is not"),
        ([{"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": []}], "slice 1 lists no 'sources'"),
    ):
        with pytest.raises(ValueError, match=message):
            configs.merge_checkpoints(client, {"merge_method": "passthrough", "slices": slices}, tmp_path / "x")
    with pytest.raises(ValueError, match="holds model .*, which the merge reads"):
        configs.merge_checkpoints(client, {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1}}]},
                                  checkpoints["a"])
    with pytest.raises(ValueError, match="base model .* is not among its sources"):
        configs.merge_checkpoints(client, {"merge_method": "ties", "base_model": base, "slices": [
            {"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}]}, tmp_path / "x")
    assert {handle_id for handle_id, _ in live_server.registry.items()} == before
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


PLAIN = [*"abcdefghijklmnopqrstuvwxyz", "ab", "cd", "ef", "gh"]
"""The base tokenizer's BPE vocabulary (ids 0-29); `<s>` and `</s>` are its added tokens (30, 31)."""


def save_tokenizer(directory: Path, plain: list[str], added: list[tuple[str, bool]]) -> None:
    """A fast BPE tokenizer over `plain` with `added` (content, special) tokens, saved as transformers
    saves one (tokenizer.json, tokenizer_config.json)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(plain)}, merges=[("a", "b"), ("c", "d")]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    for content, special in added:
        token = AddedToken(content, special=special, normalized=not special)
        (bpe.add_special_tokens if special else bpe.add_tokens)([token])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(str(directory))


def save_with_vocabulary(source: Path, directory: Path, rows_from: list[int | None], seed: int) -> None:
    """The checkpoint at `source` with its vocabulary tensors' rows rearranged: row i of the new model is
    the source's row `rows_from[i]`, or a random row for None (a token its fine-tune added)."""
    model = LlamaForCausalLM.from_pretrained(str(source))
    config = model.config
    config.vocab_size = len(rows_from)
    grown = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        state = model.state_dict()
        for name, value in grown.state_dict().items():
            old = state[name]
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                value.copy_(torch.stack([old[i] if i is not None else torch.randn(old.shape[1], generator=g)
                                         for i in rows_from]))
            else:
                value.copy_(old)
    grown.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def vocabularies(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base with its tokenizer; "chat", model a fine-tuned with two added chat tokens (rows 32, 33);
    "extra", model b without the base's plain token "gh" and with "zz" in its place (id 29), and the
    added tokens `<pad>` and `<|im_end|>` after `<s>` and `</s>`: vocabularies of 32, 34 and 34 tokens,
    where a token lacks from one model, two, or the base."""
    root = tmp_path_factory.mktemp("vocabularies")
    paths = {"base": root / "base", "chat": root / "chat", "extra": root / "extra"}
    shutil.copytree(checkpoints["base"], paths["base"])
    save_tokenizer(paths["base"], PLAIN, [("<s>", True), ("</s>", True)])
    save_with_vocabulary(checkpoints["a"], paths["chat"], [*range(32), None, None], seed=1)
    save_tokenizer(paths["chat"], PLAIN, [("<s>", True), ("</s>", True), ("<|im_start|>", True), ("<|im_end|>", True)])
    save_with_vocabulary(checkpoints["b"], paths["extra"], [*range(29), None, 30, 31, None, None], seed=2)
    save_tokenizer(paths["extra"], [*PLAIN[:-1], "zz"], [("<s>", True), ("</s>", True), ("<pad>", False),
                                                   ("<|im_end|>", True)])
    return paths


ALIGNED: dict[str, Callable[[dict[str, Path]], dict[str, Any]]] = {
    "ties, union of three vocabularies": lambda p: {
        "merge_method": "ties", "base_model": str(p["base"]), "tokenizer_source": "union",
        "parameters": {"density": 0.5, "weight": 1.0},
        "models": [{"model": str(p["chat"])}, {"model": str(p["extra"])}]},
    "linear over the base's vocabulary": lambda p: {
        "merge_method": "linear", "base_model": str(p["base"]), "tokenizer": {"source": "base"},
        "models": [{"model": str(p["extra"]), "parameters": {"weight": 1.0}},
                   {"model": str(p["chat"]), "parameters": {"weight": 3.0}},
                   {"model": str(p["base"]), "parameters": {"weight": 0.5}}]},
    "task arithmetic, a model's vocabulary, tokens given and padded": lambda p: {
        "merge_method": "task_arithmetic", "base_model": str(p["base"]),
        "tokenizer": {"source": str(p["extra"]), "pad_to_multiple_of": 8, "tokens": {
            "<|im_end|>": {"source": str(p["chat"]), "force": True},
            "<new>": {"source": {"kind": "zero"}},
            "<think>": {"source": {"kind": "model_token", "model": str(p["extra"]), "token": "zz"}},
            "<s>": {"source": {"kind": "model_token", "model": str(p["base"]), "token_id": 3}, "force": True}}},
        "models": [{"model": str(p["chat"]), "parameters": {"weight": 0.7}},
                   {"model": str(p["extra"]), "parameters": {"weight": 0.4}}]},
    "union by default (a tokenizer mapping), no base: the mean of the models that have a token": lambda p: {
        "merge_method": "linear", "tokenizer": {},
        "models": [{"model": str(p["extra"]), "parameters": {"weight": 1.0}},
                   {"model": str(p["chat"]), "parameters": {"weight": 1.0}}]},
    "slerp by slices over a union": lambda p: {
        "merge_method": "slerp", "base_model": str(p["chat"]), "tokenizer_source": "union",
        "parameters": {"t": [0.0, 0.5, 1.0]},
        "slices": [{"sources": [{"model": str(p["chat"]), "layer_range": [0, 2]},
                                {"model": str(p["extra"]), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(p["chat"]), "layer_range": [2, 4]},
                                {"model": str(p["extra"]), "layer_range": [2, 4]}]}]},
}


def by_token(directory: Path) -> tuple[dict[str, int], dict[str, np.ndarray], Any]:
    """A merged model's vocabulary (token -> id, as transformers loads it), tensors and tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return tokenizer.get_vocab(), tensors(directory), tokenizer


@pytest.mark.parametrize("case", list(ALIGNED))
def test_vocabularies_are_aligned_as_mergekit_aligns_them(
    case: str, live_server: LiveServer, client: Client, vocabularies: dict[str, Path], tmp_path: Path
) -> None:
    """A config that names a tokenizer, over models whose vocabularies differ (added chat tokens, a
    token that moved rows), through merge_checkpoints a few tensors at a time and through mergekit's
    run_merge: the same tokens, each token's row of the embeddings and the head within 2e-6 (ids
    compared by token: mergekit numbers a union's tokens in set and hash order), the padding rows, every other
    tensor, config.json's vocab_size, and (with a base model: without one, mergekit's tokenizer starts
    from any model) the tokenizers encode alike."""
    config = ALIGNED[case](vocabularies)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mergekit's and transformers' own notes
        run_merge(MergeConfiguration.model_validate({**config, "dtype": "float32"}), str(tmp_path / "mergekit"),
                  options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    before = {handle_id for handle_id, _ in live_server.registry.items()}
    configs.merge_checkpoints(client, config, tmp_path / "out", batch_bytes=4096)
    want_vocab, want, want_tokenizer = by_token(tmp_path / "mergekit")
    got_vocab, got, got_tokenizer = by_token(tmp_path / "out")
    assert sorted(got_vocab) == sorted(want_vocab)
    assert sorted(got) == sorted(want)
    rows = json.loads((tmp_path / "mergekit" / "config.json").read_text())["vocab_size"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == rows
    for name in want:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert got[name].shape == want[name].shape == (rows, 8)
            for token, i in want_vocab.items():
                np.testing.assert_allclose(got[name][got_vocab[token]], want[name][i], rtol=0, atol=TOL,
                                           err_msg=f"{name} {token!r}")
            np.testing.assert_allclose(got[name][len(want_vocab):], want[name][len(want_vocab):], rtol=0, atol=TOL)
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL, err_msg=name)
    assert {handle_id for handle_id, _ in live_server.registry.items()} == before
    LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    if "base_model" not in config:  # mergekit's "base" is then any of the models, from a set
        return
    text = "<s>ab cd zz <|im_start|>hi<|im_end|> <pad> <think>"
    assert got_tokenizer.convert_ids_to_tokens(got_tokenizer(text)["input_ids"]) == \
        want_tokenizer.convert_ids_to_tokens(want_tokenizer(text)["input_ids"])
    assert {t.content: (t.special, t.normalized) for t in got_tokenizer.added_tokens_decoder.values()} == \
        {t.content: (t.special, t.normalized) for t in want_tokenizer.added_tokens_decoder.values()}


def test_a_union_numbers_its_new_tokens_in_the_configs_order(
    client: Client, vocabularies: dict[str, Path], tmp_path: Path
) -> None:
    """The union's new tokens follow the base's: the plain ones, then the added ones, each model's in
    id order, the models in the config's order (mergekit takes them from a Python set, so its order
    changes from run to run; the previous test compares by token)."""
    config = ALIGNED["ties, union of three vocabularies"](vocabularies)
    configs.merge_checkpoints(client, config, tmp_path / "out")
    vocab = by_token(tmp_path / "out")[0]
    assert vocab == {**{t: i for i, t in enumerate(PLAIN)}, "<s>": 30, "</s>": 31, "zz": 32, "<|im_start|>": 33,
                     "<|im_end|>": 34, "<pad>": 35}


def test_the_tokenizer_comes_from_the_model_tokenizer_source_names(
    live_server: LiveServer, client: Client, vocabularies: dict[str, Path], tmp_path: Path
) -> None:
    """Without a tokenizer key the base's tokenizer files are copied as they are; "base" or a model's
    name copies that model's files (nothing appended) and sets config.json's vocab_size to its
    vocabulary; a chat_template is warned about, before anything is merged."""
    models = {}
    for name in ("base", "chat", "extra"):
        models[name] = tmp_path / name
        shutil.copytree(vocabularies[name], models[name])
        (models[name] / "special_tokens_map.json").write_text(json.dumps({"eos_token": f"</{name}>"}))
    config = {"merge_method": "ties", "base_model": str(models["base"]), "parameters": {"density": 0.5, "weight": 1.0},
              "models": [{"model": str(models["chat"])}, {"model": str(models["extra"])}]}
    shutil.copytree(models["chat"], tmp_path / "donor")  # merged for its tokenizer only, as mergekit allows
    models["donor"] = tmp_path / "donor"
    for extra, source, rows in (({"tokenizer_source": str(models["donor"])}, "donor", 34),
                                ({"tokenizer_source": "base"}, "base", 32),
                                ({"tokenizer_source": str(models["extra"])}, "extra", 34),
                                ({"tokenizer": {"source": str(models["chat"])}}, "chat", 34)):
        out = tmp_path / f"out-{source}"
        configs.merge_checkpoints(client, {**config, **extra}, out)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (out / f).read_bytes() == (models[source] / f).read_bytes(), (extra, f)
        written = json.loads((out / "config.json").read_text())
        assert written == {**json.loads((models["base"] / "config.json").read_text()), "vocab_size": rows}
        assert tensors(out)["lm_head.weight"].shape == (rows, 8)
    same = {"merge_method": "linear", "models": [{"model": str(models["base"]), "parameters": {"weight": 1.0}},
                                                 {"model": str(models["base"]), "parameters": {"weight": 2.0}}]}
    configs.merge_checkpoints(client, same, tmp_path / "plain")
    for f in ("tokenizer.json", "special_tokens_map.json", "config.json"):
        assert (tmp_path / "plain" / f).read_bytes() == (models["base"] / f).read_bytes()
    with pytest.warns(UserWarning, match="chat_template 'chatml' is not applied"):
        configs.merge_checkpoints(client, {**config, "tokenizer_source": "base", "chat_template": "chatml"},
                                  tmp_path / "chatml")
    (tmp_path / "chat.json").write_text(json.dumps({**config, "tokenizer_source": "base", "chat_template": "chatml"}))
    done = subprocess.run([str(Path(sys.executable).parent / "weightavg"), "merge", live_server.address,
                           str(tmp_path / "chat.json"), str(tmp_path / "chatml2")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stderr.startswith("weightavg merge: warning: chat_template 'chatml' is not") \
        and done.stderr.count("\n") == 1, done.stderr


TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
OTHER = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def test_a_chat_template_is_written_as_mergekit_writes_it(
    client: Client, vocabularies: dict[str, Path], tmp_path: Path
) -> None:
    """A template's text, and "auto" (the template most models have, here two of three), give the
    written tokenizer mergekit's template, with or without a tokenizer key; a model's template may
    sit in tokenizer_config.json or chat_template.jinja; a nonsense one is refused."""
    from transformers import AutoTokenizer

    models = {}
    for name, template in (("base", None), ("chat", TEMPLATE), ("extra", OTHER)):
        models[name] = tmp_path / name
        shutil.copytree(vocabularies[name], models[name])
        if template is not None:
            (models[name] / "chat_template.jinja").write_text(template)
    config_json = json.loads((models["base"] / "tokenizer_config.json").read_text())
    (models["base"] / "tokenizer_config.json").write_text(json.dumps({**config_json, "chat_template": TEMPLATE + " "}))
    shutil.copytree(models["chat"], tmp_path / "chat2")
    config = {"merge_method": "ties", "base_model": str(models["base"]), "parameters": {"density": 0.5, "weight": 1.0},
              "models": [{"model": str(models["chat"])}, {"model": str(models["extra"])}]}
    same = {"merge_method": "linear", "models": [{"model": str(models["chat"]), "parameters": {"weight": 1.0}},
                                                 {"model": str(tmp_path / "chat2"), "parameters": {"weight": 1.0}}]}
    for i, merged in enumerate(({**same, "chat_template": OTHER + "{# ``` #}"},
                                {**config, "chat_template": "auto", "tokenizer_source": "base"},
                                {**config, "chat_template": "auto", "tokenizer_source": "union"})):
        run_merge(MergeConfiguration.model_validate(merged), str(tmp_path / f"mergekit{i}"),
                  options=MergeOptions(write_model_card=False, quiet=True))
        configs.merge_checkpoints(client, merged, tmp_path / f"out{i}")
        want = AutoTokenizer.from_pretrained(str(tmp_path / f"mergekit{i}")).chat_template
        assert want in (OTHER + "{# ``` #}", TEMPLATE)
        assert AutoTokenizer.from_pretrained(str(tmp_path / f"out{i}")).chat_template == want, merged
        assert json.loads((tmp_path / f"out{i}" / "tokenizer_config.json").read_text())["chat_template"] == want
        assert yaml.safe_load((tmp_path / f"out{i}" / "mergekit_config.yml").read_text()) == merged  # JSON is YAML
    card = (tmp_path / "out0" / "README.md").read_text()  # the config's ``` inside a longer fence
    assert "\n````yaml\n{" in card and card.endswith("}\n````\n")
    with pytest.raises(ValueError, match="chat_template 'hello' is not a template"):
        configs.merge_checkpoints(client, {**same, "chat_template": "hello"}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_weightavg_merge_takes_mergekit_yamls_output_flags(
    live_server: LiveServer, checkpoints: dict[str, Path], vocabularies: dict[str, Path], tmp_path: Path
) -> None:
    """mergekit-yaml's own spellings give what they give there: --out-shard-size in its units (1K is
    1000 bytes: the same shards, the same index), --no-copy-tokenizer (no tokenizer file; a chat
    template the config gives is then left out, with a warning), --no-write-model-card, --random-seed
    (DARE's masks as --seed's); and by default the tokenizer files mergekit copies. A size mergekit
    cannot read is refused as it refuses it."""
    linear = {"merge_method": "linear", "base_model": str(vocabularies["base"]),
              "models": [{"model": str(vocabularies["base"]), "parameters": {"weight": 0.3}},
                         {"model": str(checkpoints["a"]), "parameters": {"weight": 0.7}}]}
    script = str(Path(sys.executable).parent / "weightavg")

    def merge(config: dict[str, Any], out: str, *flags: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / f"{out}.json").write_text(json.dumps(config))
        done = subprocess.run([script, "merge", live_server.address, str(tmp_path / f"{out}.json"), str(tmp_path / out),
                               *flags], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    written = lambda out: {f.name for f in (tmp_path / out).iterdir() if f.is_file()}  # noqa: E731
    for i, (flags, options) in enumerate(((["--out-shard-size", "1K", "--no-copy-tokenizer", "--no-write-model-card"],
                                           MergeOptions(out_shard_size=1000, copy_tokenizer=False, write_model_card=False)),
                                          ([], MergeOptions()))):
        run_merge(MergeConfiguration.model_validate(linear), str(tmp_path / f"mergekit{i}"),
                  options=options.model_copy(update={"quiet": True}))
        merge(linear, f"out{i}", *flags)
        assert written(f"out{i}") == written(f"mergekit{i}") | {"generation_config.json"}, i  # ours copies it always
    index = json.loads((tmp_path / "out0" / "model.safetensors.index.json").read_text())
    theirs = json.loads((tmp_path / "mergekit0" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == theirs["weight_map"] and index["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    assert len(set(index["weight_map"].values())) > 10 and "tokenizer.json" in written("out1")

    noted = merge({**linear, "chat_template": TEMPLATE}, "untemplated", "--no-copy-tokenizer")
    assert "no tokenizer is written" in noted.stderr and not written("untemplated") & {"chat_template.jinja", "tokenizer_config.json"}
    dare = {"merge_method": "dare_ties", "base_model": str(checkpoints["base"]), "parameters": {"density": 0.5},
            "models": [{"model": str(checkpoints["a"]), "parameters": {"weight": 1.0}},
                       {"model": str(checkpoints["b"]), "parameters": {"weight": 1.0}}]}
    merge(dare, "seed", "--seed", "7")
    merge(dare, "random-seed", "--random-seed", "7")
    merge(dare, "other-seed", "--random-seed", "8")
    seeded = [(tmp_path / out / "model.safetensors").read_bytes() for out in ("seed", "random-seed", "other-seed")]
    assert seeded[0] == seeded[1] != seeded[2]
    refused = subprocess.run([script, "merge", live_server.address, str(tmp_path / "out0.json"), str(tmp_path / "x"),
                              "--out-shard-size", "1.5B"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not a size as mergekit writes one" in refused.stderr


def test_vocabularies_that_cannot_be_aligned_are_refused_with_what_to_do(
    live_server: LiveServer, client: Client, vocabularies: dict[str, Path], tmp_path: Path
) -> None:
    """Vocabularies of one length but different tokens without a tokenizer key: a warning, the rows
    merged as they are (as mergekit merges them). Of different lengths: refused, as are a model without tokenizer.json or
    vocab_size, a base tokenizer with tokens beyond its rows, unknown tokenizer keys and token sources:
    ValueError naming the fix, before anything goes up, nothing written."""
    v = {name: str(path) for name, path in vocabularies.items()}
    config = {"merge_method": "linear", "base_model": v["base"],
              "models": [{"model": v["chat"], "parameters": {"weight": 1.0}},
                         {"model": v["extra"], "parameters": {"weight": 1.0}}]}
    broken = tmp_path / "broken"
    shutil.copytree(vocabularies["base"], broken)
    (broken / "tokenizer.json").unlink()
    beyond = tmp_path / "beyond"
    shutil.copytree(vocabularies["base"], beyond)
    loaded = json.loads((beyond / "tokenizer.json").read_text())
    loaded["added_tokens"].append({"id": 32, "content": "<late>", "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True})
    (beyond / "tokenizer.json").write_text(json.dumps(loaded))
    bad: list[tuple[dict[str, Any], str]] = [
        ({**config, "models": [{"model": v["base"], "parameters": {"weight": 1.0}}, *config["models"]]},
         r"'(lm_head|model.embed_tokens).weight' has shape \[32, 8\] .* \[34, 8\] .*name a tokenizer \(tokenizer_source"),
        ({**config, "base_model": str(broken), "tokenizer_source": "base"}, "has no tokenizer.json .* save its fast"),
        ({**config, "base_model": str(beyond), "tokenizer_source": "union"}, "1 token.* at ids 32 and up, beyond its 32"),
        ({**config, "tokenizer": {"source": "base", "pad": 8}}, "tokenizer key 'pad' is not one mergekit has"),
        ({**config, "tokenizer_source": "base", "tokenizer": {}}, "not both"),
        ({**config, "tokenizer_source": "everything"},
         "'everything' is not 'base', 'union', a model of the config, a local directory or a Hugging Face repository ID"),
        ({**config, "tokenizer": {"tokens": {"<x>": {"source": "nobody"}}}}, "'nobody', which is not a model"),
        ({**config, "tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": v["chat"],
                                                                  "token": "<nope>"}}}}}, "'<nope>' is not in model"),
        ({**config, "tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of is 0"),
        ({**config, "tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": v["chat"],
                                                                  "token_id": 99}}}}}, "'<x>' takes its row from model "
         ".*chat', which has no row 99"),
        ({**config, "tokenizer": {"tokens": {"<x>": {"source": v["chat"]}}}}, "'<x>' takes its row from model .*chat', "
         "which has no such token"),
    ]
    with pytest.warns(UserWarning, match=r"vocabularies differ .*'gh' is token 29 of .*chat' but not in .*extra'.*"
                                         "merged as they are; name a tokenizer"):
        configs.merge_checkpoints(client, config, tmp_path / "misaligned")
    before = {handle_id for handle_id, _ in live_server.registry.items()}
    for i, (wrong, message) in enumerate(bad):
        with pytest.raises(ValueError, match=message):
            configs.merge_checkpoints(client, wrong, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists() or not any((tmp_path / f"out{i}").iterdir())
    assert {handle_id for handle_id, _ in live_server.registry.items()} == before


def test_a_tied_model_gives_its_token_embeddings_for_the_head_another_model_holds(
    live_server: LiveServer, client: Client, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A base saved with tied word embeddings (no lm_head.weight in its file) merged with fine-tunes
    that hold their own head: the base's embed_tokens stands in for its head, as mergekit's
    architecture tables tie them, and every tensor equals mergekit's run_merge; where no model
    holds a head there is none in the output either."""
    tied = tmp_path / "tied"
    model = LlamaForCausalLM.from_pretrained(str(checkpoints["base"]))
    model.config.tie_word_embeddings = True
    tied_model = LlamaForCausalLM(model.config)
    tied_model.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    tied_model.tie_weights()
    tied_model.save_pretrained(str(tied))
    assert "lm_head.weight" not in tensors(tied)
    config = {"merge_method": "ties", "base_model": str(tied), "parameters": {"density": 0.5, "weight": 1.0},
              "models": [{"model": str(checkpoints["a"])}, {"model": str(checkpoints["b"])}]}
    want = mergekit(config, tmp_path / "mergekit")
    before = {handle_id for handle_id, _ in live_server.registry.items()}
    configs.merge_checkpoints(client, config, tmp_path / "out", batch_bytes=4096)
    got = tensors(tmp_path / "out")
    assert sorted(got) == sorted(want) and "lm_head.weight" in got
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL, err_msg=name)
    both = {"merge_method": "linear", "models": [{"model": str(tied), "parameters": {"weight": 1.0}},
                                                 {"model": str(tied), "parameters": {"weight": 2.0}}]}
    configs.merge_checkpoints(client, both, tmp_path / "both")
    assert "lm_head.weight" not in tensors(tmp_path / "both")
    assert {handle_id for handle_id, _ in live_server.registry.items()} == before


def test_a_model_the_call_does_not_read_is_not_uploaded(
    client: Client, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """slerp of a and b names a as its base and reads two dictionaries, so a merge in one batch uploads
    two; a linear merge with a base_model it ignores uploads its two models, not the base."""
    create = "/weightavg.v1.WeightAveragingService/CreateDictionary"
    for config in (CASES["slerp, t gradients for attention and the MLPs"][0](checkpoints),
                   {"merge_method": "linear", "base_model": str(checkpoints["base"]),
                    "models": [{"model": str(checkpoints["a"]), "parameters": {"weight": 1.0}},
                               {"model": str(checkpoints["b"]), "parameters": {"weight": 2.0}}]}):
        before = client.stats()["methods"].get(create, {}).get("count", 0)
        configs.merge_checkpoints(client, config, tmp_path / str(config["merge_method"]))
        assert client.stats()["methods"][create]["count"] - before == 2, config["merge_method"]
