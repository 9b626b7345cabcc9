"""Typed options: every component (strategy, scenario, backbone) owns a dataclass of them.

A field is declared with :func:`option`, which records the help text and, for method
hyper-parameters, the paper's symbol, so ``clbench list`` / ``--help`` can show
"pool_size (M): number of prompts in the pool".  ``--set key=value`` strings are parsed
against the field's type, and an unknown key or a malformed value is a UsageError.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from clbench.errors import UsageError

C = TypeVar("C")


def option(default: Any, help: str, *, symbol: str | None = None, quirk: str | None = None) -> Any:
    """A dataclass field with help text (and the paper's symbol, where it has one).

    ``quirk`` marks an option that reproduces a behaviour of the authors' official code
    which their paper does not describe (a prefix layout, a batch-wise vote, a learning
    rate scaling ...); its text says where that code does it. The default of such an
    option is always the method as the paper describes it, so a run that sets one is
    marked in ``clbench show`` and ``clbench table`` (see :func:`authors_quirks`).
    """
    metadata = {"help": help, "symbol": symbol, "quirk": quirk}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Options:
    """Base of every options dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def describe(options_class: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field, help prefixed by the paper symbol."""
    hints = get_type_hints(options_class)
    rows = []
    for f in fields(options_class):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None  # a required field (none of ours has one)
        symbol = f.metadata.get("symbol")
        help_text = f.metadata.get("help", "")
        if symbol:
            help_text = f"({symbol}) {help_text}"
        if f.metadata.get("quirk"):
            help_text = f"{help_text} [authors' quirk: {f.metadata['quirk']}]"
        rows.append((f.name, _type_name(hints[f.name]), default, help_text))
    return rows


def authors_quirks(options: Any, prefix: str = "") -> list[str]:
    """The quirk options (see :func:`option`) of ``options`` that differ from their default,
    as ``--set`` names them (``prefix`` + name): what marks a run as the authors' code."""
    changed = []
    for f in fields(options):
        if not f.metadata.get("quirk"):
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
        if getattr(options, f.name) != default:
            changed.append(prefix + f.name)
    return changed


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "|".join(str(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def parse_value(key: str, raw: str, tp: Any) -> Any:
    """Parse ``raw`` as type ``tp``; a malformed value names the key and the expected type."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if raw.lower() in ("none", "null", ""):
            return None
        if len(args) == 1:
            return parse_value(key, raw, args[0])
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if str(choice) == raw:
                return choice
        raise UsageError(f"--set {key}={raw}: expected one of {', '.join(map(str, choices))}")
    if tp is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--set {key}={raw}: expected a boolean (true/false)")
    if tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            raise UsageError(f"--set {key}={raw}: expected {tp.__name__}") from None
    if origin in (list, tuple):
        (item_type, *_) = get_args(tp) or (str,)
        items = [s for s in raw.strip("[]()").split(",") if s.strip()]
        parsed = [parse_value(key, s.strip(), item_type) for s in items]
        return tuple(parsed) if origin is tuple else parsed
    if tp is str:
        return raw
    raise UsageError(f"--set {key}: values of type {tp} cannot be set from the command line")


def apply_overrides(options: C, overrides: dict[str, Any], *, what: str) -> C:
    """A copy of ``options`` with ``overrides`` (strings are parsed, others type-checked)."""
    hints = get_type_hints(type(options))
    valid = [f.name for f in fields(options)]  # type: ignore[arg-type]
    changes = {}
    for key, value in overrides.items():
        if key not in valid:
            raise UsageError(
                f"unknown {what} option {key!r}; valid options: {', '.join(sorted(valid))}"
            )
        if isinstance(value, str) and hints[key] is not str:
            value = parse_value(key, value, hints[key])
        changes[key] = value
    return dataclasses.replace(options, **changes)  # type: ignore[type-var]


def parse_set_arguments(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["lr=0.1", "scenario.seed_split=3"]`` -> ``{"strategy": {...}, "scenario": {...}}``.

    A bare key addresses the strategy's hyper-parameters; ``scenario.`` and ``backbone.``
    prefixes address those components' options.
    """
    grouped: dict[str, dict[str, str]] = {"strategy": {}, "scenario": {}, "backbone": {}}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set {pair!r}: expected key=value")
        key, _, value = pair.partition("=")
        key = key.strip()
        target = "strategy"
        for prefix in ("scenario.", "backbone.", "strategy."):
            if key.startswith(prefix):
                target, key = prefix[:-1], key[len(prefix) :]
        grouped[target][key] = value.strip()
    return grouped
