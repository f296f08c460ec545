"""Hugging Face repository IDs in mergekit configs: the checkpoints they name, downloaded as mergekit
downloads them, safetensors only.

Why: a mergekit config names its models as the Hub names them (`mistralai/Mistral-7B-v0.1`,
`org/model@revision`, `org/model+org/adapter`), and mergekit-yaml downloads what is not a local
path. `weightavg merge` takes the same configs, so it resolves the same names: a name that is not a
local path and reads as a repository ID is fetched into the Hugging Face cache (`HF_HUB_CACHE`,
`HF_HOME`; `HF_HUB_OFFLINE=1` reads the cache alone; a token from `hf auth login` or `HF_TOKEN` for
gated models) through `huggingface_hub.snapshot_download`, and its snapshot folder is read as a local
directory would be.

What is downloaded: the weights as safetensors, the JSON files beside them (config, index,
tokenizer), `tokenizer.model` and chat templates (`*.jinja`); for an adapter, its safetensors and
JSON. Never pickled weights (`*.bin`, `*.pt`, `*.pth`): mergekit falls back to those for a
repository without safetensors, this client refuses such a repository instead, since loading a
pickle runs code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

MODEL_FILES = ("*.safetensors", "*.json", "tokenizer.model", "*.jinja")
"""What a model's download takes: weights, config, index and tokenizer files, chat templates."""
ADAPTER_FILES = ("*.safetensors", "*.json")
"""What an adapter's download takes: adapter_model.safetensors and adapter_config.json."""
TOKENIZER_FILES = ("*.json", "tokenizer.model", "*.jinja")
"""What a tokenizer source's download takes: its tokenizer and config files, no weights."""

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
"""namespace/name, as the Hub spells repository IDs (letters, digits, '-', '_', '.')."""


def is_repo_id(name: str) -> bool:
    """Whether a config's name reads as a Hub repository ID (`org/name`, optionally `@revision`)
    rather than a local path (which has no other shape to go by: ./x, /x, a/b/c, x.safetensors)."""
    repo, _ = split_revision(name)
    return _REPO_ID.fullmatch(repo) is not None and not repo.endswith(".safetensors") and ".." not in repo


def split_revision(name: str) -> tuple[str, str | None]:
    """`org/name@revision` as (org/name, revision), as mergekit splits it; (name, None) without '@'.
    ValueError for more than one '@', which mergekit refuses too."""
    if name.count("@") > 1:
        raise ValueError(f"model {name!r}: give a repository and at most one @revision")
    repo, _, revision = name.partition("@")
    return repo, revision or None


def download(name: str, files: tuple[str, ...] = MODEL_FILES, what: str = "model", *,
             cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local snapshot folder of the repository `name` names (`org/name[@revision]`), fetched
    into the Hugging Face cache (or `cache_dir`) where it is not there yet (only `files`' patterns). ValueError, with
    what to do, where huggingface_hub is missing, the repository or revision is not found, it is
    gated, the Hub cannot be reached and the cache lacks it, or it holds no safetensors weights."""
    repo, revision = split_revision(name)
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(f"{what} {name!r} is a Hugging Face repository, whose download needs huggingface_hub: "
                         "pip install 'weightavg[merge]' (or download it yourself and name the directory)") from None
    try:
        folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(files),
                                                        cache_dir=None if cache_dir is None else Path(cache_dir)))
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError, ValueError) as exc:  # told apart below
        raise ValueError(_download_failed(what, name, exc)) from None
    if "*.safetensors" in files and not any(folder.rglob("*.safetensors")):
        raise ValueError(f"{what} {name!r} has no .safetensors files on the Hub (only pickled weights, such as "
                         "pytorch_model.bin, which weightavg never loads: loading a pickle runs code); convert it "
                         "to safetensors first, or name a local directory that holds safetensors")
    return folder


def _download_failed(what: str, name: str, exc: BaseException) -> str:
    """Why a download failed and what to do, from huggingface_hub's error (by its class name, so that
    versions which moved their error classes read alike)."""
    kind = type(exc).__name__
    hint: dict[str, str] = {
        "RepositoryNotFoundError": "no such repository (or it is private: log in with `hf auth login` or set HF_TOKEN)",
        "GatedRepoError": "the repository is gated: accept its terms on the Hub, then log in (`hf auth login`) or set "
                          "HF_TOKEN",
        "RevisionNotFoundError": "no such revision (branch, tag or commit) in the repository",
        "LocalEntryNotFoundError": "it is not in the Hugging Face cache and the Hub cannot be reached (or HF_HUB_OFFLINE "
                                   "is set): download it where the Hub can be reached, or name a local directory",
    }
    reason = hint.get(kind, f"{kind}: {_first_line(exc)}")
    return (f"{what} {name!r} is not a local path, and as a Hugging Face repository it could not be downloaded: "
            f"{reason}")


def _first_line(exc: Any) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
