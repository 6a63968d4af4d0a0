"""``refbitnet.load`` and ``refbitnet.save``: a model from anything a user points at, and back to files.

A local directory (a Hugging Face BitNet checkpoint), a ``.gguf`` file, a Hugging Face hub id (the local
cache first, see refbitnet.hub), or nothing (the model shipped inside the package). Here, rather than in the
package's ``__init__``, so that modules inside refbitnet that load a model (the CLI, the GGUF exporter, the
oracle) import this module and never the package itself: imports keep pointing one way.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import load_model_dir, save_model
from .errors import CheckpointError, GGUFError
from .hub import resolve

SHIPPED = Path(__file__).parent / "shipped"


def load(path=None, numerics: str = "int", backend: str = "auto"):
    """A Model from a model directory (config.json, model.safetensors or its shards, tokenizer files,
    generation_config.json), a .gguf file or a hub id; path=None loads the model shipped in the package.

    numerics: "int" (int8 x ternary -> int32, default), "fake-quant", or the whole model as transformers
    computes it in bf16, "transformers-bf16" (release checkpoints) / "transformers-legacy-bf16" (divide-
    convention ones; refbitnet/model_bf16.py); backend: "auto" (default: the
    Numba kernels where they can run, else NumPy), "numba", or "numpy" (the readable path, to step through).
    The checkpoint may be the packed release (uint8 + weight_scale) or a bf16 master (quantized at load);
    ``model.source_format`` says which was found.
    """
    if path is None:
        if not (SHIPPED / "config.json").exists():
            raise CheckpointError(f"{SHIPPED}: no model ships with this refbitnet build yet; pass a model "
                                  f"directory, e.g. refbitnet.load('bitnet-b1.58-2B-4T')")
        return load_model_dir(SHIPPED, numerics=numerics, backend=backend)
    local = Path(path)
    if local.suffix.lower() == ".gguf" and local.parent.is_dir() and not local.exists():
        raise GGUFError(f"{local}: file not found (a .gguf file in an existing directory)")
    path = resolve(path)                          # a local path as-is; org/name from the HF cache or hub
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path}: expected a model directory or a .gguf file, found another file")
        from .gguf.mapping import load_gguf
        return load_gguf(path, numerics=numerics, backend=backend)
    return load_model_dir(path, numerics=numerics, backend=backend)


def save(model, path) -> None:
    """Write model to directory path in the packed release layout (config.json, model.safetensors, the
    tokenizer files and generation_config.json when the model has them)."""
    save_model(model, path)
