"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class PhalanxError(Exception):
    """A problem the user can fix: the message names the value and the fix."""

    exit_code = 2


class ConfigError(PhalanxError):
    """An invalid configuration value, key or combination."""
