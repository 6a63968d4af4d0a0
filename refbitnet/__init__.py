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
    """A Model from a model directory, a .gguf file, a hub id, or (None) the shipped model: see
    refbitnet.loading.load."""
    from .loading import load as _load
    return _load(path, numerics=numerics, backend=backend)


def save(model, path) -> None:
    """Write model to directory path in the packed release layout: see refbitnet.loading.save."""
    from .loading import save as _save
    _save(model, path)


def __getattr__(name):
    if name == "Model":
        from .api import Model
        return Model
    if name in ("Config", "BITNET_2B4T"):
        from . import config
        return getattr(config, name)
    raise AttributeError(f"module 'refbitnet' has no attribute {name!r}")
