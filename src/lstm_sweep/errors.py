"""The small exception tree: what the user got wrong. (A trial that raises is a result, `executor.JobFailed`.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload


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


_LIST_FORM = object()


class SweepFileError(ConfigError):
    """Bad input in a sweep file (unreadable, malformed YAML, bad keys or values).

    `problems` holds every problem found, one line each (`<file>: <key.path>: got ..., expected ...`);
    str(err) is those lines joined by newlines. It stays a ConfigError so callers treat it as a usage error.
    Two forms: SweepFileError(lines, source) for collected problems, or the ConfigError form
    SweepFileError(key, value, allowed, source) for one problem.
    """

    @overload
    def __init__(self, problems: Sequence[str] | str, *, source: str | None = None) -> None: ...

    @overload
    def __init__(self, problems: Sequence[str] | str, source: str | None, /) -> None: ...

    @overload
    def __init__(self, problems: str, value: object, allowed: str, source: str | None = None) -> None: ...

    def __init__(
        self,
        problems: Sequence[str] | str,
        value: object = _LIST_FORM,
        allowed: str | None = None,
        source: str | None = None,
    ) -> None:
        if allowed is not None and isinstance(problems, str):  # ConfigError form: one key, one value
            super().__init__(problems, value, allowed, source)
            self.problems: list[str] = [str(self)]
            return
        if value is not _LIST_FORM and source is None and (value is None or isinstance(value, str)):
            source = value  # SweepFileError(lines, source) given positionally
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        self.key = "sweep"
        self.value = source
        self.allowed = "a valid sweep file"
        LstmSweepError.__init__(self, "\n".join(self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,), self.__dict__)
