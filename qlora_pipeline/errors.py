"""Errors a user can cause. The CLI prints them as one line and exits with code 2; bugs keep their traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, paths): one clear line naming what is wrong and how to fix it."""


class ConfigError(UserError):
    """A config file or override that cannot be loaded or does not validate."""


class DataError(UserError):
    """Data that cannot be read or leaves nothing usable."""
