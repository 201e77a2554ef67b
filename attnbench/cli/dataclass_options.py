"""A dataclass's fields as Click options ``--field-name``: types from its hints, help from the
``Attributes:`` section of its docstring (``attnbench train`` takes TrainConfig's this way).
"""
from __future__ import annotations

import dataclasses
import inspect
import re

import click

from attnbench.cli._common import _scalar
from attnbench.fields import FieldKind, field_kinds


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


_CLICK_TYPES = {"int": click.INT, "float": click.FLOAT, "str": click.STRING}


def _click_type(kind: FieldKind):
    """The Click type for a field's kind, and whether it is an on/off flag."""
    if kind.optional:
        inner, is_flag = _click_type(dataclasses.replace(kind, optional=False))
        return _NoneOr(click.BOOL if is_flag else inner), False
    if kind.kind == "bool":
        return None, True
    if kind.kind == "choice" and all(isinstance(c, str) for c in kind.choices):
        return click.Choice(kind.choices), False
    return _CLICK_TYPES.get(kind.kind, _Yaml()), False


def _dataclass_options(cls) -> list[click.Option]:
    """Click options ``--field-name`` for every field of dataclass ``cls``, typed from its hints,
    with help from its docstring: a field added to ``cls`` becomes an option with no edit here.
    """
    kinds = field_kinds(cls)
    docs = _dataclass_field_docs(cls)
    options = []
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind, is_flag = _click_type(kinds[field.name])
        default = field.default if field.default is not dataclasses.MISSING else \
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        if is_flag:
            flag = f"{flag}/--no-{field.name.replace('_', '-')}"
        options.append(click.Option([flag, field.name], type=kind, default=default, show_default=True,
                                    help=docs.get(field.name, f"{cls.__name__}.{field.name}").replace("``", "")))
    return options
