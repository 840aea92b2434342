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


class ClusterError(MeddiffError, RuntimeError):
    """Ray could not be started or joined (a loaded machine, a cluster that does not answer), or
    the cluster lost what a job needed (a node, its workers) beyond what Ray recovers from."""


def find_user_error(err: BaseException | None) -> MeddiffError | None:
    """The :class:`MeddiffError` behind ``err``, also when it was raised inside a Ray task or
    Ray Data stage (Ray re-raises those wrapped, with the original as cause)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, MeddiffError):
            cause = getattr(err, "cause", None)  # RayTaskError(DataError) carries the original
            return cause if isinstance(cause, MeddiffError) else err
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def user_message(err: MeddiffError) -> str:
    """The error's own message, without the retry advice Ray Data appends to it."""
    return str(err).split("\nFailed to apply UDF transform")[0]
