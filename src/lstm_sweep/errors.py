"""The small exception tree: what the user got wrong vs. what went wrong in one trial."""

from __future__ import annotations


class LstmSweepError(Exception):
    """Base of every error lstm-sweep raises on purpose."""


class ConfigError(LstmSweepError, ValueError):
    """A bad value for a named setting; the message names the key and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str, source: str | None = None) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: got {value!r}, expected {allowed}")


class SweepFileError(ConfigError):
    """Bad input in a sweep file (unreadable, malformed YAML, bad key or value)."""


class TrialFailed(LstmSweepError):
    """One trial raised; the sweep records it as failed and goes on."""
