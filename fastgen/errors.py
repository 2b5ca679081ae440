"""Exceptions raised by fastgen. Every message names the problem and the fix."""


class FastgenError(Exception):
    """Base class of fastgen's user-facing errors."""


class ConfigError(FastgenError, ValueError):
    """A recipe or command-line override is invalid (unknown key, wrong type)."""


class ModelLoadError(FastgenError, ValueError):
    """A model folder or weights file is missing, incomplete or of an unsupported class."""


class DataError(FastgenError, ValueError):
    """A data source is empty, unreadable or lost too many items."""


class ResolutionError(FastgenError, ValueError):
    """An image size does not fit the model (e.g. not divisible by the VAE factor)."""


class UsageError(ConfigError):
    """A command-line argument is missing, unknown or of the wrong form (argparse's errors, raised)."""
