"""Config keys that carry their meaning: ``option(default, "meaning")`` declares a field of a frozen
config dataclass, so that help texts (``python -m train --help``) are generated from the classes
themselves and cannot drift from them."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

MEANING = "meaning"


def option(default: Any, meaning: str) -> Any:
    """A dataclass field with ``default`` and a one-line ``meaning``."""
    return dataclasses.field(default=default, metadata={MEANING: meaning})


def type_name(annotation: Any) -> str:
    """``int``, ``float``, ``str``, ``bool``, or the choices of a Literal as ``a|b|c``."""
    if typing.get_origin(annotation) is Literal:
        return "|".join(map(str, typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, meaning) of every field of the config dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return [(f.name, type_name(hints[f.name]), f.default, f.metadata.get(MEANING, ""))
            for f in dataclasses.fields(cls)]
