"""Settings: dataclass configurations that are their own documentation, file format and ``--help``.

A configuration is a dataclass deriving from :class:`Settings` whose fields are declared with
:func:`setting`: the default and a one-line help text live in one place. The CLI builds its
options from those fields (:mod:`crashlm.cli._settings`), run directories store
:meth:`Settings.to_dict`, and :meth:`Settings.from_dict` reads it back with one rule for
unknown keys: they are refused, since a setting this version does not know could have changed
what a run produces. Nested settings (a field whose type is another :class:`Settings`) are
written and read as nested objects.

Library code reports a bad value with :class:`SettingError`, naming the field; the CLI turns
the field's name into its flag, so a message says ``--max-length`` on the command line and
``max_length`` in Python.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, ClassVar, TypeVar

from crashlm.core.errors import UsageError

S = TypeVar("S", bound="Settings")
_MISSING = dataclasses.MISSING


class SettingError(UsageError):
    """A bad value of one setting. ``str()`` names the field; :meth:`for_flag` names its flag."""

    def __init__(self, field: str, problem: str, owner: str | None = None):
        self.field, self.problem, self.owner = field, problem, owner
        super().__init__(self.message(field))

    def message(self, name: str) -> str:
        return f"{self.owner}: {name} {self.problem}" if self.owner else f"{name} {self.problem}"

    def for_flag(self) -> str:
        """The message for the command line, where the flag says whose setting it is."""
        return f"--{self.field.replace('_', '-')} {self.problem}"


def _int_problem(value: Any, minimum: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        return f"must be {wanted}, got {value!r}"
    return None


def check_int(value: Any, what: str, minimum: int = 1, optional: bool = False) -> None:
    """The one integer check of a plain argument: ``value`` >= ``minimum`` (or None when ``optional``)."""
    problem = None if value is None and optional else _int_problem(value, minimum)
    if problem:
        raise UsageError(f"{what} {problem}")


def check_choice(value: Any, choices: typing.Iterable[str], what: str) -> None:
    """The one membership check of a plain argument: ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def setting(default: Any = _MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            cli: bool = True) -> Any:
    """A settings field: its default (or ``factory``), its help text, whether the CLI offers it."""
    metadata = {"help": help, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _nested_type(cls: type, field: dataclasses.Field) -> type | None:
    """The Settings subclass a field holds, if it holds one."""
    hint = typing.get_type_hints(cls).get(field.name)
    return hint if isinstance(hint, type) and issubclass(hint, Settings) else None


class Settings:
    """Serialisation and checks shared by every configuration dataclass."""

    what: ClassVar[str] = "run"  # what the settings are of, for messages: "unknown training settings"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[S], data: Any) -> S:
        if not isinstance(data, dict):
            raise UsageError(f"{cls.what} settings: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UsageError(f"unknown {cls.what} settings: {', '.join(unknown)}")
        values = {}
        for name, value in data.items():
            nested = _nested_type(cls, known[name])
            values[name] = nested.from_dict(value) if nested is not None and value is not None else value
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise UsageError(f"{cls.what} settings: {exc}") from exc

    # -- checks used by validate() ------------------------------------------------------------

    def _fail(self, name: str, problem: str) -> None:
        raise SettingError(name, problem, self.what)

    def check_positive(self, *names: str, optional: bool = False, minimum: int = 1) -> None:
        """Each named field is an integer >= ``minimum`` (or None when ``optional``)."""
        for name in names:
            value = getattr(self, name)
            problem = None if value is None and optional else _int_problem(value, minimum)
            if problem:
                self._fail(name, problem)

    def check_number(self, name: str, low: float = 0.0, high: float = math.inf, *, open_low: bool = False,
                     open_high: bool = False) -> None:
        """A finite number in the interval [low, high] (ends opened as asked)."""
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(name, f"must be a finite number, got {value!r}")
        if value < low or (open_low and value == low) or value > high or (open_high and value == high):
            lo, hi = "(" if open_low else "[", ")" if open_high or high == math.inf else "]"
            self._fail(name, f"must be in {lo}{low:g}, {high:g}{hi}, got {value!r}")

    def check_choice(self, name: str, choices: typing.Iterable[str]) -> None:
        choices = tuple(choices)
        if getattr(self, name) not in choices:
            self._fail(name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
