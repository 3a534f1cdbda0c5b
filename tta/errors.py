"""The few exception types users see. Each message says what was wrong and what was expected."""


class TTAError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class ConfigError(TTAError, ValueError):
    """A configuration key, value or name is not valid."""


class MissingFileError(TTAError, FileNotFoundError):
    """A data set, checkpoint or asset is not on disk and cannot be downloaded here."""


class InputError(TTAError, ValueError):
    """A batch handed to an adapter is not a valid image batch."""
