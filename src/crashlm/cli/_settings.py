"""Command options made from settings dataclasses, so a default and its help exist once.

:func:`with_settings` adds one ``--option`` per field of a :class:`~crashlm.core.settings.Settings`
class (nested settings are flattened: ``OffsiteConfig.train.lr`` is ``--lr``) to a typer command,
and hands the command the built, validated configuration instead of the loose values.
Lists are comma-separated (``--seeds 1,2,3``), booleans are ``--flag/--no-flag``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, Optional

import typer

from crashlm.cli._common import parse_list
from crashlm.core.errors import UsageError
from crashlm.core.settings import Settings, _nested_type


@dataclasses.dataclass
class _Option:
    path: tuple[str, ...]  # field names from the top settings class down
    parameter: inspect.Parameter
    parse: Callable[[Any], Any]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _split(value: str | None, name: str, item: Callable[[str], Any]) -> list:
    items = parse_list(value, _flag(name))
    try:
        return [item(v) for v in items]
    except ValueError as exc:
        kind = {int: "integers", float: "numbers"}.get(item, "values")
        raise UsageError(f"{_flag(name)} must be comma-separated {kind}, got {value!r}") from exc


def _int_or_word(value: str | None) -> int | str | None:
    """``"15"`` -> 15; any other word stays a word, for the settings' own check to judge."""
    return int(value) if value is not None and value.strip().lstrip("-").isdigit() else value


def _option(field: dataclasses.Field, hint: Any, path: tuple[str, ...], default: Any) -> _Option:
    name, help_text = field.name, field.metadata.get("help", "")
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        shown = ",".join(str(v) for v in default) if default is not None else None
        option = typer.Option(shown, _flag(name), help=help_text)
        return _Option(path, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                               annotation=Optional[str]),
                       lambda value: None if value is None and optional else _split(value, name, item))
    if set(args) - {type(None)} == {int, str}:  # a number or a named rule (``--k 15`` or ``--k auto``)
        option = typer.Option(None if default is None else str(default), _flag(name), help=help_text)
        return _Option(path, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                               annotation=Optional[str]), _int_or_word)
    if base is bool:
        option = typer.Option(default, f"{_flag(name)}/--no-{name.replace('_', '-')}", help=help_text)
        return _Option(path, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=bool),
                       lambda value: value)
    option = typer.Option(default, _flag(name), help=help_text)
    annotation = Optional[base] if optional or default is None else base
    return _Option(path, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation),
                   lambda value: value)


def _options(cls: type, exclude: set[str], defaults: dict[str, Any], path: tuple[str, ...] = (),
             base: Any = None) -> list[_Option]:
    """The options of ``cls``'s fields; a nested field's defaults are those of its default instance ``base``."""
    hints = typing.get_type_hints(cls)
    out: list[_Option] = []
    for field in dataclasses.fields(cls):
        if field.name in exclude or not field.metadata.get("cli", True):
            continue
        if field.name in defaults:
            default = defaults[field.name]
        elif base is not None:
            default = getattr(base, field.name)
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = ...  # required
        nested = _nested_type(cls, field)
        if nested is not None:
            out += _options(nested, exclude, defaults, path + (field.name,), default)
            continue
        out.append(_option(field, hints[field.name], path + (field.name,), default))
    return out


def _build(cls: type, options: list[_Option], values: dict[str, Any]) -> Settings:
    tree: dict[str, Any] = {}
    for option in options:
        node = tree
        for part in option.path[:-1]:
            node = node.setdefault(part, {})
        node[option.path[-1]] = option.parse(values[option.parameter.name])
    return _instantiate(cls, tree)


def _instantiate(cls: type, tree: dict[str, Any]) -> Settings:
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in tree:
            continue
        nested = _nested_type(cls, field)
        value = tree[field.name]
        kwargs[field.name] = _instantiate(nested, value) if nested is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def with_settings(cls: type[Settings], param: str = "config", exclude: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None):
    """Decorate a command: its ``param`` argument becomes one option per field of ``cls``.

    ``exclude`` drops fields (anywhere in the nesting) from the options (they keep their
    defaults), and ``defaults`` changes what an option defaults to on the command line
    (``...``: required).
    """
    options = _options(cls, set(exclude), defaults or {})
    names = [o.parameter.name for o in options]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__}: two nested fields share an option name")

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func)
        own = [p for p in signature.parameters.values() if p.name != param]
        clash = {p.name for p in own} & set(names)
        if clash:
            raise TypeError(f"{func.__name__}: options {sorted(clash)} come from {cls.__name__} already")

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return func(**kwargs, **{param: _build(cls, options, values)})

        command.__signature__ = signature.replace(parameters=own + [o.parameter for o in options])
        command.__annotations__ = {**{p.name: p.annotation for p in own},
                                   **{o.parameter.name: o.parameter.annotation for o in options}}
        return command

    return decorate
