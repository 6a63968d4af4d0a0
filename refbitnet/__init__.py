"""refbitnet: BitNet b1.58 2B4T in plain NumPy, with Numba kernels where speed matters.

    import refbitnet
    model = refbitnet.load("path/to/bitnet-b1.58-2B-4T")     # a Hugging Face model directory
    logits = model.forward(ids)                               # float32 [S, V]
    new_ids = model.generate("Hello", max_new_tokens=32)
    refbitnet.save(model, "out_dir")                          # the packed release layout
"""

__version__ = "0.1.0"

__all__ = ["load", "save", "Model", "Config", "BITNET_2B4T", "__version__"]


def load(path=None, numerics: str = "int", backend: str = "auto"):
    """Load a model directory (config.json, model.safetensors or its shards, tokenizer.json) -> Model.

    path=None loads the model shipped inside the package (refbitnet/shipped), if there is one.
    numerics: "int" (int8 x ternary -> int32, default) or "fake-quant"; backend: "auto" (default: the
    Numba kernels where they can run, else NumPy), "numba", or "numpy" (the readable path, to step through).
    The checkpoint may be the packed release (uint8 + weight_scale) or a bf16 master (quantized at load);
    ``model.source_format`` says which was found.
    """
    from pathlib import Path

    from .checkpoint import load_model_dir
    from .errors import CheckpointError
    if path is None:
        shipped = Path(__file__).parent / "shipped"
        if not (shipped / "config.json").exists():
            raise CheckpointError(f"{shipped}: no model ships with this refbitnet build yet; pass a model "
                                  f"directory, e.g. refbitnet.load('bitnet-b1.58-2B-4T')")
        path = shipped
    else:
        from .hub import resolve
        path = resolve(path)                          # a local path as-is; org/name from the HF cache or hub
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise CheckpointError(f"{path}: expected a model directory or a .gguf file, found another file")
            from .gguf import load_gguf
            return load_gguf(path, numerics=numerics, backend=backend)
    return load_model_dir(path, numerics=numerics, backend=backend)


def save(model, path) -> None:
    """Write model to directory path in the packed release layout (config.json, model.safetensors,
    tokenizer.json when the model has one)."""
    from .checkpoint import save_model
    save_model(model, path)


def __getattr__(name):
    if name == "Model":
        from .api import Model
        return Model
    if name in ("Config", "BITNET_2B4T"):
        from . import config
        return getattr(config, name)
    raise AttributeError(f"module 'refbitnet' has no attribute {name!r}")
