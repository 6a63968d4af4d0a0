"""Hugging Face hub ids -> local paths, the way ``from_pretrained`` finds them.

    resolve("path/to/dir")                                    -> the path itself (it exists)
    resolve("microsoft/bitnet-b1.58-2B-4T")                   -> .../snapshots/<sha>   (a model directory)
    resolve("microsoft/bitnet-b1.58-2B-4T-gguf/ggml-model-i2_s.gguf")  -> .../snapshots/<sha>/ggml-model-i2_s.gguf

A hub id is ``org/name``; a file inside a repository is ``org/name/path/in/repo`` (everything after the
second slash). Order of look-up, as in ``huggingface_hub``:

1. a local file or directory of that name wins;
2. the local cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``,
   else ``~/.cache/huggingface/hub``; in it ``models--org--name/refs/<revision>`` holds a commit hash and
   ``models--org--name/snapshots/<hash>/`` the files (what ``huggingface-cli download`` leaves);
3. unless ``HF_HUB_OFFLINE`` is set, a download through ``huggingface_hub`` (the optional extra
   ``pip install 'refbitnet[hub]'``) into that same cache: a model directory's JSON, safetensors and
   tokenizer files only, or the one file named.

Every failure is one CheckpointError that says what to run instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

# what a model directory needs (config, weights, tokenizer, templates); not the GGUF or PyTorch copies
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model")
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}


def hub_cache_dir() -> Path:
    """The hub cache directory, from the environment variables huggingface_hub reads."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """"org/name" -> ("org/name", None); "org/name/dir/file.gguf" -> ("org/name", "dir/file.gguf");
    None if text cannot be a hub id (an absolute path, "..", empty parts, odd characters)."""
    if not isinstance(text, str) or text.startswith(("/", "~", ".")) or "\\" in text:
        return None
    parts = text.split("/")
    if len(parts) < 2 or not all(_PART.match(p) and ".." not in p for p in parts):
        return None
    repo = "/".join(parts[:2])
    return repo, "/".join(parts[2:]) or None


def resolve(path_or_id, revision: str = "main") -> Path:
    """A local model directory or file for path_or_id (module docstring). Raises CheckpointError."""
    if isinstance(path_or_id, os.PathLike):
        path_or_id = os.fspath(path_or_id)
    if not isinstance(path_or_id, str):
        raise CheckpointError(f"model: expected a directory, a file or a hub id 'org/name', "
                              f"found {type(path_or_id).__name__}")
    if os.path.exists(path_or_id):
        return Path(path_or_id)
    parsed = parse_hub_id(path_or_id)
    if parsed is None:
        raise CheckpointError(f"{path_or_id}: expected a model directory, a .gguf file or a Hugging Face id "
                              f"('org/name', 'org/name/file.gguf'), found nothing there")
    repo, filename = parsed
    found = cached(repo, filename, revision)
    if found is not None:
        return found
    command = f"huggingface-cli download {repo}" + (f" {filename}" if filename else "")
    where = f"{path_or_id!r} is not a local path, and the Hugging Face cache {hub_cache_dir()} does not hold it"
    if is_offline():
        raise CheckpointError(f"{where}; HF_HUB_OFFLINE is set, so nothing is downloaded (on a machine with "
                              f"network: `{command}`, then copy the cache)")
    return _download(repo, filename, revision, where, command)


def cached(repo: str, filename: str | None = None, revision: str = "main") -> Path | None:
    """The cached snapshot directory (or file in it) of repo at revision, or None if not cached."""
    repo_dir = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    if _SHA.match(revision):
        commit = revision
    else:
        ref = repo_dir / "refs" / revision
        if not ref.is_file():
            return None
        commit = ref.read_text(encoding="utf-8").strip()
        if not _SHA.match(commit):
            raise CheckpointError(f"{ref}: expected a 40-hex-digit commit hash, found {commit[:60]!r}")
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    if filename is not None:
        target = snapshot / filename
        return target if target.exists() else None
    if (snapshot / "config.json").exists():
        return snapshot
    ggufs = sorted(p.name for p in snapshot.glob("*.gguf"))
    if len(ggufs) == 1:                      # a GGUF repository holding one model file
        return snapshot / ggufs[0]
    if ggufs:
        raise CheckpointError(f"{repo}: the cached repository holds several GGUF files ({', '.join(ggufs)}); "
                              f"name one, e.g. {repo}/{ggufs[0]}")
    return None


def _download(repo: str, filename: str | None, revision: str, where: str, command: str) -> Path:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{where}, and huggingface_hub is not installed to download it: "
                              f"`pip install 'refbitnet[hub]'` (or `{command}`)") from None
    try:
        if filename is not None:
            return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision,
                                                        cache_dir=hub_cache_dir()))
        path = Path(huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=hub_cache_dir(),
                                                      allow_patterns=list(MODEL_FILE_PATTERNS)))
    except Exception as exc:   # offline, unknown repo, gated repo, HTTP errors: all end the same way
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}, and downloading it failed ({type(exc).__name__}: {reason}); "
                              f"check the id and the network, or run `{command}`") from None
    if not (path / "config.json").exists():
        raise CheckpointError(f"{repo}: the repository has no config.json (a GGUF repository? name the file: "
                              f"{repo}/FILE.gguf)")
    return path
