"""Exceptions that the CLI turns into one clear line on stderr (exit code 2)."""


class PrunewiseError(Exception):
    """A problem with the user's input or environment (bad name, missing data, unreadable model)."""


class ConfigError(PrunewiseError, ValueError):
    """An invalid configuration value; the message starts with the field name."""
