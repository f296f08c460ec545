"""LoRA adapters applied to a checkpoint's tensors, as PEFT's `merge_and_unload` applies them: what a
mergekit config means by a model named `base+adapter` (mergekit loads the base, applies the adapter
with PEFT and merges the result).

Why here, and lazily: a merge reads its models a batch of tensors at a time (`mergekit.merge_checkpoints`),
so the adapted model is a mapping whose tensors are made when read, each the base's tensor plus its
low-rank update, and a model of many GB is never adapted whole in memory. Nothing in the adapter runs:
its `adapter_config.json` is read as JSON and its weights as a safetensors file (`checkpoints`).

The update, PEFT's for a linear layer: W + (B @ A) * scaling, scaling = lora_alpha / r (lora_alpha /
sqrt(r) with `use_rslora`), r the rank of that module's A; for an embedding, W + (B @ A).T * scaling
(PEFT's lora_embedding_A and _B). B @ A is computed in float32 (PEFT keeps a half-precision model's
adapter in float32); a linear layer's update is added to W in float32 and rounded once to W's dtype
(PEFT's in-place `weight += delta`), an embedding's is rounded to W's dtype first and then added
(PEFT's `Embedding.merge`: `weight += delta.to(dtype)`); where the adapter saved an
embedding's own weight (PEFT's `save_embedding_layers`), that weight is the W updated. What PEFT can
also save and
this does not apply (DoRA's magnitudes, per-module alphas, transposed Conv1D weights, convolution
adapters, LoRA biases, whole replaced modules) is refused with its name rather than left out.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import checkpoints

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""What PEFT puts before the base model's own module names in an adapter's keys."""
PARTS = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
         ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True), ".base_layer.weight": ("W", True)}
"""An adapter key's ending -> which part it is (a factor, or "W": the module's own weight, which PEFT
saves beside an embedding's factors and loads over the base's), and whether its module is an embedding."""
REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora) rescales each column by a magnitude vector",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2's Conv1D weights) transposes the update",
    "alpha_pattern": "alpha_pattern gives modules their own lora_alpha",
    "modules_to_save": "modules_to_save replaces whole modules",
    "lora_bias": "lora_bias trains a bias in lora_B",
}
"""adapter_config.json settings (when set) whose adapters are refused, and what they do."""


class AdapterError(ValueError):
    """An adapter directory that is not a PEFT LoRA adapter this client applies."""


@dataclass(frozen=True)
class Update:
    """One module's low-rank update: its factors and how they combine, and the weight they update where
    the adapter saved one (an embedding's, which PEFT loads in place of the base's)."""

    a: npt.NDArray[Any]
    b: npt.NDArray[Any]
    scaling: float
    embedding: bool
    weight: npt.NDArray[Any] | None = None

    def delta(self) -> npt.NDArray[np.float32]:
        """(B @ A) * scaling in float32, transposed for an embedding (PEFT's `get_delta_weight`)."""
        product = self.b.astype(np.float32) @ self.a.astype(np.float32)
        return (product.T if self.embedding else product) * np.float32(self.scaling)


class Adapted(Mapping[str, npt.NDArray[Any]]):
    """A checkpoint's tensors with a LoRA adapter applied, each made when read (the base's own array
    where the adapter does not touch it)."""

    def __init__(self, base: Mapping[str, npt.NDArray[Any]], updates: Mapping[str, Update]) -> None:
        self.base = base
        self.updates = updates

    def unmade(self, name: str) -> npt.NDArray[Any]:
        """The tensor's shape and dtype without making it: the base's own array (an update keeps both)."""
        return self.base[name]

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        update = self.updates.get(name)
        if update is None:
            return self.base[name]
        weight = self.base[name]
        if update.weight is not None:  # loaded over the base's, in its dtype (PEFT copies it into the module)
            weight = update.weight.astype(weight.dtype)
        work = np.float64 if weight.dtype == np.float64 else np.float32  # where torch adds half types
        delta: npt.NDArray[Any] = update.delta()
        if update.embedding:  # PEFT's Embedding.merge casts the update to the weight's dtype first
            delta = delta.astype(weight.dtype)
        adapted: npt.NDArray[Any] = (weight.astype(work) + delta.astype(work)).astype(weight.dtype)
        return adapted

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def apply(base: Mapping[str, npt.NDArray[Any]], adapter: str | os.PathLike[str]) -> Adapted:
    """The base checkpoint's tensors with the LoRA adapter in directory `adapter` applied; AdapterError
    when the adapter is not one this applies, or names a module the base lacks or a factor whose shape
    does not fit it."""
    root = Path(adapter)
    config = _config(root)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"{root} has no {WEIGHTS_FILE} (only safetensors adapters are read; a pickled "
                           "adapter_model.bin must be converted with the safetensors package first)")
    alpha, rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora", False))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterError(f"{root / CONFIG_FILE}: lora_alpha is {alpha!r}; give a number")
    factors: dict[str, dict[str, npt.NDArray[Any]]] = {}
    kinds: dict[str, bool] = {}
    for key, array in checkpoints.read(weights).items():
        module, part, embedding = _split(root, key)
        factors.setdefault(module, {})[part] = array
        kinds[module] = kinds.get(module, False) or (embedding and part != "W")
    updates: dict[str, Update] = {}
    for module, pair in factors.items():
        name = f"{module}.weight"
        given = sorted(set(pair) & {"A", "B"})
        if len(given) == 1:
            raise AdapterError(f"{root}: module {module!r} has lora_{given[0]} without its other factor")
        if not given:
            raise AdapterError(f"{root}: module {module!r} saves its weight without LoRA factors")
        if name not in base:
            raise AdapterError(f"{root}: the adapter changes {name!r}, which the base model does not hold "
                               "(an adapter trained on another model?)")
        saved = pair.get("W")
        if saved is not None and saved.shape != base[name].shape:
            raise AdapterError(f"{root}: the adapter's {name!r} has shape {tuple(saved.shape)}, the base's "
                               f"{tuple(base[name].shape)} (a resized vocabulary is not applied)")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0] if a.ndim == 2 else -1
        shape = (b.shape[0], a.shape[1]) if a.ndim == 2 and b.ndim == 2 else None
        if kinds[module] and shape is not None:
            shape = shape[::-1]
        if rank <= 0 or b.ndim != 2 or b.shape[1] != rank or shape != base[name].shape:
            raise AdapterError(f"{root}: module {module!r}: factors A {tuple(a.shape)} and B {tuple(b.shape)} do "
                               f"not make an update of {name!r}'s shape {tuple(base[name].shape)}")
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        updates[name] = Update(a, b, float(scaling), kinds[module], saved)
    if not updates:
        raise AdapterError(f"{root}: the adapter holds no LoRA factors")
    return Adapted(base, updates)


def _config(root: Path) -> dict[str, Any]:
    """adapter_config.json read as data and checked: a LoRA adapter without the settings refused."""
    path = root / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{root} is no PEFT adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} holds no JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterError(f"{path}: peft_type {kind!r}; only LoRA adapters are applied")
    for key, what in REFUSED_OPTIONS.items():
        if config.get(key):
            raise AdapterError(f"{path}: {what}, which is not applied here; merge the adapter with PEFT's "
                               "merge_and_unload first and name the merged model")
    return config


def _split(root: Path, key: str) -> tuple[str, str, bool]:
    """An adapter key as (the base's module name, "A" or "B", whether an embedding's)."""
    for ending, (part, embedding) in PARTS.items():
        if key.endswith(ending):
            return key[: -len(ending)].removeprefix(PREFIX), part, embedding
    raise AdapterError(f"{root}: adapter tensor {key!r} is not a LoRA factor (lora_A, lora_B, lora_embedding_A or "
                       "_B); adapters that also save biases, magnitudes or whole modules are not applied here")
