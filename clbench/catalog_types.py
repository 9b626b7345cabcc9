"""Option types as JSON, for the catalog: what ``--set`` parses, and nothing else.

:func:`clbench.config.parse_value` parses a ``--set`` string by the option's type: bool,
int, float, str, a ``Literal`` of choices, a list or tuple of those, or one of them or
None. :func:`encode_type` writes such a type as JSON and :func:`decode_type` gives back
an equal type, so the catalog's checks call ``parse_value`` itself and say what it says.
Any other type encodes as None: the command line cannot set it, and the live check (which
has the real type) is the one to say so.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin

_SCALARS: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}


def encode_type(tp: Any) -> Any:
    """``int`` -> ``"int"``; ``Literal["a", "b"]`` -> ``{"literal": ["a", "b"]}``;
    ``list[int]`` -> ``{"list": "int"}``; ``tuple[int, ...]`` -> ``{"tuple": "int"}``;
    ``int | None`` -> ``{"optional": "int"}``; anything else -> None."""
    for name, scalar in _SCALARS.items():
        if tp is scalar:
            return name
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if all(isinstance(a, (str, int, bool)) for a in args):
            return {"literal": list(args)}
        return None
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2 and (inner := encode_type(rest[0])) is not None:
            return {"optional": inner}
        return None
    if origin in (list, tuple) and args and (item := encode_type(args[0])) is not None:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return None  # fixed-length tuples: parse_value would not check the length
        return {origin.__name__: item}
    return None


def decode_type(encoded: Any) -> Any:
    """The type :func:`encode_type` wrote (None for None)."""
    if encoded is None:
        return None
    if isinstance(encoded, str):
        return _SCALARS[encoded]
    ((kind, inner),) = encoded.items()
    if kind == "literal":
        return Literal[tuple(inner)]
    if kind == "optional":
        return decode_type(inner) | None
    if kind == "list":
        return list[decode_type(inner)]  # type: ignore[misc]
    if kind == "tuple":
        return tuple[decode_type(inner), ...]  # type: ignore[misc]
    raise ValueError(f"unknown encoded type {encoded!r}")
