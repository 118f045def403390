"""Errors about the user's input. The CLI prints these as one line, without a traceback."""


class ItrError(Exception):
    pass


class ConfigError(ItrError, ValueError):
    """A recipe key or value is wrong; the message names the key."""


class DataError(ItrError, ValueError):
    """Input data is missing or malformed; the message names the file."""


class CheckpointError(ItrError, FileNotFoundError):
    """Not a usable checkpoint; the message names the directory."""


class LaunchError(ItrError, RuntimeError):
    """The processes started are not the ones asked for."""
