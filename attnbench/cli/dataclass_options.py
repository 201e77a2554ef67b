"""A dataclass's fields as Click options ``--field-name``: types from its hints, help from the
``Attributes:`` section of its docstring (``attnbench train`` takes TrainConfig's this way).
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing

import click

from attnbench.cli._common import _scalar


def _dataclass_field_docs(cls) -> dict[str, str]:
    """The ``Attributes:`` section of a dataclass's docstring: {field name: its text on one line}.

    An entry is ``    name: text`` (or ``    a, b: text`` for several fields), continued on lines
    indented deeper; the section ends at the first line that is not indented.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in lines[lines.index("Attributes:") + 1:]:
        entry = re.match(r" {4}(\w+(?:, \w+)*): (.*)", line)
        if entry:
            names = entry.group(1).split(", ")
            docs.update((name, entry.group(2).strip()) for name in names)
        elif line.startswith(" " * 8):
            docs.update((name, f"{docs[name]} {line.strip()}") for name in names)
        elif line.strip():
            break
    return docs


class _NoneOr(click.ParamType):
    """An ``Optional[X]`` field: ``none`` stands for None, anything else is read as X."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = f"{inner.name}|none"

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return self.inner.convert(value, param, ctx)


class _Yaml(click.ParamType):
    """A field of any other type: the value is read as YAML and the dataclass validates it."""

    name = "yaml"

    def convert(self, value, param, ctx):
        return _scalar(value) if isinstance(value, str) else value


def _click_type(hint):
    """The Click type for a dataclass field's type hint, and whether it is an on/off flag."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner, is_flag = _click_type(rest[0]) if len(rest) == 1 else (_Yaml(), False)
        return _NoneOr(click.BOOL if is_flag else inner), False
    if hint is bool:
        return None, True
    if typing.get_origin(hint) is typing.Literal and all(isinstance(a, str) for a in args):
        return click.Choice(args), False
    return {int: click.INT, float: click.FLOAT, str: click.STRING}.get(hint, _Yaml()), False


def _dataclass_options(cls) -> list[click.Option]:
    """Click options ``--field-name`` for every field of dataclass ``cls``, typed from its hints,
    with help from its docstring: a field added to ``cls`` becomes an option with no edit here.
    """
    hints = typing.get_type_hints(cls)
    docs = _dataclass_field_docs(cls)
    options = []
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind, is_flag = _click_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else \
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        if is_flag:
            flag = f"{flag}/--no-{field.name.replace('_', '-')}"
        options.append(click.Option([flag, field.name], type=kind, default=default, show_default=True,
                                    help=docs.get(field.name, f"{cls.__name__}.{field.name}").replace("``", "")))
    return options
