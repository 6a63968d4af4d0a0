"""refbitnet: BitNet b1.58 2B4T in plain NumPy, with Numba kernels where speed matters."""

__version__ = "0.1.0"
