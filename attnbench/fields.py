"""What a typed setting may hold, read from its dataclass field's type hint or, where an option is
declared by its default alone (a data set's loader keywords), from the default's type.

One reading for every place that takes typed settings: ``TrainConfig`` and ``Augmentation`` fields
(the experiment reader, ``TrainConfig``'s own check, ``attnbench train``'s options), a variant's
``Options`` and a data set's options. Torch-free, so the command line can type its options before
it imports the training loop.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

__all__ = ["FieldKind", "kind_of_hint", "kind_of_default", "field_kinds"]

_SCALARS = {bool: "bool", int: "int", float: "float", str: "str"}
_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text"}


@dataclasses.dataclass(frozen=True)
class FieldKind:
    """``kind``: ``bool``, ``int``, ``float``, ``str``, ``choice`` (a ``Literal``: ``choices``) or
    ``any`` (a type this module does not check, e.g. a nested dataclass); ``optional``: None allowed."""

    kind: str
    optional: bool = False
    choices: tuple = ()

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is of this kind (an int is a float; a bool is neither)."""
        if value is None:
            return self.optional
        number = not isinstance(value, bool)
        return {"bool": isinstance(value, bool),
                "int": number and isinstance(value, int),
                "float": number and isinstance(value, (int, float)),
                "str": isinstance(value, str),
                "choice": value in self.choices}.get(self.kind, True)

    def expected(self) -> str:
        """What it takes, in words: ``an integer or none``, ``one of 'best_val', 'last'``."""
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = _EXPECTED.get(self.kind, "a value")
        return text + (" or none" if self.optional else "")


def kind_of_hint(hint: Any) -> FieldKind:
    """The kind of a resolved type hint: ``Optional[int]`` -> int, optional; ``Literal['a', 'b']`` -> a choice."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = kind_of_hint(rest[0]) if len(rest) == 1 else FieldKind("any")
        return dataclasses.replace(inner, optional=True)
    if typing.get_origin(hint) is Literal:
        return FieldKind("choice", choices=args)
    return FieldKind(_SCALARS.get(hint, "any"))


def kind_of_default(default: Any) -> FieldKind:
    """The kind of an option known only by its default (None: any single value, or none)."""
    return FieldKind("any", optional=True) if default is None else FieldKind(_SCALARS.get(type(default), "any"))


def field_kinds(cls: type) -> dict[str, FieldKind]:
    """{field name: its kind} of dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    return {field.name: kind_of_hint(hints[field.name]) for field in dataclasses.fields(cls)}
