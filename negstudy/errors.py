"""Errors negstudy reports to the user as one line (the app exits with status 2)."""


class ConfigError(ValueError):
    """A config value that cannot work; ``str(err)`` names the key, the bad value and what is allowed."""


class ModelNotFoundError(ConfigError):
    """A model that is not on disk and cannot be fetched; the message says how to get it."""
