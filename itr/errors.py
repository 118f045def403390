"""Errors about the user's input. The CLI prints these as one line, without a traceback."""


class ItrError(Exception):
    pass


class ConfigError(ItrError, ValueError):
    """A recipe key or value is wrong; the message names the key."""


class DataError(ItrError, ValueError):
    """Input data is missing or malformed; the message names the file."""


class CheckpointError(ItrError, FileNotFoundError):
    """Not a usable checkpoint; the message names the directory."""


class DamagedCheckpointError(CheckpointError):
    """A file of a checkpoint is truncated or corrupt; the message names it and what to do instead."""


class LaunchError(ItrError, RuntimeError):
    """The processes started are not the ones asked for."""


def did_you_mean(word, options):
    """`` (did you mean X?)`` naming the option closest to a mistyped ``word``, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
