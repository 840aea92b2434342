"""Errors that meddiff raises for bad input; the CLI prints them without a traceback.

Every message names the file, key or value at fault and what was expected (diffusers' rule: a clear
error over silent correction).
"""


class MeddiffError(Exception):
    """Base class of errors caused by user input rather than by a bug."""


class ConfigError(MeddiffError, ValueError):
    """A configuration key, value, preset or file is wrong."""


class DataError(MeddiffError, ValueError):
    """An input file or folder is missing, corrupt, or not in the expected format."""


class ModelError(MeddiffError, ValueError):
    """A model directory, weights file or registry reference cannot be used."""
