"""mergekit configurations on the server: the dict a mergekit YAML loads to (`yaml.safe_load`) becomes
one `Client.merge` call over dictionaries already on the server, with mergekit 0.1.5's meaning.

Why: teams keep their merges as mergekit configs; re-typing one as weights, densities and patterns is
where a mistake slips in. `call` resolves the config the way mergekit's planner does, tensor
by tensor: each parameter from the model's own `parameters`, then the config's; a list of
`{filter, value}` picks the first whose filter is contained in the tensor's name (no filter, or "*",
matches all); a list of numbers is a gradient over the layers, left to the server, which places each
tensor as mergekit does (`merging.layer_fractions`), or evaluated here where a call covers part of
a model (`call`'s `layers`; nuslerp's weights always, since their ratio is its t). The entries that
resolve alike form one group; the largest group takes the call's own arguments, each other group a
`per_tensor` pattern: "*f*" where a filter f picks out exactly that group, the entries' own
(escaped) names otherwise.

Nothing in a config runs: it is read as data, and only the keys below are understood. Anything else
mergekit would act on (other methods, parameters the server has no counterpart for; over
dictionaries, slices that cut or stack layers, which `merge_checkpoints` builds from the files) is
refused with ValueError naming it, rather than merged differently.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from . import checkpoints, hub, lora, vocabulary
from ._errors import ResourceExhaustedError

if TYPE_CHECKING:
    from ._client import Client, HandleLike
    from ._records import Handle

Setting = Any
"""A parameter as a config gives it: a number or bool, a list of numbers (a gradient), or a list of
{"filter": str, "value": setting} conditions."""
Resolved = float | bool | tuple[float, ...]
"""A setting for one tensor, its filters applied: a number, a bool, or a gradient the server evaluates."""


@dataclass(frozen=True)
class MethodRule:
    """How a mergekit method maps onto the server's: the server method, the shared parameters it takes
    (mergekit name -> server option, "" for one with no effect on the numbers, and mergekit's
    default), the per-model ones, and fixed options."""

    method: str
    shared: Mapping[str, tuple[str, Any]]
    per_model: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    one_for_all: Mapping[str, Any] = field(default_factory=dict)
    """Per-model parameters (name -> mergekit's default) the server takes as one option for every
    model: each tensor's value must be the same for all of them."""
    whole: tuple[str, ...] = ()
    """Shared parameters the server takes as integers (a config's 10 or 10.0 both mean 10)."""


_TASK = {"lambda": ("lam", 1.0), "int8_mask": ("", False)}
"""Shared by mergekit's task-vector methods; int8_mask only changes how mergekit stores its masks.
Where mergekit rescales (`rescale`), it matches the L1 norm: rescale_norm "l1" here."""

RULES: dict[str, MethodRule] = {
    "linear": MethodRule("linear", {"normalize": ("normalize", True)}, ("weight",)),
    "slerp": MethodRule("slerp", {"t": ("t", None)}),
    "task_arithmetic": MethodRule(
        "task_arithmetic", {**_TASK, "normalize": ("normalize", False), "rescale": ("", False)}, ("weight",)),
    "ties": MethodRule("ties", {**_TASK, "normalize": ("normalize", True), "rescale": ("rescale", False)},
                       ("weight", "density"), {"rescale_norm": "l1"}),
    "dare_linear": MethodRule("dare", {**_TASK, "normalize": ("normalize", False), "rescale": ("rescale", True)},
                              ("weight", "density"), {"consensus": False, "rescale_norm": "l1"}),
    "dare_ties": MethodRule("dare", {**_TASK, "normalize": ("normalize", False), "rescale": ("rescale", True)},
                            ("weight", "density"), {"consensus": True, "rescale_norm": "l1"}),
    "della": MethodRule("della", {**_TASK, "normalize": ("normalize", True), "rescale": ("rescale", True)},
                        ("weight", "density"), {"consensus": True, "rescale_norm": "l1"}, {"epsilon": 0.15}),
    "della_linear": MethodRule("della", {**_TASK, "normalize": ("normalize", False), "rescale": ("rescale", True)},
                               ("weight", "density"), {"consensus": False, "rescale_norm": "l1"}, {"epsilon": 0.15}),
    "breadcrumbs": MethodRule("breadcrumbs", {**_TASK, "normalize": ("normalize", False),
                                              "rescale": ("rescale", False)},
                              ("weight", "density"), {"consensus": False, "rescale_norm": "l1"}, {"gamma": 0.01}),
    "breadcrumbs_ties": MethodRule("breadcrumbs", {**_TASK, "normalize": ("normalize", False),
                                                   "rescale": ("rescale", False)},
                                   ("weight", "density"), {"consensus": True, "rescale_norm": "l1"}, {"gamma": 0.01}),
    "model_stock": MethodRule("model_stock", {"filter_wise": ("filter_wise", False)}),
    "multislerp": MethodRule("multislerp", {"normalize_weights": ("normalize", True)}, ("weight",)),
    "nuslerp": MethodRule("slerp", {"nuslerp_flatten": ("", True), "nuslerp_row_wise": ("", False)}, ("weight",),
                          {"threshold": 1.0}),
    "karcher": MethodRule("karcher", {"max_iter": ("max_iter", 10), "tol": ("tol", 1e-5)}, whole=("max_iter",)),
    "sce": MethodRule("sce", {"select_topk": ("select_topk", 1.0), "int8_mask": ("", False)}),
    "nearswap": MethodRule("nearswap", {"t": ("t", None)}),
    "ram": MethodRule("ram", {"epsilon": ("epsilon", 1e-5)}),
    "ramplus_tl": MethodRule("ram", {"r": ("r", 0.1), "alpha": ("alpha", 0.2), "epsilon": ("epsilon", 1e-5)}),
    "arcee_fusion": MethodRule("arcee_fusion", {}),
    "passthrough": MethodRule("linear", {}, ("scale",), {"normalize": False}),
}
"""The mergekit methods the server has, with mergekit 0.1.5's defaults (its registry's
GeneralizedTaskArithmeticMerge entries; dare's rescale is its L1-norm rescale)."""

IGNORED_KEYS = ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name")
"""Top-level keys about mergekit's output files, not the numbers: the server computes in float32 (float64
where an entry is) and keeps the base's dtype; `merge_checkpoints` reads them for the files it writes
(the cast, the output's vocabulary and tokenizer)."""


@dataclass(frozen=True)
class MergeCall:
    """One `Client.merge` call: its method, dictionaries, base, weights, densities, per-tensor
    overrides and options (`Client.merge`'s arguments)."""

    method: str
    dicts: list[HandleLike]
    base: HandleLike | None
    weights: list[float | tuple[float, ...]] | None
    densities: list[float | tuple[float, ...]] | None
    per_tensor: dict[str, dict[str, Any]]
    options: dict[str, Any]

    def run(self, client: Client) -> Handle:
        """The merge on the server: a new dictionary."""
        return client.merge(self.method, self.dicts, base=self.base, weights=self.weights, densities=self.densities,
                            per_tensor=self.per_tensor, **self.options)


def merge(client: Client, config: Mapping[str, Any], models: Mapping[str, HandleLike], **options: Any) -> Handle:
    """Merge as a mergekit config says, over dictionaries on the server: `models` maps each model the
    config names to its handle. Extra `options` go to the call (e.g. seed for dare_*: mergekit draws
    its masks from torch's global generator, the server from a seeded one, so DARE's masks differ).

    Example:
        config = yaml.safe_load(open("ties.yml"))
        merged = mergekit.merge(c, config, {"org/base": b, "org/a": d1, "org/b": d2})
    """
    config = named_references(config)
    first = _first_model(config)
    if first not in models:
        raise ValueError(f"model {first!r} of the config has no handle; give models={{{first!r}: handle, ...}}")
    return call(config, models, _entry_names(client, models[first]), **options).run(client)


def named_references(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with every model reference in mergekit's mapping form (`{"model": {"path": P,
    "revision": R}, "lora": {"path": Q}}`, or `{"model": P}`) written in its string form ("P@R+Q"),
    the form the rest of this module reads and the names `models` and `paths` are keyed by. mergekit
    writes the mapping form itself where a path holds a space or a quote (its mergekit_config.yml).
    References sit in `models` and slices' `sources` (as `model`), `base_model` (also a slice's),
    `tokenizer_source`, `tokenizer.source` and the tokens' sources (also a model_token's `model`).
    ValueError for a mapping that is no reference (or asks for `override_architecture`)."""
    def ref(value: Any, where: str) -> Any:
        return value if not isinstance(value, Mapping) else _reference_text(value, where)

    out = dict(config)
    for key in ("base_model", "tokenizer_source"):
        if key in out:
            out[key] = ref(out[key], key)
    if isinstance(out.get("models"), list):
        out["models"] = [{**m, "model": ref(m["model"], "models")} if isinstance(m, Mapping) and "model" in m else m
                         for m in out["models"]]
    if isinstance(out.get("slices"), list):
        out["slices"] = [_named_slice(piece, ref) if isinstance(piece, Mapping) else piece for piece in out["slices"]]
    tokenizer = out.get("tokenizer")
    if isinstance(tokenizer, Mapping):
        tokenizer = dict(tokenizer)
        if isinstance(tokenizer.get("source"), Mapping):
            tokenizer["source"] = ref(tokenizer["source"], "tokenizer.source")
        if isinstance(tokenizer.get("tokens"), Mapping):
            tokenizer["tokens"] = {token: _named_token(spec, ref) for token, spec in tokenizer["tokens"].items()}
        out["tokenizer"] = tokenizer
    return out


def _named_slice(piece: Mapping[str, Any], ref: Callable[[Any, str], Any]) -> dict[str, Any]:
    named = dict(piece)
    if "base_model" in named:
        named["base_model"] = ref(named["base_model"], "slices' base_model")
    if isinstance(named.get("sources"), list):
        named["sources"] = [{**src, "model": ref(src["model"], "slices' sources")}
                            if isinstance(src, Mapping) and "model" in src else src for src in named["sources"]]
    return named


def _named_token(spec: Any, ref: Callable[[Any, str], Any]) -> Any:
    """A `tokenizer.tokens` entry with its source's model references in string form: the source may
    be a reference itself, or a {kind: model_token, model: reference, ...}."""
    if not isinstance(spec, Mapping) or "source" not in spec:
        return spec
    source = spec["source"]
    if isinstance(source, Mapping) and "kind" in source:
        if "model" in source:
            source = {**source, "model": ref(source["model"], "a token's model")}
    else:
        source = ref(source, "a token's source")
    return {**spec, "source": source}


def _reference_text(value: Mapping[str, Any], where: str) -> str:
    """mergekit's ModelReference mapping as its string form: model[@revision][+lora[@revision]]."""
    def path(part: Any) -> str:
        if isinstance(part, str):
            return part
        if isinstance(part, Mapping) and isinstance(part.get("path"), str) and set(part) <= {"path", "revision"}:
            return str(part["path"]) + (f"@{part['revision']}" if part.get("revision") else "")
        raise ValueError(f"{where}: model reference part {part!r} is not a path or {{path, revision}}")

    if "override_architecture" in value and value["override_architecture"] is not None:
        raise ValueError(f"{where}: override_architecture is not supported: this client reads tensors by name, "
                         "not through an architecture")
    if "model" not in value or set(value) - {"model", "lora", "override_architecture"}:
        raise ValueError(f"{where}: {dict(value)!r} is not a model reference ({{model: ..., lora: ...}} or a name)")
    lora_part = value.get("lora")
    return path(value["model"]) + (f"+{path(lora_part)}" if lora_part is not None else "")


SIDE_FILES = ("config.json", "generation_config.json")
"""The model's files copied beside the merged weights from the base model's directory (or the first
model's); the tokenizer's from the model `tokenizer_source` names (`weightavg.vocabulary`): what
loading the result as a Hugging Face model needs, as mergekit writes them."""
OUT_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}
"""mergekit's `out_dtype` (else `dtype`) values that the written floating tensors are cast to."""
DEFAULT_BATCH_BYTES = 256 << 20
"""How many bytes of the models' tensors (every input's copy, and the results') the server holds for
a checkpoint merge at a time, whatever the models' size: two half-size batches, one going up while
the other's result comes back. 256 MiB merged three 1.3 GB checkpoints 5-13% faster than 1 GiB here,
with the server's peak a third of what one batch took (docs/perf.md, "Checkpoint files"); each batch
costs about 20 ms of round trips."""


def merge_checkpoints(
    client: Client, config: Mapping[str, Any], out: str | os.PathLike[str], *,
    paths: Mapping[str, str | os.PathLike[str]] | None = None, batch_bytes: int = DEFAULT_BATCH_BYTES,
    shard_bytes: int = checkpoints.DEFAULT_SHARD_BYTES, progress: Callable[[int, int], None] | None = None,
    model_card: bool = True, config_text: str | None = None, copy_tokenizer: bool = True,
    hub_cache: str | os.PathLike[str] | None = None, **options: Any,
) -> Path:
    """Merge safetensors checkpoints on the server as a mergekit config says, as `mergekit-yaml
    config.yml out/` would: each model the config names is read (a directory of *.safetensors shards,
    or one file; `paths` maps a config's name to another place; `model+adapter` applies a LoRA
    adapter, `weightavg.lora`), merged on the server, and the result written to `out` in shards of at
    most `shard_bytes` (model.safetensors when one holds it all, else model-0000i-of-0000N.safetensors
    and model.safetensors.index.json, as mergekit and Hugging Face write them), its floating tensors
    cast to the config's `out_dtype` (or `dtype`) where it gives one, with the base model's (or the
    first model's) config and tokenizer files beside it. Returns the file a loader opens first
    (model.safetensors, or the index).

    Where the config names a tokenizer (`tokenizer_source`, or `tokenizer`), the models' vocabulary
    tensors are aligned to the output's vocabulary as mergekit aligns them, and that tokenizer is
    written (`weightavg.vocabulary`).

    With `copy_tokenizer` False (mergekit-yaml's --no-copy-tokenizer) the base model's tokenizer files
    are not copied, nor its chat template written (a warning says so where the config gives one);
    a tokenizer the config names is written all the same, as mergekit writes it.

    With `model_card` (the default, as mergekit-yaml's), `out` also gets the config the merge ran
    from, `mergekit_config.yml` (`config_text` as the user wrote it; else the config as JSON, which
    YAML reads), and a README.md model card naming the method and the models.

    `slices` may cut and stack layers (a "frankenmerge"): each output slice merges its sources' layer
    ranges (of one length) into the next layers of the output, as mergekit plans them (`_layout`), and
    the written config.json counts the output's layers.

    Memory stays bounded whatever the models' size: the server holds at most `batch_bytes` of the
    models' tensors at a time (every model's copy and the result's): a batch of half of it goes up
    while the result of the batch before comes back, and the client writes each batch while the next
    is merged (it holds two batches' results at most); where the server refuses a batch for its memory caps
    (RESOURCE_EXHAUSTED), the batch is split in two and retried, down to one tensor. Every tensor is
    merged on its own, and gradients are placed by the whole model's layers (`call`'s `places`), so the
    batches give the bits one call over everything would. A config the server cannot run as mergekit
    does is refused before anything is uploaded; every handle made is freed, also on failure, and
    nothing is written to `out` unless every tensor was merged.

    `progress(done, total)` is called after each batch is merged with the output entries merged so far
    and their number in all (the command line shows it on a terminal).

    A name that is no local path but reads as a Hugging Face repository ID (`org/model`, with
    `@revision` or `+org/adapter`, as mergekit takes them) is downloaded into the Hugging Face cache
    first, as mergekit-yaml downloads it: safetensors weights and their JSON and tokenizer files only,
    never pickled ones (`weightavg.hub`), into `hub_cache` where given (mergekit-yaml's
    --transformers-cache), else the Hugging Face cache."""
    if batch_bytes <= 0:
        raise ValueError(f"batch_bytes is {batch_bytes}; give a positive number of bytes")
    config = named_references(config)
    names = _referenced(config)
    where = {name: _located(name, paths or {}, hub_cache) for name in names}
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None and str(dtype) not in OUT_DTYPES:
        raise ValueError(f"mergekit dtype {dtype!r} is not one the written checkpoint takes ({', '.join(OUT_DTYPES)})")
    for name, located in where.items():
        if any(Path(out).resolve() == (path if path.is_dir() else path.parent).resolve()
               for path in located if path is not None):
            raise ValueError(f"the output directory {out} holds model {name!r}, which the merge reads; write the "
                             "merged model to another directory")
    directories = {name: located[0] for name, located in where.items()}
    chosen = vocabulary.chosen_source(config)
    if isinstance(chosen, str) and chosen not in ("base", "union", *directories):  # a tokenizer from elsewhere
        directory = _local_or_downloaded(chosen, paths or {}, "tokenizer source", hub.TOKENIZER_FILES, hub_cache)
        if not directory.is_dir():
            raise vocabulary.VocabularyError(
                f"tokenizer source {chosen!r} is not 'base', 'union', a model of the config, a local directory or a "
                f"Hugging Face repository ID (org/name); download it first (e.g. hf download {chosen} --local-dir DIR) "
                "and name DIR")
        directories[chosen] = directory
    template = vocabulary.chat_template(config, directories, names)
    tokens = vocabulary.plan(config, directories, names)
    models = _tied({name: _read(*where[name]) for name in names})
    parts, layers = _layout(config, models)
    if tokens is not None:
        parts = [_aligned(part, tokens) for part in parts]
    parts = [_used(part, options) for part in parts]  # refused here, before any upload
    for part in parts:
        _check_shapes(part)
    metadata = {"format": "pt", "merge_method": str(config.get("merge_method"))}
    shapes = {entry: _unmade(part.tensors[label], read[entry]).shape  # the output's: every method keeps shapes
              for part in parts for label, read in list(part.inputs.items())[:1] for entry in part.entries}
    with checkpoints.ShardWriter(out, shard_bytes, metadata, checkpoints.header_room(shapes, metadata)) as writer:
        _merge_parts(client, parts, writer, batch_bytes, dtype, progress, options)
        written = writer.finish()
    source = (where[str(config["base_model"])] if config.get("base_model") in where else where[names[0]])[0]
    _copy_model_files(source, Path(out), layers, dtype, tokens, copy_tokenizer)
    if template is not None and (tokens is not None or copy_tokenizer):
        vocabulary.write_chat_template(Path(out), template)
    elif template is not None:
        warnings.warn("the config gives a chat template, but no tokenizer is written (--no-copy-tokenizer, and the "
                      "config names none): the template is not written either, as mergekit-yaml leaves it",
                      stacklevel=2)
    if model_card:
        text = config_text if config_text is not None else json.dumps(config, indent=2) + "\n"
        checkpoints.write_text(Path(out) / CONFIG_FILE, text)
        checkpoints.write_text(Path(out) / "README.md", _card(config, names, text, Path(out).resolve().name))
    return written


CONFIG_FILE = "mergekit_config.yml"
"""Where the config a merge ran from is written beside the model, under mergekit's name for it."""


def _card(config: Mapping[str, Any], names: Sequence[str], text: str, title: str) -> str:
    """A model card (README.md) for the merged model: what made it, its method, base and models, and
    the config it ran from."""
    base = config.get("base_model")
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))  # longer than any inside
    models = "\n".join(f"- `{name}`" + (" (the base)" if name == base else "") for name in names)
    return (f"---\nlibrary_name: transformers\ntags:\n- merge\n- mergekit\n- weightavg\n---\n\n# {title}\n\n"
            f"A merge of pre-trained models made with `weightavg merge` (the arithmetic on a weightavg server) from a "
            f"mergekit configuration: method `{config.get('merge_method')}`"
            + (f", base model `{base}`" if base is not None else "") + ".\n\n"
            f"## Models\n\n{models}\n\n## Configuration\n\nThe configuration it ran from (also in "
            f"`{CONFIG_FILE}`):\n\n{fence}yaml\n{text.rstrip()}\n{fence}\n")


def _merge_parts(client: Client, parts: Sequence[Part], writer: checkpoints.ShardWriter, batch_bytes: int, dtype: Any,
                 progress: Callable[[int, int], None] | None, options: Mapping[str, Any]) -> None:
    """Every run merged on the server a batch at a time and handed to `writer` (cast to `dtype` where
    given), three steps overlapping: a batch's models go up (`_Ahead`) while the batch before comes
    back, and each batch is written (`_Behind`) while the next is merged. So that the server still
    holds at most `batch_bytes` (one batch going up beside the result of the one before), a batch is
    half of it. A batch the server refuses for its caps is split in two and tried again."""
    total, done = sum(len(part.entries) for part in parts), 0
    with _Behind(writer, dtype) as behind, _Ahead(client) as ahead:
        for part in parts:
            pending = _batches(part, max(1, batch_bytes // 2))
            if pending:
                ahead.start(part, pending.pop())
            while ahead.going is not None:
                batch, made, uploading = ahead.take()
                try:
                    merged = call(part.config, uploading.result(), batch, places=part.places, **options).run(client)
                except ResourceExhaustedError:
                    if made:
                        client.free(*made)
                    if len(batch) == 1:
                        raise
                    half = len(batch) // 2
                    pending += [batch[half:], batch[:half]]  # the first half next
                    ahead.start(part, pending.pop())
                    continue
                except BaseException:
                    if made:
                        client.free(*made)
                    raise
                client.free(*made)  # the inputs, before the result comes back beside the next batch's
                if pending:
                    ahead.start(part, pending.pop())
                try:
                    values: dict[str, Any] = client.dict(merged, arrays=True)  # 0-dim entries as arrays: dtypes kept
                except ResourceExhaustedError:  # the copies the fetch reserves did not fit: merged again, split
                    if len(batch) == 1:
                        raise
                    pending += ahead.drop()  # the next batch goes after this one's halves, as planned
                    half = len(batch) // 2
                    pending += [batch[half:], batch[:half]]
                    ahead.start(part, pending.pop())
                    continue
                finally:
                    client.free(merged)
                behind.write([(entry, values[entry]) for entry in batch])
                done += len(batch)
                if progress is not None:
                    progress(done, total)


class _Ahead:
    """The next batch's models going up (`_uploaded`) on a thread of its own while the batch before
    comes back from the server: over a network the two move in opposite directions, and on one host
    they take turns on the cores. One batch at a time; leaving with one under way (on an error)
    waits for it and frees what it made, so nothing is left on the server."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weightavg-merge-ahead")
        self.going: tuple[list[str], list[HandleLike], concurrent.futures.Future[dict[str, HandleLike]]] | None = None

    def __enter__(self) -> _Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.going is not None:
                _, made, uploading = self.going
                concurrent.futures.wait([uploading])
                if made:
                    with contextlib.suppress(Exception):  # the error that brought us here is the one to raise
                        self._client.free(*made)
        finally:
            self._pool.shutdown(wait=True)

    def start(self, part: Part, batch: list[str]) -> None:
        """Send `batch`'s models up; the one before must have been taken."""
        assert self.going is None
        made: list[HandleLike] = []
        self.going = (batch, made, self._pool.submit(_uploaded, self._client, part, batch, made))

    def drop(self) -> list[list[str]]:
        """Call off the batch under way, if any: wait for it, free what it made, and give it back
        ([batch], or [] where none was under way) to be sent again later."""
        if self.going is None:
            return []
        batch, made, _ = self.take()
        if made:
            self._client.free(*made)
        return [batch]

    def take(self) -> tuple[list[str], list[HandleLike], concurrent.futures.Future[dict[str, HandleLike]]]:
        """The batch under way, the handles it made (all of them, once its future is done: also those
        of models that went up beside one that failed) and its future (the handles by model)."""
        assert self.going is not None
        going, self.going = self.going, None
        concurrent.futures.wait([going[2]])
        return going


class _Behind:
    """Writes a merge's batches to its ShardWriter on a thread of its own, one batch behind the merge.

    Why: writing a batch (the cast, and the copy into the page cache) is client work while the
    server merges the next batch and the stream or shared memory moves it; done in turn, the two
    add up. At most one batch is being written while the next is merged, so the client holds the
    merged values of two batches at most; batches are written in the order given, so the shards are
    laid out as a merge in turn lays them out. A write's error is raised by the next `write` or on
    leaving; leaving on an error waits for the write under way, so the writer is never aborted under it.
    """

    def __init__(self, writer: checkpoints.ShardWriter, dtype: Any) -> None:
        self._writer, self._dtype = writer, dtype
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weightavg-merge-writer")
        self._under_way: concurrent.futures.Future[None] | None = None

    def __enter__(self) -> _Behind:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        try:
            if self._under_way is not None and kind is None:
                self._under_way.result()
        finally:
            self._pool.shutdown(wait=True)

    def write(self, values: Sequence[tuple[str, Any]]) -> None:
        """Hand one batch's values (name, array) to the thread, once the batch before is written."""
        if self._under_way is not None:
            self._under_way.result()
        self._under_way = self._pool.submit(self._add, values)

    def _add(self, values: Sequence[tuple[str, Any]]) -> None:
        for entry, value in values:
            self._writer.add(entry, value if self._dtype is None else _cast(value, str(self._dtype)))


def _copy_model_files(source: Path, out: Path, layers: int | None, dtype: Any, tokens: vocabulary.Plan | None,
                      copy_tokenizer: bool = True) -> None:
    """The model's config files from `source` (config.json with the output's layers, dtype and
    vocabulary size where they changed) and the tokenizer's: as `tokens` writes it where the config
    names a tokenizer, else `source`'s files as they are (with `copy_tokenizer`), into `out`."""
    rows = tokens.rows if tokens is not None else None
    if source.is_dir():
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name in SIDE_FILES:
                if f.name == "config.json" and (layers is not None or dtype is not None or rows is not None):
                    checkpoints.write_text(out / f.name, _output_config(f, layers, dtype, rows))
                else:
                    shutil.copyfile(f, out / f.name)
    if tokens is not None:
        tokens.write(out)
    elif source.is_dir() and copy_tokenizer:
        for f in sorted(source.iterdir()):
            if f.is_file() and vocabulary.is_tokenizer_file(f.name):
                shutil.copyfile(f, out / f.name)


@dataclass(frozen=True)
class Part:
    """One run of a merge over files with one config: an output slice's layers (and the embeddings
    with the first slice, the final norm and head with the last), or the whole model. `config` is
    in the `models` form; `inputs` maps each of its models to {output entry: the model's own entry
    read for it}; `places` says where each output entry lies for its gradients; `tensors` holds each
    model's tensors as this run reads them (its vocabulary's rows moved to the output's, where the
    config names a tokenizer)."""

    config: Mapping[str, Any]
    inputs: Mapping[str, Mapping[str, str]]
    places: Mapping[str, float]
    tensors: Mapping[str, Mapping[str, Any]]

    @property
    def entries(self) -> list[str]:
        """The output entries, in the order they are written."""
        return list(self.places)


PRE_WEIGHTS = ("embed", "wte", "wpe")
"""Words in the name of an entry outside the layers that mark it as coming before them (the token and
position embeddings): with slices it is read from the first slice's models, the other entries
outside the layers (final norm, head) from the last slice's, as mergekit's architectures place them."""


def _layout(config: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]) -> tuple[list[Part], int | None]:
    """The runs a merge over files makes, and the output's layer count where slices set it (None
    otherwise). Without slices: one run over every entry, placed by `layer_fractions`. With slices, as
    mergekit plans them: slice k's sources give the next n layers of the output (n their common range
    length), output layer i of the slice reads layer range[0] + i of each source, with its gradients
    at i / (n - 1) (1 where n is 1), the slice's parameters before the config's; the entries outside
    the layers go with the first or the last slice at 0 (`PRE_WEIGHTS`)."""
    if "slices" not in config:
        entries = _common_entries(models)
        return [Part(config, {name: {e: e for e in entries} for name in models}, layer_fractions(entries), models)], None
    if "models" in config:
        raise ValueError("give 'models' or 'slices', not both")
    slices = config["slices"]
    if not isinstance(slices, list) or not slices or not all(isinstance(s, Mapping) for s in slices):
        raise ValueError("'slices' is a list of slices, each with its 'sources'")
    layered = {name: _layered(name, tensors) for name, tensors in models.items()}
    outside = _common_entries({name: {e: None for e in tensors if _layer(e) is None} for name, tensors in models.items()})
    pre = [e for e in outside if any(word in e for word in PRE_WEIGHTS)]
    post = [e for e in outside if e not in pre]
    parts: list[Part] = []
    done = 0
    for k, piece in enumerate(slices):
        sources = _sources(piece, k, layered)
        length = sources[0][2] - sources[0][1]
        labels = [label for label, _, _ in sources]
        inputs: dict[str, dict[str, str]] = {label: {} for label in labels}
        places: dict[str, float] = {}
        if k == 0:
            for label in labels:
                inputs[label] |= {e: e for e in pre}
            places |= {e: 0.0 for e in pre}
        starts = {label: start for label, start, _ in sources}
        for i in range(length):
            (first, template), *others = ((label, layered[label][start + i]) for label, start in starts.items())
            for label, held in others:
                if set(held) != set(template):
                    raise ValueError(f"slice {k}: layer {starts[label] + i} of {label!r} and layer {starts[first] + i} "
                                     f"of {first!r} hold different tensors (slices merge layers of one architecture)")
            for pattern in template:
                out_name = pattern.format(done + i)
                for label, start, _ in sources:
                    inputs[label][out_name] = pattern.format(start + i)
                places[out_name] = i / (length - 1) if length > 1 else 1.0
        if k == len(slices) - 1:
            for label in labels:
                inputs[label] |= {e: e for e in post}
            places |= {e: 0.0 for e in post}
        done += length
        parts.append(Part(_slice_config(config, piece, k, labels), inputs, places, {label: models[label] for label in labels}))
    return parts, done


TIED_HEADS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "transformer.wte.weight",
                       "wte.weight", "backbone.embeddings.weight", "shared.weight"),
    "output.weight": ("model.tok_embeddings.weight",),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    "lm_head.decoder.weight": ("roberta.embeddings.word_embeddings.weight",),
    "vocab_projector.weight": ("distilbert.embeddings.word_embeddings.weight",),
}
"""Output heads a model with tied word embeddings does not save, and the token embeddings each is
tied to (mergekit's architecture tables name the same pairs): where some models of a merge hold
the head and others do not, those others give their token embeddings for it, as mergekit reads them."""


def _tied(models: dict[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The models with a tied head read from its token embeddings where another model of the merge
    holds the head itself (`TIED_HEADS`); where no model holds it, there is no head to merge."""
    for head, embeddings in TIED_HEADS.items():
        if not any(head in tensors for tensors in models.values()):
            continue
        for name, tensors in models.items():
            partner = next((e for e in embeddings if e in tensors), None)
            if head not in tensors and partner is not None:
                models[name] = Aliased(tensors, {head: partner})
    return models


class Aliased(Mapping[str, Any]):
    """A model's tensors under more names: a tied head under its token embeddings' tensor."""

    def __init__(self, inner: Mapping[str, Any], aliases: Mapping[str, str]) -> None:
        self.inner, self.aliases = inner, dict(aliases)

    def unmade(self, name: str) -> Any:
        """The tensor's shape and dtype without making it."""
        return _unmade(self.inner, self.aliases.get(name, name))

    def __getitem__(self, name: str) -> Any:
        return self.inner[self.aliases.get(name, name)]

    def __iter__(self) -> Iterator[str]:
        yield from self.inner
        yield from (alias for alias in self.aliases if alias not in self.inner)

    def __len__(self) -> int:
        return len(self.inner) + sum(alias not in self.inner for alias in self.aliases)


def _layered(name: str, tensors: Mapping[str, Any]) -> list[dict[str, None]]:
    """A model's layers, each as the patterns of its entries' names ("model.layers.{}.mlp.up_proj.weight"),
    in layer order; ValueError where the layers are not numbered 0, 1, ... (slices count from 0)."""
    layers: dict[int, dict[str, None]] = {}
    for entry in tensors:
        parts = entry.split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if at is not None:
            layers.setdefault(int(parts[at]), {})[".".join([*parts[:at], "{}", *parts[at + 1:]])] = None
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(f"model {name!r}: its layers are numbered {sorted(layers)[:8]}...; slices need layers "
                         "numbered 0, 1, 2, ...")
    return [layers[i] for i in range(len(layers))]


def _sources(piece: Mapping[str, Any], k: int, layered: Mapping[str, Sequence[Any]]) -> list[tuple[str, int, int]]:
    """A slice's sources as (model, first layer, end), checked: each range within its model's layers,
    one length for all, no model twice."""
    sources = piece.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ValueError(f"slice {k} lists no 'sources'")
    found: list[tuple[str, int, int]] = []
    for source in sources:
        label = _model_name(source)
        span = source.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)
                and 0 <= span[0] < span[1] <= len(layered[label])):
            raise ValueError(f"slice {k}: source {label!r} has layer_range {span!r}; give [start, end] with 0 <= start "
                             f"< end <= {len(layered[label])} (its layers)")
        if any(label == other for other, _, _ in found):
            raise ValueError(f"slice {k} lists {label!r} twice; give each model once per slice")
        found.append((label, span[0], span[1]))
    lengths = {end - start for _, start, end in found}
    if len(lengths) != 1:
        raise ValueError(f"slice {k}: the sources' layer ranges have lengths {sorted(lengths)}; every source of a "
                         "slice gives the same number of layers")
    return found


def _slice_config(config: Mapping[str, Any], piece: Mapping[str, Any], k: int, labels: Sequence[str]) -> dict[str, Any]:
    """One slice of a config in the `models` form: its sources as the models with their parameters,
    the slice's parameters before the config's, its base model (the slice's, else the config's),
    which must be one of its sources."""
    for key in piece:
        if key not in ("sources", "parameters", "base_model"):
            raise ValueError(f"slice {k}: key {key!r} is not supported (give 'sources', 'parameters', 'base_model')")
    shared = _slice_parameters(config, piece)
    base = piece.get("base_model", config.get("base_model"))
    if base is not None and str(base) not in labels:
        raise ValueError(f"slice {k}: its base model {base!r} is not among its sources; list it with the layers it "
                         "gives (mergekit reads the base's tensors from the slice's sources)")
    sources = {_model_name(s): s for s in piece["sources"]}
    sliced = {key: value for key, value in config.items() if key != "slices"}
    sliced["models"] = [{"model": label, "parameters": sources[label].get("parameters") or {}} for label in labels]
    sliced["parameters"] = shared
    if base is not None:
        sliced["base_model"] = str(base)
    return sliced


def _output_config(config_json: Path, layers: int | None, dtype: Any, rows: int | None = None) -> str:
    """A model's config.json for the merged model, read and written as JSON, as mergekit writes it: the
    layer count (num_hidden_layers, n_layer or num_layers) the output's where slices set it, the
    dtype (`dtype`, and `torch_dtype` where the file has it) the written tensors' where the config
    casts them, so a loader's dtype="auto" takes them as they are, and `vocab_size` the output
    vocabulary's rows where a tokenizer was aligned."""
    loaded = json.loads(config_json.read_text(encoding="utf-8"))
    if isinstance(loaded, dict):
        holder = vocabulary.vocab_size_holder(loaded)
        if rows is not None and holder is not None:
            holder["vocab_size"] = rows
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in loaded and layers is not None:
                loaded[key] = layers
        if dtype is not None:
            loaded["dtype"] = str(dtype)
            if "torch_dtype" in loaded:
                loaded["torch_dtype"] = str(dtype)
    return json.dumps(loaded, indent=2) + "\n"


def _located(name: str, paths: Mapping[str, str | os.PathLike[str]],
             hub_cache: str | os.PathLike[str] | None = None) -> tuple[Path, Path | None]:
    """Where a config's model lies: its checkpoint, and its LoRA adapter's directory for mergekit's
    `model+adapter` (each part, or the whole name, mapped by `paths`); a part that is no local path
    but reads as a Hugging Face repository ID (`org/name[@revision]`) is downloaded (`weightavg.hub`,
    safetensors only); ValueError for one that is neither."""
    if name in paths:
        return Path(paths[name]), None
    parts = name.split("+")
    if len(parts) > 2:
        raise ValueError(f"model {name!r} of the config: give a model and at most one LoRA adapter (model+adapter)")
    model = _local_or_downloaded(parts[0], paths, "model", hub.MODEL_FILES, hub_cache)
    adapter = _local_or_downloaded(parts[1], paths, "LoRA adapter", hub.ADAPTER_FILES, hub_cache) if len(parts) == 2 else None
    if not model.exists():
        raise ValueError(f"model {parts[0]!r} of the config is not a local directory or .safetensors file ({model}); "
                         f"download it first (e.g. hf download {parts[0]} --local-dir DIR) and name DIR")
    if adapter is not None and not adapter.is_dir():
        raise ValueError(f"LoRA adapter {parts[1]!r} of the config is not a local directory ({adapter}); download it "
                         f"first (e.g. hf download {parts[1]} --local-dir DIR) and name DIR")
    return model, adapter


def _local_or_downloaded(name: str, paths: Mapping[str, str | os.PathLike[str]], what: str,
                         files: tuple[str, ...], hub_cache: str | os.PathLike[str] | None = None) -> Path:
    """The local path a config's name stands for (`paths`' mapping, or the name itself), or, where
    that does not exist and the name reads as a Hugging Face repository ID, its downloaded snapshot
    (in `hub_cache`, else the Hugging Face cache)."""
    local = Path(paths.get(name, name))
    if local.exists() or name in paths or not hub.is_repo_id(name):
        return local
    return hub.download(name, files, what, cache_dir=hub_cache)


def _read(model: Path, adapter: Path | None) -> Mapping[str, Any]:
    """A model's tensors by name, mapped from its files, with its LoRA adapter applied where it has one."""
    tensors = checkpoints.read(model)
    return tensors if adapter is None else lora.apply(tensors, adapter)


def _common_entries(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The tensors every model holds, in the first model's order; ValueError naming one that some model
    lacks (a merge takes the same tensors from each)."""
    (first, held), *others = models.items()
    for name, tensors in others:
        for missing, owner, other in ((set(held) - set(tensors), first, name), (set(tensors) - set(held), name, first)):
            if missing:
                raise ValueError(f"tensor {sorted(missing)[0]!r} is in {owner} but not in {other} "
                                 f"({len(missing)} such); the models to merge hold the same tensors")
    if not held:
        raise ValueError(f"{first} holds no tensors to merge")
    return list(held)


def _used(part: Part, options: Mapping[str, Any]) -> Part:
    """A run checked by building its call (ValueError for what the server cannot do as mergekit does),
    keeping the models the call reads: a base model a linear merge ignores is not uploaded."""
    planned = call(part.config, {label: label for label in part.inputs}, part.entries, places=part.places, **options)
    used = {str(h) for h in planned.dicts} | ({str(planned.base)} if planned.base is not None else set())
    return replace(part, inputs={label: names for label, names in part.inputs.items() if label in used})


def _batches(part: Part, limit: int) -> list[list[str]]:
    """A run's entries in batches of at most `limit` bytes on the server (every model's copy of each,
    and the result's, as large as the largest copy), a batch per entry where one alone is larger; in
    reverse order, for popping."""
    runs: list[list[str]] = []
    held = limit
    for entry in part.entries:
        sizes = [_nbytes(part.tensors[label], names[entry]) for label, names in part.inputs.items()]
        size = sum(sizes) + max(sizes)
        if not runs or held + size > limit:
            runs.append([])
            held = 0
        runs[-1].append(entry)
        held += size
    return runs[::-1]


def _nbytes(tensors: Mapping[str, Any], name: str) -> int:
    """The bytes of a model's tensor, without making one an adapter changes."""
    return int(_unmade(tensors, name).nbytes)


def _unmade(tensors: Mapping[str, Any], name: str) -> Any:
    """A model's tensor with the shape and dtype it will have, without making it (an adapted one's
    base, an aligned one's placeholder), so its size and shape are read cheaply."""
    unmade = getattr(tensors, "unmade", None)
    return unmade(name) if unmade is not None else tensors[name]


def _aligned(part: Part, tokens: vocabulary.Plan) -> Part:
    """A run whose models' vocabulary tensors (outside the layers, two-dimensional, one row per token
    of the model's vocabulary) have their rows moved to the output vocabulary's, as mergekit moves
    them where a config names a tokenizer; the other models of the run give the default rows."""
    labels = list(part.tensors)
    entries = []
    for entry in part.entries:
        if _layer(entry) is not None:
            continue
        shapes = {label: _unmade(part.tensors[label], part.inputs[label][entry]).shape for label in labels}
        rows = {label: len(shape) == 2 and shape[0] == tokens.tokenizers[label].rows for label, shape in shapes.items()}
        if any(rows.values()) and not all(rows.values()):
            odd = next(label for label, fits in rows.items() if not fits)
            raise vocabulary.VocabularyError(
                f"tensor {entry!r} has shape {list(shapes[odd])} in {odd!r}, where its "
                f"config.json's vocab_size is {tokens.tokenizers[odd].rows} (the other models hold one row per "
                "token); its embeddings do not match its vocabulary")
        if all(rows.values()):
            entries.append(entry)
    if entries:
        tokens.check(tuple(labels))  # a token's source this run cannot give: refused before anything goes up
    return replace(part, tensors={label: tokens.aligned(label, part.tensors, entries) for label in labels})


def _check_shapes(part: Part) -> None:
    """ValueError naming a tensor whose shape differs between the models of a run (a merge takes one
    shape), before anything is uploaded; for vocabularies of different lengths, how to align them."""
    for entry in part.entries:
        shapes = {label: tuple(_unmade(part.tensors[label], names[entry]).shape) for label, names in part.inputs.items()}
        (first, shape), *others = shapes.items()
        for label, other in others:
            if other != shape:
                hint = ("; the models' vocabularies differ in length: name a tokenizer (tokenizer_source: base, or "
                        "union) and their rows are aligned to it, as mergekit aligns them"
                        if _layer(entry) is None and len(shape) == len(other) and shape[1:] == other[1:] else "")
                raise ValueError(f"tensor {entry!r} has shape {list(shape)} in {first!r} but {list(other)} in "
                                 f"{label!r}{hint}")


UPLOAD_THREADS = 4
"""How many of a batch's models go up at once (`_uploaded`)."""


def _uploaded(client: Client, part: Part, batch: Sequence[str], made: list[HandleLike]) -> dict[str, HandleLike]:
    """Each model's tensors of the batch uploaded as a dictionary, the models at once on up to
    UPLOAD_THREADS threads over the stream (each reads its file's pages and sends its stream while
    the others do: a TIES of three 250 MB checkpoints went from 3.5 to 2.8 s on 2 vCPUs), in turn
    through shared memory (`Client.shared_memory`: one region, taken in turn). Every handle made is
    appended to `made`, also when another upload failed (after which no other starts); then the
    first failure is raised."""
    def upload(label: str) -> HandleLike:
        names = part.inputs[label]
        handle: HandleLike = client.dict({entry: part.tensors[label][names[entry]] for entry in batch})
        return handle

    labels = list(part.inputs)
    threads = 1 if client.shared_memory else min(len(labels), UPLOAD_THREADS) or 1
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="weightavg-merge-upload")
    futures: list[concurrent.futures.Future[HandleLike]] = []
    try:
        futures = [pool.submit(upload, label) for label in labels]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    finally:  # also on an interrupt: the uploads under way finish (and are freed), those not started never start
        pool.shutdown(wait=True, cancel_futures=True)
        made += [f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None]
    failed = [error for f in futures if not f.cancelled() and (error := f.exception()) is not None]
    if failed:
        raise failed[0]
    return {label: f.result() for label, f in zip(labels, futures)}


def _referenced(config: Mapping[str, Any]) -> list[str]:
    """Every model a config names, in order of appearance: the models (or every slice's sources), then
    the base model if it is not among them."""
    sources = config.get("models")
    slices = config.get("slices")
    if sources is None and isinstance(slices, list) and all(isinstance(piece, Mapping) for piece in slices):
        sources = [s for piece in slices for s in (piece.get("sources") or [])]
    if not isinstance(sources, list) or not sources:
        raise ValueError("a mergekit config for the server lists its 'models', or slices of 'sources'")
    names = list(dict.fromkeys(_model_name(entry) for entry in sources))
    base = config.get("base_model")
    if base is not None and str(base) not in names:
        names.append(str(base))
    return names


def _cast(value: Any, dtype: str) -> Any:
    """A floating array in the output dtype; other arrays (integer counts, masks) as they are."""
    array = np.asarray(value)
    if array.dtype.kind == "f" or array.dtype == np.dtype(checkpoints.DTYPES["BF16"]):
        return array.astype(checkpoints.DTYPES["BF16"] if dtype == "bfloat16" else np.dtype(dtype))
    return array


def call(
    config: Mapping[str, Any], models: Mapping[str, HandleLike], names: Sequence[str], *,
    places: Mapping[str, float] | None = None, **options: Any,
) -> MergeCall:
    """The merge call a mergekit config stands for, given the entries' names (every dictionary has the
    same ones); ValueError for what the server cannot do as mergekit does.

    `places`: where each entry lies in the whole model, from 0 to 1, where `names` (and the
    dictionaries) hold a part of it, as when a checkpoint is merged a batch of tensors at a time, or
    an output slice's layers are merged. A gradient is placed by the model's layers, which a part
    does not show, so with `places` each gradient is evaluated here, at the entry's place, and the
    call carries plain numbers: a part merges to the whole's bits."""
    fractions = places if places is not None else layer_fractions(names) if config.get("merge_method") == "nuslerp" \
        else None
    config = _unsliced(config, names)
    method_name = config.get("merge_method")
    rule = RULES.get(str(method_name))
    if rule is None:
        raise ValueError(f"mergekit method {method_name!r} is not one the server has (one of {', '.join(RULES)})")
    for key in config:
        if key not in ("merge_method", "base_model", "models", "parameters", *IGNORED_KEYS):
            raise ValueError(f"mergekit key {key!r} is not supported (give 'models' or one slice, and 'parameters')")
    base, inputs, labels = _inputs(config, models)
    shared_settings: Mapping[str, Setting] = config.get("parameters") or {}
    model_settings = [_model_parameters(config, label) for label in labels]
    _check_names(rule, shared_settings, model_settings)

    def resolve(name: str) -> tuple[tuple[tuple[str, Resolved | str], ...], tuple[tuple[Resolved, ...], ...]]:
        where = places[name] if places is not None else None  # gradients placed here, not by the server

        shared: list[tuple[str, Resolved | str]] = []  # (a str: an option the mapping sets, nuslerp's vectors)
        for key, (option, default) in rule.shared.items():
            value = _placed(_resolve(name, [shared_settings], key, default), where)
            if value is None:
                raise ValueError(f"mergekit parameter {key!r} is required for {method_name} (entry {name!r})")
            if not option:  # no effect on the numbers (task_arithmetic trims nothing to rescale)
                continue
            if key in rule.whole:
                value = _whole(name, key, value)
            shared.append((option, value))
        for key, default in rule.one_for_all.items():
            values = {_placed(_resolve(name, [settings, shared_settings], key, default), where)
                      for settings in model_settings}
            if len(values) != 1:
                raise ValueError(f"mergekit parameter {key!r} differs between the models at entry {name!r} "
                                 f"({sorted(map(str, values))}); the server takes one {key} for every model")
            value = values.pop()
            if value is None or isinstance(value, bool):
                raise ValueError(f"mergekit parameter {key!r} at entry {name!r} is not a number")
            shared.append((key, value))
        per_model = tuple(
            tuple(_placed(_per_model(name, key, settings, shared_settings, label, method_name), where)
                  for settings, label in zip(model_settings, labels))
            for key in rule.per_model
        )
        if method_name == "nuslerp":
            flatten = _resolve(name, [shared_settings], "nuslerp_flatten", True)
            row_wise = _resolve(name, [shared_settings], "nuslerp_row_wise", False)
            if not isinstance(flatten, bool) or not isinstance(row_wise, bool):
                raise ValueError(f"nuslerp_flatten and nuslerp_row_wise at entry {name!r} are true or false")
            vectors = "tensor" if flatten else "columns" if row_wise else "rows"
            assert fractions is not None  # nuslerp's weights are placed here always: their ratio is t
            return ((*shared, ("t", _nuslerp_t(name, per_model[0], fractions[name])), ("vectors", vectors)), ())
        return tuple(shared), per_model

    resolved = {name: resolve(name) for name in names}
    if not resolved:
        raise ValueError("the dictionaries have no entries to merge")
    groups: dict[Any, list[str]] = {}
    for name in names:
        groups.setdefault(resolved[name], []).append(name)
    common = Counter({key: len(group) for key, group in groups.items()}).most_common(1)[0][0]
    filters = _filters(shared_settings, model_settings)
    per_tensor: dict[str, dict[str, Any]] = {}
    claimed: set[str] = set()
    for key, group in groups.items():
        if key == common:
            continue
        patterns = _patterns(group, names, claimed, filters)
        claimed.update(group)
        for pattern in patterns:
            per_tensor[pattern] = _overrides(rule, key)
    shared, per_model = common
    per = dict(zip(rule.per_model, per_model))
    weights = per.get("weight", per.get("scale"))  # passthrough's scale is its one model's weight
    return MergeCall(
        rule.method, inputs, None if method_name == "slerp" else base, _numbers(weights),
        _numbers(per.get("density")), per_tensor, {**rule.fixed, **dict(shared), **options},
    )


def _nuslerp_t(name: str, weights: tuple[Resolved, ...], fraction: float) -> float:
    """nuslerp's t from its two models' weights at the entry (a gradient's value at `fraction`, as
    mergekit evaluates every parameter per tensor): w1 / (w0 + w1), 0.5 where they sum to under 1e-6.
    Each entry gets its own t; a gradient of t would be another thing (a ratio of two lines is no line)."""
    w0, w1 = (at_fraction(w, fraction) if isinstance(w, tuple) else w for w in weights)
    if isinstance(w0, bool) or isinstance(w1, bool):
        raise ValueError(f"nuslerp at entry {name!r}: give each model's weight as a number")
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def layer_fractions(names: Sequence[str]) -> dict[str, float]:
    """Where each entry lies in the model, from 0 to 1, for a gradient: the server's rule
    (`weightavg_server.domain.merging.layer_fractions`, mergekit's placement), written again here so a
    call over part of a model can carry the whole's values. A layer's entries at i / (layers - 1) (1
    with one layer), entries outside the layers (embeddings, final norm, head) at 0; an entry's layer is
    the first all-digit part of its dotted name, the layers the distinct such numbers in order."""
    index = {name: _layer(name) for name in names}
    rank = {layer: r for r, layer in enumerate(sorted({i for i in index.values() if i is not None}))}
    return {name: 0.0 if i is None else rank[i] / (len(rank) - 1) if len(rank) > 1 else 1.0 for name, i in index.items()}


def at_fraction(gradient: tuple[float, ...], fraction: float) -> float:
    """A gradient's value at `fraction` (its numbers spread evenly from the first layer to the last):
    linear between the two nearest, as the server evaluates it."""
    scaled = fraction * (len(gradient) - 1)
    low = int(scaled)
    high = min(len(gradient) - 1, low + 1)
    share = scaled - low
    return (1 - share) * float(gradient[low]) + share * float(gradient[high])


@overload
def _placed(value: Resolved, fraction: float | None) -> Resolved: ...
@overload
def _placed(value: Resolved | None, fraction: float | None) -> Resolved | None: ...
def _placed(value: Resolved | None, fraction: float | None) -> Resolved | None:
    """A setting as the call carries it: a gradient's value at `fraction` where one is given (the
    entry's place in the whole model), else the setting as it is."""
    return at_fraction(value, fraction) if fraction is not None and isinstance(value, tuple) else value


def _layer(name: str) -> int | None:
    """The layer an entry lies in: the first all-digit part of its dotted name."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def _whole(name: str, key: str, value: Resolved) -> int:
    """An integer parameter's value: a whole number (not a bool, not a gradient)."""
    if isinstance(value, (bool, tuple)) or not float(value).is_integer():
        raise ValueError(f"mergekit parameter {key!r} at entry {name!r} is {value!r}; give a whole number")
    return int(value)


def _numbers(values: tuple[Resolved, ...] | None) -> list[float | tuple[float, ...]] | None:
    """Per-model values as the call takes them (`_per_model` refused bools)."""
    return None if values is None else [v for v in values if not isinstance(v, bool)]


def _first_model(config: Mapping[str, Any]) -> str:
    """The first model a config lists (under `models`, or the first slice's sources)."""
    slices = config.get("slices")
    if isinstance(slices, list) and slices and isinstance(slices[0], Mapping):
        sources = slices[0].get("sources")
        if isinstance(sources, list) and sources:
            return _model_name(sources[0])
    entries = config.get("models")
    if isinstance(entries, list) and entries:
        return _model_name(entries[0])
    raise ValueError("a mergekit config for the server lists its 'models', or one slice of 'sources'")


def _unsliced(config: Mapping[str, Any], names: Sequence[str]) -> Mapping[str, Any]:
    """A config of one slice whose every source spans all the layers ([0, L], L the layers the names
    hold) as the same config in the `models` form: the sources become the models, and the slice's
    parameters come before the config's (where a slice's conditions match no filter, the config's
    value still applies, as in mergekit). Slices that cut or stack layers are refused."""
    if "slices" not in config:
        return config
    slices = config["slices"]
    if "models" in config:
        raise ValueError("give 'models' or 'slices', not both")
    layers = len({_layer(n) for n in names} - {None})
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], Mapping):
        raise ValueError("only one slice over every layer is supported over dictionaries (slices that stack or cut "
                         "layers make another architecture: merge_checkpoints and weightavg merge build it from the "
                         "checkpoint files)")
    sources = slices[0].get("sources")
    if not isinstance(sources, list) or not sources:
        raise ValueError("the slice lists no 'sources'")
    for source in sources:
        span = list(source.get("layer_range", [])) if isinstance(source, Mapping) else []
        if span != [0, layers]:
            raise ValueError(f"source {_model_name(source)!r} spans layers {span}; only one slice over every layer "
                             f"([0, {layers}]) is supported")
    shared = _slice_parameters(config, slices[0])
    unsliced = {k: v for k, v in config.items() if k != "slices"}
    unsliced["models"] = [{"model": _model_name(s), "parameters": s.get("parameters") or {}} for s in sources]
    unsliced["parameters"] = shared
    return unsliced


def _slice_parameters(config: Mapping[str, Any], piece: Mapping[str, Any]) -> dict[str, Setting]:
    """A slice's shared parameters: the slice's own before the config's (where a slice's conditions
    match no filter, the config's value still applies, as in mergekit)."""
    shared = dict(config.get("parameters") or {})
    for key, value in (piece.get("parameters") or {}).items():
        shared[key] = _before(value, shared[key]) if key in shared else value
    return shared


def _before(first: Setting, then: Setting) -> Setting:
    """One setting that is `first` where it gives a value and `then` where its conditions match none."""
    conditions = [first] if isinstance(first, Mapping) else first
    if not (isinstance(conditions, list) and conditions and all(isinstance(c, Mapping) for c in conditions)):
        return first  # a number or a gradient: it always gives a value
    fallback = [then] if isinstance(then, Mapping) else then
    if isinstance(fallback, list) and fallback and all(isinstance(c, Mapping) for c in fallback):
        return [*conditions, *fallback]
    return [*conditions, {"value": then}]


def _inputs(
    config: Mapping[str, Any], models: Mapping[str, HandleLike]
) -> tuple[HandleLike | None, list[HandleLike], list[str]]:
    """The base's handle (None where the method takes none), the inputs' handles and their names: for
    slerp the base then the other model (t = 0 is the base), for linear (and multislerp without a
    base) every listed model, for karcher every listed model and the base after them where it is not
    listed (mergekit's planner adds it as one more input, and karcher averages every input), else the
    listed models other than the base."""
    entries = config.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError("a mergekit config for the server lists its 'models' (slices are not supported)")
    labels = [_model_name(e) for e in entries]
    base_name = config.get("base_model")
    method = str(config.get("merge_method"))

    def handle(label: str) -> HandleLike:
        if label not in models:
            raise ValueError(f"model {label!r} of the config has no handle; give models={{{label!r}: handle, ...}}")
        return models[label]

    if method == "karcher":
        listed = labels if base_name is None or base_name in labels else [*labels, str(base_name)]
        return None, [handle(label) for label in listed], listed
    if method == "passthrough":
        listed = labels if base_name is None or base_name in labels else [*labels, str(base_name)]
        if len(listed) != 1:
            raise ValueError(f"passthrough takes one model (a base_model counts as one), given {len(listed)}")
        return None, [handle(listed[0])], listed
    if method == "linear" or (method in ("multislerp", "nuslerp") and base_name is None):
        if method == "nuslerp" and len(labels) != 2:
            raise ValueError(f"nuslerp takes two models (besides an optional base), given {len(labels)}")
        return None, [handle(label) for label in labels], labels
    if base_name is None:
        raise ValueError(f"mergekit's {method} needs a base_model")
    others = [label for label in labels if label != base_name]
    if method == "nuslerp" and len(others) != 2:
        raise ValueError(f"nuslerp takes two models besides the base, given {len(others)}")
    if method in ("nearswap", "arcee_fusion") and len(others) != 1:
        raise ValueError(f"{method} takes the base_model and one other model, given {len(others)} others")
    if method == "slerp":
        if len(others) != 1:
            raise ValueError(f"slerp takes the base_model and one other model, given {len(others)} others")
        return handle(base_name), [handle(base_name), handle(others[0])], [str(base_name), others[0]]
    return handle(str(base_name)), [handle(label) for label in others], others


def _model_name(entry: Any) -> str:
    model = entry.get("model") if isinstance(entry, Mapping) else None
    if not isinstance(model, str):
        raise ValueError(f"each of 'models' needs a 'model' name, given {entry!r}")
    return model


def _model_parameters(config: Mapping[str, Any], label: str) -> Mapping[str, Setting]:
    for entry in config["models"]:
        if _model_name(entry) == label:
            return entry.get("parameters") or {}
    return {}


def _check_names(rule: MethodRule, shared: Mapping[str, Setting], per_model: Sequence[Mapping[str, Setting]]) -> None:
    """Every parameter the config gives must mean something to the method here (a typo, or gamma and
    epsilon of methods the server lacks, would otherwise be dropped without a word)."""
    known = set(rule.shared) | set(rule.per_model) | set(rule.one_for_all)
    for where, settings in [("parameters", shared), *[("a model's parameters", s) for s in per_model]]:
        for key in settings:
            if key not in known:
                raise ValueError(f"mergekit parameter {key!r} in {where} is not one {rule.method} takes "
                                 f"(known: {', '.join(sorted(known))})")


def _resolve(name: str, sources: Sequence[Mapping[str, Setting]], key: str, default: Any) -> Resolved | None:
    """mergekit's resolution of one parameter for one tensor: the first source that gives a value for
    it (its filters applied), else the default."""
    for settings in sources:
        if key in settings:
            value = _evaluate(name, settings[key], key)
            if value is not None:
                return value
    return default  # type: ignore[no-any-return]


def _evaluate(name: str, setting: Setting, key: str) -> Resolved | None:
    """A setting's value for the tensor `name`: a number or bool as it is, a list of numbers as a
    gradient (a tuple), conditions by the first filter contained in the name; None where no condition
    matches (the next source is asked)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, bool):
        return setting
    if isinstance(setting, (int, float, str)) and _number(setting) is not None:
        return _number(setting)
    if isinstance(setting, list) and setting and all(_number(v) is not None for v in setting):
        values = tuple(float(v) for v in setting)
        return values if len(values) > 1 else values[0]
    if isinstance(setting, list) and all(isinstance(c, Mapping) and "value" in c for c in setting):
        for condition in setting:
            where = condition.get("filter")
            if where is None or where == "*" or str(where) in name:
                return _evaluate(name, condition["value"], key)
        return None
    raise ValueError(f"mergekit parameter {key!r}: {setting!r} is not a number, a list of numbers or a list of "
                     "{filter, value} conditions")


def _number(value: Any) -> float | None:
    """A number as a float, also one YAML left a string ("1e-3": YAML 1.1 reads exponents without a
    dot as text, and mergekit takes them as numbers); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _per_model(
    name: str, key: str, settings: Mapping[str, Setting], shared: Mapping[str, Setting], label: str, method: Any
) -> Resolved:
    default = 1.0 if key in ("density", "scale") else None  # mergekit: density 1 (keep all), no scale, weight required
    value = _resolve(name, [settings, shared], key, default)
    if value is None:
        raise ValueError(f"mergekit parameter {key!r} is required for {method} (model {label!r}, entry {name!r})")
    if isinstance(value, bool):
        raise ValueError(f"mergekit parameter {key!r} of model {label!r} is a bool; give a number")
    return value


def _filters(shared: Mapping[str, Setting], per_model: Sequence[Mapping[str, Setting]]) -> list[str]:
    """Every filter string the config uses, in order of appearance."""
    found: list[str] = []

    def walk(setting: Setting) -> None:
        if isinstance(setting, Mapping):
            setting = [setting]
        if isinstance(setting, list):
            for item in setting:
                if isinstance(item, Mapping):
                    where = item.get("filter")
                    if isinstance(where, str) and where != "*" and where not in found:
                        found.append(where)
                    walk(item.get("value"))

    for settings in [shared, *per_model]:
        for value in settings.values():
            walk(value)
    return found


def _patterns(group: list[str], names: Sequence[str], claimed: set[str], filters: Sequence[str]) -> list[str]:
    """fnmatch patterns that match exactly `group` among the names no earlier pattern took: "*f*" for a
    filter f whose names (less the claimed ones) are the group, else each name escaped."""
    wanted = set(group)
    for f in filters:
        if {n for n in names if f in n and n not in claimed} == wanted:
            return [f"*{_escape(f)}*"]
    return [_escape(n) for n in group]


def _escape(text: str) -> str:
    """fnmatch's special characters as themselves."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _overrides(rule: MethodRule, key: Any) -> dict[str, Any]:
    """A group's per_tensor entry: its shared options, and its per-model weights and densities."""
    shared, per_model = key
    out: dict[str, Any] = dict(shared)
    for name, values in zip(rule.per_model, per_model):
        out["densities" if name == "density" else "weights"] = list(values)  # (passthrough's scale: weights)
    return out


def _entry_names(client: Client, h: HandleLike) -> list[str]:
    """The entries a merge of `h` works over: a dictionary's names, or a module's parameter names."""
    sizes = client.size(h)
    if isinstance(sizes, dict):
        return [name for name in sizes if not name.startswith(".")]
    return client.parmnames(h)

