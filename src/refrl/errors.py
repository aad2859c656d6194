"""User-facing errors. The CLI prints ``RefrlError`` as one line and exits non-zero."""


class RefrlError(Exception):
    """An error caused by the user's input (config, data, paths), with a readable message."""


class ConfigError(RefrlError):
    """A bad configuration key or value; the message names the key and the allowed values."""
