"""The one exception family refbitnet raises for bad input.

Every problem refbitnet detects in what it is given (a file, a tensor, an argument) raises a
subclass of :class:`RefBitNetError`. It derives from ``ValueError`` so ``except ValueError`` keeps
working; :class:`RefBitNetTypeError` also derives from ``TypeError`` for wrong dtypes and types.
Messages name the thing (file, tensor, argument), what was expected and what was found.
"""


class RefBitNetError(ValueError):
    """Base class of every error refbitnet raises about its input."""


class RefBitNetTypeError(RefBitNetError, TypeError):
    """An argument has the wrong type or dtype."""


class ConfigError(RefBitNetError):
    """A model configuration (config.json or a Config) is missing keys or contradicts itself."""


class CheckpointError(RefBitNetError):
    """A checkpoint file is missing, truncated, or holds tensors of the wrong name, shape or dtype."""


class GGUFError(CheckpointError):
    """A GGUF file is malformed or is not a BitNet b1.58 model."""


class TokenizerError(RefBitNetError):
    """A tokenizer file is missing or invalid, or token ids are out of range."""
