"""Token vocabularies of Hugging Face checkpoints, aligned for a merge as mergekit 0.1.5 aligns them.

Why: a chat fine-tune often adds tokens (`<|im_start|>`, a pad token) to its base's vocabulary and
grows its embeddings by as many rows, so the models of a merge hold vocabulary tensors (the token
embeddings, the output head) of different lengths, or the same token in different rows. Row i of
every model must mean one token before the rows can be merged. When a mergekit config names a
tokenizer (`tokenizer_source`, or `tokenizer` with its `source`, "union" by default), mergekit
builds the output's vocabulary and moves every model's rows to it before merging; `plan` and
`Plan.aligned` do the same here, with numpy alone:

- the output vocabulary: the base model's ("base"; the first model's without a base), a named
  model's, or for "union" the base's followed by every other model's tokens it lacks (its plain
  tokens first, then added tokens such as `<|im_start|>` with the settings of the first model that
  has them), then the `tokens` the config lists that are still missing; its length rounded up to
  `pad_to_multiple_of`, the extra rows each model's mean row;
- each model's rows moved to the output's ids; a token the model lacks gets a default row, as
  mergekit's rules give it: the only model that has it, else the base's row, else the mean of the
  models that have it (zero where none has it), unless the config's `tokens` give its source (a
  model, a model's other token, or zeros) and `force` it over every model's own row.

The written tokenizer is the chosen one's files as they are, with the new tokens appended as added
tokens (`tokenizer.json`'s `added_tokens`, and `added_tokens_decoder` / `added_tokens.json` where the
source has them), and config.json's `vocab_size` is the output's rows, as mergekit writes them.

Read as data: each model's `tokenizer.json` (the fast tokenizer transformers saves; a
sentencepiece-only `tokenizer.model` is refused with what to do) and its `config.json`'s
`vocab_size` (the rows of its vocabulary tensors). One difference from mergekit, by design: the
union's new tokens are numbered in the config's order of the models, each model's in id order, and
without a `base_model` "base" is the first model listed; mergekit takes the models from a Python set
and a plain token's place from a hash table, so its numbering (and, without a base, which model is
"base") changes from run to run. Every token's row is the same either way (`tests/test_mergekit.py`
compares them token by token).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import checkpoints

TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
"""The tokenizer's files besides those whose name starts with "tokenizer" (tokenizer.json,
tokenizer_config.json, tokenizer.model): copied from the model the tokenizer comes from."""
MERGEKIT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
"""The chat templates mergekit 0.1.5 ships under a name: `chat_template: chatml` means its own file,
which this package does not carry (a warning says the template is not applied)."""
PLAIN_TOKEN = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
"""An added token's settings where it was a plain token of its model (or a config's `tokens` key):
what transformers' `add_tokens` gives a string."""


class VocabularyError(ValueError):
    """A tokenizer or vocabulary a merge cannot align as mergekit does; the message says what to do."""


def is_tokenizer_file(name: str) -> bool:
    """Whether a model directory's file belongs to its tokenizer (copied with it)."""
    return name.startswith("tokenizer") or name in TOKENIZER_FILES


@dataclass(frozen=True)
class Tokenizer:
    """A model's fast tokenizer as its `tokenizer.json` holds it, and its vocabulary tensors' rows."""

    directory: Path
    vocab: Mapping[str, int]
    """Every token by its id, added ones too (transformers' `get_vocab()`)."""
    added: Mapping[str, Mapping[str, Any]]
    """The added tokens' entries of `tokenizer.json` by content, in id order."""
    rows: int
    """config.json's `vocab_size`: the rows of the model's token embeddings and head."""

    @property
    def used(self) -> dict[str, int]:
        """The tokens whose id has a row (mergekit strips the others)."""
        return {token: i for token, i in self.vocab.items() if i < self.rows}


def read_tokenizer(name: str, directory: Path) -> Tokenizer:
    """A model's tokenizer and vocabulary size from its directory; VocabularyError naming what is
    missing."""
    if not directory.is_dir():
        raise VocabularyError(f"model {name!r} is one file ({directory}); aligning vocabularies needs its directory, "
                              "with tokenizer.json and config.json")
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise VocabularyError(f"model {name!r} has no tokenizer.json in {directory}; save its fast tokenizer there "
                              "first (transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
    loaded = _json(path)
    model = loaded.get("model") if isinstance(loaded, dict) else None
    vocab: dict[str, int] = {}
    listed = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(listed, dict):
        vocab = {str(token): int(i) for token, i in listed.items()}
    elif isinstance(listed, list):  # Unigram: [piece, score] pairs, the id the index
        vocab = {str(piece[0]): i for i, piece in enumerate(listed)}
    else:
        raise VocabularyError(f"{path} holds no model vocabulary (model.vocab); is it a Hugging Face tokenizer.json?")
    added: dict[str, Mapping[str, Any]] = {}
    for entry in sorted(loaded.get("added_tokens") or [], key=lambda e: int(e["id"])):
        vocab[str(entry["content"])] = int(entry["id"])
        added.setdefault(str(entry["content"]), entry)
    return Tokenizer(directory, vocab, added, _rows(name, directory))


def vocab_size_holder(config: Any) -> dict[str, Any] | None:
    """The part of a config.json that gives `vocab_size`: the top level, else `text_config` (a
    multimodal model's language model), as transformers' configs nest it."""
    if not isinstance(config, dict):
        return None
    if "vocab_size" in config or not isinstance(config.get("text_config"), dict):
        return config
    nested: dict[str, Any] = config["text_config"]
    return nested if "vocab_size" in nested else config


def _rows(name: str, directory: Path) -> int:
    config = directory / "config.json"
    holder = vocab_size_holder(_json(config) if config.is_file() else None)
    rows = holder.get("vocab_size") if holder is not None else None
    if type(rows) is not int or rows <= 0:
        raise VocabularyError(f"model {name!r}: its config.json gives no vocab_size (nor text_config's), the rows of "
                              "its token embeddings, which aligning vocabularies needs")
    return rows


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabularyError(f"cannot read {path} as JSON: {e}") from None


@dataclass(frozen=True)
class Rule:
    """Where one token's row comes from, as mergekit's `tokenizer.tokens` (or its defaults) say: kind
    "model" (that model's row of the token), "token" (that model's row `row`), "zero", "mean" (of the
    models that have it); `force` puts it over every model's own row."""

    kind: str
    model: str | None = None
    row: int | None = None
    force: bool = False


@dataclass(frozen=True)
class Plan:
    """The output vocabulary of a merge and where each model's rows go in it."""

    tokens: tuple[str, ...]
    """The output's tokens by id."""
    rows: int
    """The output's vocabulary rows: the tokens, rounded up to `pad_to_multiple_of`."""
    tokenizers: Mapping[str, Tokenizer]
    """Each model's tokenizer (the base's for a model that has none, as mergekit takes it)."""
    positions: Mapping[str, npt.NDArray[np.int64]]
    """For each model, its row of each output token, -1 where it lacks the token."""
    rules: Mapping[str, Rule]
    """The config's `tokens`, by token."""
    base: str | None
    source: Tokenizer
    """The tokenizer the written one starts from."""
    appended: tuple[Mapping[str, Any], ...]
    """The added tokens' entries the written tokenizer gains, with their output ids."""
    _defaults: dict[tuple[str, ...], dict[int, Rule]] = field(default_factory=dict, compare=False, repr=False)

    def aligned(self, label: str, peers: Mapping[str, Mapping[str, Any]], entries: Sequence[str]) -> Aligned:
        """Model `label`'s tensors with `entries` (its vocabulary tensors) moved to the output's rows;
        `peers` are the tensors of every model the merge reads beside it (its own too), whose rows give
        the default rows, in mergekit's order (the models, then the base)."""
        return Aligned(self, label, peers, frozenset(entries))

    def kept(self, label: str) -> npt.NDArray[np.bool_]:
        """Which output tokens take the model's own row: those it has, unless the config forces them."""
        forced = np.array([token in self.rules and self.rules[token].force for token in self.tokens], bool)
        kept: npt.NDArray[np.bool_] = (self.positions[label] >= 0) & ~forced
        return kept

    def identity(self, label: str) -> bool:
        """Whether the model's row of each output token is the token's id."""
        return bool(np.array_equal(self.positions[label], np.arange(len(self.tokens))))

    def runs(self, label: str) -> list[tuple[int, int, int]]:
        """The model's kept rows as runs (output start, output stop, its first row) of consecutive
        tokens whose rows are consecutive too: a vocabulary that only grew is one run."""
        position, kept = self.positions[label], self.kept(label)
        at = np.flatnonzero(kept)
        if not at.size:
            return []
        breaks = np.flatnonzero((np.diff(at) != 1) | (np.diff(position[at]) != 1)) + 1
        return [(int(run[0]), int(run[-1]) + 1, int(position[run[0]])) for run in np.split(at, breaks)]

    def defaults(self, peers: tuple[str, ...]) -> dict[int, Rule]:
        """The rows a token some of `peers` lack (or a forced one) takes, by output id: mergekit's
        `assign_embedding_sources` with the config's `tokens` first."""
        if peers not in self._defaults:
            found: dict[int, Rule] = {}
            lacking = ~np.all(np.stack([self.positions[p] >= 0 for p in peers]), axis=0)
            ruled = [i for i, token in enumerate(self.tokens) if token in self.rules]
            for i in sorted({*np.flatnonzero(lacking).tolist(), *ruled}):  # every other token: each model's own row
                token = self.tokens[i]
                present = [p for p in peers if self.positions[p][i] >= 0]
                rule = self.rules.get(token)
                if rule is not None:
                    if rule.force or len(present) < len(peers):
                        if rule.model is not None and rule.model not in peers:
                            raise VocabularyError(f"tokenizer token {token!r} takes its row from model {rule.model!r}, "
                                                  "which this part of the merge does not read")
                        found[i] = rule
                elif len(present) < len(peers):
                    if len(present) == 1:
                        found[i] = Rule("model", present[0])
                    elif not present:
                        warnings.warn(f"token {token!r} is in no model's vocabulary: its row is zeros", stacklevel=2)
                        found[i] = Rule("zero")
                    elif self.base in present:
                        found[i] = Rule("model", self.base)
                    else:
                        found[i] = Rule("mean")
            self._defaults[peers] = found
        return self._defaults[peers]

    def check(self, peers: tuple[str, ...]) -> None:
        """VocabularyError, before any row is made, for a default row `peers` cannot give: a model
        that is not among them, lacks the token, or has no such row."""
        for i, rule in self.defaults(peers).items():
            if rule.model is None:
                continue
            row = self.positions[rule.model][i] if rule.kind == "model" else rule.row
            if row is None or not 0 <= row < self.tokenizers[rule.model].rows:
                raise VocabularyError(f"token {self.tokens[i]!r} takes its row from model {rule.model!r}, which has "
                                      f"{'no such token' if rule.kind == 'model' else f'no row {row}'}")

    def write(self, out: Path) -> None:
        """The output's tokenizer files into `out`: the source's, with the appended tokens."""
        for f in sorted(self.source.directory.iterdir()):
            if f.is_file() and is_tokenizer_file(f.name):
                if self.appended and f.name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json"):
                    checkpoints.write_text(out / f.name, _appended(f, self.appended))
                else:
                    shutil.copyfile(f, out / f.name)


def _appended(path: Path, appended: Sequence[Mapping[str, Any]]) -> str:
    """A tokenizer file with the appended added tokens: tokenizer.json's `added_tokens`,
    tokenizer_config.json's `added_tokens_decoder` (where it has one), added_tokens.json's map."""
    loaded = _json(path)
    if path.name == "tokenizer.json":
        loaded["added_tokens"] = [*(loaded.get("added_tokens") or []), *appended]
    elif path.name == "tokenizer_config.json" and isinstance(loaded.get("added_tokens_decoder"), dict):
        for entry in appended:
            loaded["added_tokens_decoder"][str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
    elif path.name == "added_tokens.json" and isinstance(loaded, dict):
        loaded |= {entry["content"]: entry["id"] for entry in appended}
    return json.dumps(loaded, indent=2, ensure_ascii=False) + "\n"


class Aligned(Mapping[str, npt.NDArray[Any]]):
    """A model's tensors with its vocabulary tensors moved to the output's rows, each made when read."""

    def __init__(self, plan: Plan, label: str, peers: Mapping[str, Mapping[str, Any]], entries: frozenset[str]) -> None:
        self.plan, self.label, self.peers, self.entries = plan, label, peers, entries
        self.inner = peers[label]

    def unmade(self, name: str) -> Any:
        """The tensor's shape and dtype without making it (a broadcast zero)."""
        inner = self.inner.unmade(name) if hasattr(self.inner, "unmade") else self.inner[name]
        if name not in self.entries:
            return inner
        dtype = _promoted([_unmade_of(tensors, name).dtype for tensors in self.peers.values()])
        return np.broadcast_to(np.zeros((), dtype), (self.plan.rows, *inner.shape[1:]))

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        if name not in self.entries:
            result: npt.NDArray[Any] = self.inner[name]
            return result
        plan, labels = self.plan, tuple(self.peers)
        arrays = {p: np.asarray(self.peers[p][name]) for p in labels}
        dtype = _promoted([a.dtype for a in arrays.values()])
        own, count = arrays[self.label], len(plan.tokens)
        kept = plan.kept(self.label)
        defaults = {i: rule for i, rule in plan.defaults(labels).items() if not kept[i]}
        if not defaults and plan.rows == own.shape[0] == count and own.dtype == dtype and kept.all() \
                and plan.identity(self.label):
            return own  # its vocabulary is the output's: nothing moves
        out = np.empty((plan.rows, *own.shape[1:]), dtype)
        for start, stop, first in plan.runs(self.label):  # rows that stay together move as one slice
            out[start:stop] = own[first:first + stop - start]
        for i in np.flatnonzero(~kept):
            rule = defaults.get(int(i))  # mergekit leaves a row no rule gives at zeros
            out[i] = _default_row(plan, rule, int(i), arrays, labels, dtype, own.shape[1:]) if rule is not None else 0
        if plan.rows > count:  # padding rows: the mean of the real ones, as mergekit (torch.mean) gives them
            work = np.float64 if dtype == np.float64 else np.float32
            out[count:] = out[:count].mean(axis=0, dtype=work).astype(dtype)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def _unmade_of(tensors: Mapping[str, Any], name: str) -> Any:
    return tensors.unmade(name) if hasattr(tensors, "unmade") else tensors[name]


def _default_row(plan: Plan, rule: Rule, i: int, arrays: Mapping[str, npt.NDArray[Any]], labels: Sequence[str],
                 dtype: np.dtype[Any], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    """Output token i's row where the model lacks it (or it is forced), as `rule` gives it: summed in
    the models' order from zeros, then divided, in the merge's dtype, as mergekit computes the mean."""
    if rule.kind == "zero":
        return np.zeros(shape, dtype)
    if rule.kind == "mean":
        total, count = np.zeros(shape, dtype), 0
        for p in labels:
            if plan.positions[p][i] >= 0:
                total = (total + arrays[p][plan.positions[p][i]].astype(dtype)).astype(dtype)
                count += 1
        mean: npt.NDArray[Any] = (total / np.asarray(count, dtype)).astype(dtype)
        return mean
    assert rule.model is not None
    row = plan.positions[rule.model][i] if rule.kind == "model" else rule.row
    assert row is not None  # Plan.check refused any other before the merge began
    taken: npt.NDArray[Any] = arrays[rule.model][row].astype(dtype)
    return taken


def _promoted(dtypes: Sequence[np.dtype[Any]]) -> np.dtype[Any]:
    """The dtype rows of these dtypes are merged in, as torch promotes them (bfloat16 with float16:
    float32)."""
    first = np.dtype(dtypes[0])
    if all(np.dtype(d) == first for d in dtypes):
        return first
    try:
        return np.dtype(np.result_type(*dtypes))
    except TypeError:  # ml_dtypes' bfloat16 against float16
        return np.dtype(np.float32)


# -- the plan from a config ----------------------------------------------------------------------------


def chosen_source(config: Mapping[str, Any]) -> Any:
    """The config's tokenizer source (`tokenizer_source`, or `tokenizer`'s `source`, "union" by
    default as in mergekit), None where it names no tokenizer; ValueError for both at once."""
    tokenizer = config.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, Mapping):
        raise VocabularyError(f"mergekit key 'tokenizer' is {tokenizer!r}; give a mapping with its 'source'")
    if config.get("tokenizer_source") is not None and tokenizer is not None:
        raise VocabularyError("give 'tokenizer_source' or 'tokenizer', not both (as mergekit)")
    if tokenizer is not None:
        for key in tokenizer:
            if key not in ("source", "tokens", "pad_to_multiple_of"):
                raise VocabularyError(f"tokenizer key {key!r} is not one mergekit has (source, tokens, "
                                      "pad_to_multiple_of)")
        return tokenizer.get("source", "union")
    return config.get("tokenizer_source")


def plan(config: Mapping[str, Any], directories: Mapping[str, Path], names: Sequence[str]) -> Plan | None:
    """The output vocabulary of a config's merge, None where the config names no tokenizer (the base's
    files are copied and the rows merged as they are). `directories` maps each model the config names
    (`names`, in mergekit's order) to its directory, and the tokenizer source's where it names a
    model that is not merged (its tokenizer only, as mergekit loads it)."""
    chosen = chosen_source(config)
    if chosen is None:
        _warn_if_different(directories, names)
        return None
    settings = config.get("tokenizer") or {}
    base = str(config["base_model"]) if config.get("base_model") in directories else None
    first = base if base is not None else names[0]
    raw = read_tokenizer(first, directories[first])
    if chosen in ("base", "union"):  # its files are written: tokens beyond its rows would stay in them
        _check_stripped(first, raw)
    tokenizers: dict[str, Tokenizer] = {first: _stripped(raw)}
    for name in names:
        if name != first:
            directory = directories[name]
            if directory.is_dir() and not (directory / "tokenizer.json").is_file():
                warnings.warn(f"model {name!r} has no tokenizer.json: taken to have {first!r}'s vocabulary, as "
                              "mergekit takes it", stacklevel=3)
                tokenizers[name] = Tokenizer(directory, tokenizers[first].vocab, tokenizers[first].added,
                                             _rows(name, directory))
            else:
                tokenizers[name] = read_tokenizer(name, directory)
    if chosen == "base":
        source, vocab, appended = tokenizers[first], tokenizers[first].used, []
    elif chosen == "union":
        source, vocab, appended = tokenizers[first], *_union(tokenizers, first)
    elif str(chosen) in tokenizers:  # as that model's tokenizer loads: every token it lists
        source = raw if str(chosen) == first else tokenizers[str(chosen)]
        vocab, appended = dict(source.vocab), []
    elif isinstance(chosen, str) and chosen in directories:  # a model merged for its tokenizer only
        source = read_tokenizer(chosen, directories[chosen])
        vocab, appended = dict(source.vocab), []
    elif isinstance(chosen, str):
        raise VocabularyError(f"tokenizer source {chosen!r} is not 'base', 'union' or a model's directory")
    else:
        raise VocabularyError(f"tokenizer source {chosen!r}: give 'base', 'union' or a model's name")
    rules = _rules(settings.get("tokens") or {}, tokenizers)
    for token in rules:  # mergekit adds the tokens the config lists to the output's vocabulary
        if token not in vocab:
            appended.append({"id": _next_id(vocab), "content": token, **PLAIN_TOKEN})
            vocab[token] = appended[-1]["id"]
    tokens = _by_id(vocab, "the output tokenizer")
    positions = {name: _positions(name, tokenizer, tokens) for name, tokenizer in tokenizers.items()}
    return Plan(tuple(tokens), _padded(len(tokens), settings.get("pad_to_multiple_of")), tokenizers, positions,
                rules, base, source, tuple(appended))


def _warn_if_different(directories: Mapping[str, Path], names: Sequence[str]) -> None:
    """Warn where models whose rows are merged as they are (no tokenizer named) have tokenizers that
    give a token different ids: row i then means different tokens in them."""
    files = {name: directories[name] / "tokenizer.json" for name in names}
    present = {name: path for name, path in files.items() if path.is_file()}
    if len({path.read_bytes() for path in present.values()}) < 2:  # one tokenizer (the usual case): not parsed
        return
    vocabs: dict[str, Mapping[str, int]] = {}
    for name in present:
        try:
            vocabs[name] = read_tokenizer(name, directories[name]).vocab
        except VocabularyError:
            continue
    if len(vocabs) < 2:
        return
    (first, vocab), *others = vocabs.items()
    for name, other in others:
        moved = [(token, i) for token, i in sorted(vocab.items(), key=lambda item: item[1]) if other.get(token) != i]
        if moved or len(other) != len(vocab):
            token, i = moved[0] if moved else next((t, i) for t, i in other.items() if t not in vocab)
            owner, peer = (first, name) if moved else (name, first)
            there = f"token {vocabs[peer][token]} of" if token in vocabs[peer] else "not in"
            warnings.warn(f"the models' vocabularies differ ({token!r} is token {i} of {owner!r} but {there} "
                          f"{peer!r}); their rows are merged as they are; name a tokenizer (tokenizer_source: base, "
                          "or union) to align them as mergekit does", stacklevel=4)
            return


def _check_stripped(name: str, tokenizer: Tokenizer) -> None:
    """Refuse a base tokenizer with tokens beyond its rows, which mergekit rewrites without them."""
    beyond = sorted(i for i in tokenizer.vocab.values() if i >= tokenizer.rows)
    if beyond:
        raise VocabularyError(f"model {name!r}'s tokenizer has {len(beyond)} token(s) at ids {beyond[0]} and up, beyond "
                              f"its {tokenizer.rows} embedding rows (config.json vocab_size); remove them from its "
                              "tokenizer.json first")


def _stripped(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer without the tokens beyond its rows, as mergekit takes the base's."""
    added = {content: entry for content, entry in tokenizer.added.items() if int(entry["id"]) < tokenizer.rows}
    return Tokenizer(tokenizer.directory, tokenizer.used, added, tokenizer.rows)


def _union(tokenizers: Mapping[str, Tokenizer], first: str) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """mergekit's union vocabulary: the base's, then the plain tokens other models have and it lacks
    (each model's in id order), then the added tokens it lacks (the first model's settings)."""
    vocab = dict(tokenizers[first].used)
    added: dict[str, Mapping[str, Any]] = {}
    for tokenizer in tokenizers.values():
        for content, entry in tokenizer.added.items():
            if int(entry["id"]) < tokenizer.rows:
                added.setdefault(content, entry)
    appended: list[dict[str, Any]] = []
    for tokenizer in tokenizers.values():
        for token, _ in sorted(tokenizer.used.items(), key=lambda item: item[1]):
            if token not in vocab and token not in added:
                appended.append({"id": _next_id(vocab), "content": token, **PLAIN_TOKEN})
                vocab[token] = appended[-1]["id"]
    for content, entry in added.items():
        if content not in vocab:
            appended.append({**entry, "id": _next_id(vocab)})
            vocab[content] = appended[-1]["id"]
    return vocab, appended


def _next_id(vocab: Mapping[str, int]) -> int:
    return max(vocab.values(), default=-1) + 1


def _by_id(vocab: Mapping[str, int], what: str) -> list[str]:
    """A vocabulary's tokens in id order; VocabularyError where its ids are not 0, 1, ... with none twice."""
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise VocabularyError(f"{what}'s token ids are not 0 to {len(tokens) - 1}, each once; its rows cannot be "
                              "laid out")
    return tokens


def _positions(name: str, tokenizer: Tokenizer, tokens: Sequence[str]) -> npt.NDArray[np.int64]:
    """The model's row of each output token (-1 where it lacks it); VocabularyError for a token whose id
    is beyond the model's rows."""
    position = np.array([tokenizer.vocab.get(token, -1) for token in tokens], np.int64)
    beyond = np.flatnonzero(position >= tokenizer.rows)
    if beyond.size:
        raise VocabularyError(f"model {name!r}'s token {tokens[beyond[0]]!r} has id {position[beyond[0]]}, beyond its "
                              f"{tokenizer.rows} embedding rows (config.json vocab_size)")
    return position


def _padded(count: int, multiple: Any) -> int:
    if multiple is None:
        return count
    if type(multiple) is not int or multiple <= 0:
        raise VocabularyError(f"tokenizer pad_to_multiple_of is {multiple!r}; give a positive whole number")
    return -(-count // multiple) * multiple


def _rules(tokens: Any, tokenizers: Mapping[str, Tokenizer]) -> dict[str, Rule]:
    """The config's `tokens`: each token's source (a model's name; {kind: zero}; {kind: model_token,
    model, token or token_id}) and `force`."""
    if not isinstance(tokens, Mapping):
        raise VocabularyError(f"tokenizer tokens is {tokens!r}; give a mapping of token to its source")
    rules: dict[str, Rule] = {}
    for token, setting in tokens.items():
        setting = setting or {}
        if not isinstance(setting, Mapping) or any(k not in ("source", "force") for k in setting):
            raise VocabularyError(f"tokenizer token {token!r}: give its 'source' and optionally 'force'")
        force, source = setting.get("force", False), setting.get("source")
        if not isinstance(force, bool):
            raise VocabularyError(f"tokenizer token {token!r}: force is {force!r}; give true or false")
        if isinstance(source, str):
            rules[str(token)] = Rule("model", _known(source, token, tokenizers), force=force)
        elif isinstance(source, Mapping) and source.get("kind") == "zero" and len(source) == 1:
            rules[str(token)] = Rule("zero", force=force)
        elif isinstance(source, Mapping) and source.get("kind") == "model_token":
            model = _known(str(source.get("model")), token, tokenizers)
            if ("token" in source) == ("token_id" in source) or set(source) - {"kind", "model", "token", "token_id"}:
                raise VocabularyError(f"tokenizer token {token!r}: a model_token source gives its model and one of "
                                      "token or token_id")
            row = source.get("token_id")
            if "token" in source:
                row = tokenizers[model].vocab.get(str(source["token"]))
                if row is None:
                    raise VocabularyError(f"tokenizer token {token!r}: token {source['token']!r} is not in model "
                                          f"{model!r}'s vocabulary")
            if type(row) is not int:
                raise VocabularyError(f"tokenizer token {token!r}: token_id is {row!r}; give a whole number")
            rules[str(token)] = Rule("token", model, row, force)
        else:
            raise VocabularyError(f"tokenizer token {token!r}: its source is {source!r}; give a model's name, "
                                  "{kind: zero} or {kind: model_token, model: ..., token: ...}")
    return rules


def _known(model: str, token: Any, tokenizers: Mapping[str, Tokenizer]) -> str:
    if model not in tokenizers:
        raise VocabularyError(f"tokenizer token {token!r} takes its row from {model!r}, which is not a model of the "
                              "config")
    return model


# -- the chat template ---------------------------------------------------------------------------------


def chat_template(config: Mapping[str, Any], directories: Mapping[str, Path], names: Sequence[str]) -> str | None:
    """The chat template a config's `chat_template` sets, as mergekit reads it: "auto" the template most
    of the models have (stripped; of equally many, the first model's in the config's order), a
    template's text itself (Jinja, with a "{"); None where it sets none (or "auto" finds none).
    mergekit's bundled templates by name (`MERGEKIT_TEMPLATES`) are not applied: a warning says so.
    VocabularyError for anything else."""
    template = config.get("chat_template")
    if template is None or template == "":
        return None
    if not isinstance(template, str):
        raise VocabularyError(f"chat_template is {template!r}; give 'auto' or a template's text")
    if template == "auto":
        found = [t.strip() for name in names if (t := read_chat_template(directories[name])) and t.strip()]
        return Counter(found).most_common(1)[0][0] if found else None
    if template in MERGEKIT_TEMPLATES:
        warnings.warn(f"chat_template {template!r} is not applied: it names a template file mergekit ships, which "
                      "weightavg does not; give the template's text, or 'auto' (the one most models have)",
                      stacklevel=3)
        return None
    if len(template) < 20 or "{" not in template:
        raise VocabularyError(f"chat_template {template!r} is not a template (Jinja text with '{{'), 'auto' or one of "
                              f"mergekit's names ({', '.join(MERGEKIT_TEMPLATES)})")
    return template


def read_chat_template(directory: Path) -> str | None:
    """A model's chat template: its chat_template.jinja, else tokenizer_config.json's `chat_template`
    (of a list of named ones, "default"), as transformers loads it."""
    if not directory.is_dir():
        return None
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    loaded = _json(config) if config.is_file() else None
    template = loaded.get("chat_template") if isinstance(loaded, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def write_chat_template(out: Path, template: str) -> None:
    """The template into a written tokenizer: chat_template.jinja (which transformers reads first), and
    tokenizer_config.json's `chat_template` where that file is there (which older versions read)."""
    checkpoints.write_text(out / "chat_template.jinja", template)
    config = out / "tokenizer_config.json"
    loaded = _json(config) if config.is_file() else None
    if isinstance(loaded, dict):
        loaded["chat_template"] = template
        checkpoints.write_text(config, json.dumps(loaded, indent=2, ensure_ascii=False) + "\n")
