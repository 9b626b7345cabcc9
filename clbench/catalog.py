"""The catalog: what the registries know, written down, so the command line starts fast.

Filling the registries imports every built-in strategy, scenario and backbone module and
with them torch, Avalanche, timm and transformers: 20-70 s on a busy 2-core CPU, to print
names or to refuse a misspelled one. ``clbench/catalog.json`` holds what ``clbench
list`` and the checks of a run's bad input need from them: names, one-line descriptions,
presets, every option's name, type, default and help, each scenario's protocol line,
default backbone and where its data probe lives. It is generated from the live registries::

    python -m clbench.catalog --write     # after changing a strategy, scenario or backbone
    python -m clbench.catalog --check     # exit 1 when it is out of date

and it carries a fingerprint of the code it came from (the SHA-256 of every clbench
module the built-in ones import, and the list of the built-in modules). :func:`current`
reads it only when the fingerprint matches and this process has registered nothing; else
it builds the same catalog from the live registries, which stay the truth for running. So
an out-of-date file costs start-up time, never a wrong answer; ``tests/test_startup.py``
fails until it is regenerated.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from clbench import catalog_sources
from clbench.catalog_types import decode_type, encode_type
from clbench.errors import UsageError

CATALOG_FILE = Path(__file__).with_name("catalog.json")
FORMAT = 1
KINDS = {"strategy": "strategies", "scenario": "scenarios", "backbone": "backbones"}
# what a light command must not import: a data probe that needs one runs the slow way
HEAVY_MODULES = ("torch", "torchvision", "avalanche", "timm", "transformers", "numpy")
REGENERATE = "python -m clbench.catalog --write"


# ------------------------------------------------------------------------ the catalog


@dataclass(frozen=True)
class Catalog:
    """The entries of the three registries as plain data (``clbench/catalog.json``'s).

    ``live`` says where it came from: built from the registries of this process (their
    data probes are called as registered) or read from the file (probes are imported
    from their torch-free modules).
    """

    data: dict[str, Any]
    live: bool

    def entries(self, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name, entry) of one kind (``strategy``, ``scenario``, ``backbone``), by name."""
        yield from sorted(self.data[KINDS[kind]].items())

    def names(self, kind: str) -> list[str]:
        return sorted(self.data[KINDS[kind]])

    def entry(self, kind: str, name: str) -> dict[str, Any]:
        """One entry; an unknown name is the registry's own UsageError."""
        group = self.data[KINDS[kind]]
        if name not in group:
            raise UsageError(f"unknown {kind} {name!r}; valid choices: {', '.join(sorted(group))}")
        entry: dict[str, Any] = group[name]
        return entry

    def options_type(self, kind: str, name: str) -> type:
        """A dataclass with the entry's option names and types (every default None): what
        :func:`clbench.config.apply_overrides` needs to check ``--set`` keys and values.
        An option whose type the command line cannot parse takes strings here, so that
        the live check, which knows the type, is the one that refuses it."""
        options = self.entry(kind, name)["options"]
        columns = [(o["name"], decode_type(o["type"]) or str, field(default=None)) for o in options]
        return dataclasses.make_dataclass(f"{name} options", columns)

    def data_marker(self, name: str) -> str:
        """`` [data: ...]`` of a scenario, as ``clbench list`` prints it."""
        from clbench.data.download import data_marker

        if self.live:
            from clbench.registry import SCENARIOS, options_class

            entry = SCENARIOS.entry(name)
            return data_marker(name, entry.spec, options_class(entry.target))
        scenario = self.entry("scenario", name)
        probe = scenario["data_probe"]
        spec = types.SimpleNamespace(data_status=None if probe is None else _light_probe(probe))
        defaults = {o["name"]: o["default"] for o in scenario["options"]}
        return data_marker(name, spec, lambda: types.SimpleNamespace(**defaults))  # type: ignore[arg-type]

    def probes_are_light(self) -> bool:
        """Whether every scenario's data probe runs without the heavy modules."""
        return all(
            entry["data_probe"] is None or entry["data_probe"]["light"]
            for _, entry in self.entries("scenario")
        )


def current(*, data_probes: bool = False) -> Catalog:
    """The catalog file when it describes this code and this process has registered
    nothing (and, with ``data_probes``, its scenarios' data probes are light); else the
    catalog of the live registries (which imports them)."""
    file_catalog = from_file()
    if file_catalog is not None and (not data_probes or file_catalog.probes_are_light()):
        return file_catalog
    return Catalog(build(for_file=False), live=True)


def from_file(path: Path = CATALOG_FILE) -> Catalog | None:
    """The catalog file, or None where it cannot stand in for the registries: missing,
    of another format, out of date with the code, or something is registered already
    (this process may know entries the file does not, or the built-in ones are loaded)."""
    from clbench.registry import nothing_registered

    if not nothing_registered():
        return None
    data = read_current(path)
    return Catalog(data, live=False) if data is not None else None


def read_current(path: Path = CATALOG_FILE) -> dict[str, Any] | None:
    """The file's catalog if it has this format and the fingerprint of the code as it is
    now (:mod:`clbench.catalog_sources`); else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        fingerprint = data["fingerprint"]
        usable = data["format"] == FORMAT and fingerprint == catalog_sources.fingerprint(
            fingerprint["files"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if usable else None


def _light_probe(probe: dict[str, Any]) -> Callable[..., Any]:
    """A scenario's data probe, imported from its module (torch-free where ``light``)."""
    if not probe["light"]:
        raise ValueError("this data probe needs the live registry")
    if "function" in probe:
        function: Callable[..., Any] = _resolve(probe["function"])
        return function
    owner = _resolve(probe["class"])(**probe["fields"])
    method: Callable[..., Any] = getattr(owner, probe["method"])
    return method


def _resolve(reference: str) -> Any:
    """``package.module:Qual.name`` -> the object."""
    module_name, _, qualname = reference.partition(":")
    value: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


# ------------------------------------------------------------------------------ build


def build(*, for_file: bool = True) -> dict[str, Any]:
    """The catalog of the live registries (imports them all).

    ``for_file``: what ``--write`` writes: the built-in entries only, with the fingerprint
    of their code and where their data probes live. Else every entry of this process
    (a script may have registered its own), for :func:`current` to answer with.
    """
    from clbench.registry import (
        BACKBONES,
        SCENARIOS,
        STRATEGIES,
        is_builtin_module,
        options_class,
    )

    def kept(entries: Any) -> list[Any]:
        return [e for e in entries if not for_file or is_builtin_module(e.module)]

    light = _LightModules()
    data: dict[str, Any] = {"format": FORMAT, "generated_by": REGENERATE}
    if for_file:
        data["fingerprint"] = catalog_sources.fingerprint(catalog_sources.closure())
    data.update(strategies={}, scenarios={}, backbones={})
    for entry in kept(STRATEGIES):
        presets = entry.target.presets
        data["strategies"][entry.name] = {
            "description": entry.description,
            "module": entry.module,
            "presets": _json_exact(presets, f"{entry.name}'s presets") if for_file else presets,
            "options": _options(entry.target.Config),
        }
    for entry in kept(SCENARIOS):
        options_type = options_class(entry.target)
        options = _options(options_type)
        spec = entry.spec
        data["scenarios"][entry.name] = {
            "description": entry.description,
            "module": entry.module,
            "options": options,
            "default_backbone": spec.default_backbone if spec is not None else None,
            "protocol": spec.protocol if spec is not None else "",
            "protocol_line": (
                spec.describe(options_type())
                if spec is not None and spec.describe is not None
                else None
            ),
            "downloads": spec is not None and spec.download is not None,
            # a live catalog calls the registered probe itself (Catalog.data_marker)
            "data_probe": (
                _probe(spec.data_status if spec is not None else None, options, light)
                if for_file
                else None
            ),
        }
    from clbench.encoders.zoo import RandomInit  # loaded by now: the registries are filled

    for entry in kept(BACKBONES):
        data["backbones"][entry.name] = {
            "description": entry.description,
            "module": entry.module,
            "options": _options(options_class(entry.target)),
            # registered without pretrained weights: `clbench list` says so
            "random_weights": isinstance(entry.spec, RandomInit),
        }
    return data


def _options(options_type: type) -> list[dict[str, Any]]:
    """Each option as ``clbench list --options`` prints it, its type for ``--set`` and its
    default as JSON (None where JSON cannot hold it exactly)."""
    from clbench.config import describe

    hints = get_type_hints(options_type)
    defaults = {f.name: _default(f) for f in fields(options_type)}
    return [
        {
            "name": name,
            "type": encode_type(hints[name]),
            "type_name": type_name,
            "default_repr": repr(default),
            "default": _json_or_none(defaults[name]),
            "help": help_text,
        }
        for name, type_name, default, help_text in describe(options_type)
    ]


def _default(option: dataclasses.Field[Any]) -> Any:
    if option.default is not MISSING:
        return option.default
    if option.default_factory is not MISSING:
        return option.default_factory()
    return None


def _json_or_none(value: Any) -> Any:
    try:
        return value if json.loads(json.dumps(value)) == value else None
    except (TypeError, ValueError):
        return None


def _json_exact(value: Any, what: str) -> Any:
    if _json_or_none(value) is None and value is not None:
        raise TypeError(f"{what} cannot be written to the catalog as JSON: {value!r}")
    return value


def _probe(
    status: Any, options: list[dict[str, Any]], light: _LightModules
) -> dict[str, Any] | None:
    """Where a scenario's ``data_status`` lives, for :meth:`Catalog.data_marker`:

    * a function: ``{"function": "module:name"}``;
    * a method of a dataclass instance (:class:`~clbench.data.archive.ArchiveData`):
      the class, its fields and the method's name;

    ``light`` when its module imports none of :data:`HEAVY_MODULES` and the default
    options are plain JSON (the probe gets them as attributes); anything else is only
    run from the live registry.
    """
    if status is None:
        return None
    exact_defaults = all(o["default"] is not None or o["default_repr"] == "None" for o in options)
    owner = getattr(status, "__self__", None)
    if owner is None:
        reference = f"{status.__module__}:{status.__qualname__}"
        if "<" in reference or _resolve(reference) is not status:
            return {"light": False}
        return {
            "function": reference,
            "light": exact_defaults and light.check(status.__module__),
        }
    owner_type = type(owner)
    if not dataclasses.is_dataclass(owner_type):
        return {"light": False}
    values = {f.name: getattr(owner, f.name) for f in fields(owner_type)}
    if _json_or_none(values) is None:
        return {"light": False}
    return {
        "class": f"{owner_type.__module__}:{owner_type.__qualname__}",
        "fields": values,
        "method": status.__func__.__name__,
        "light": exact_defaults and light.check(owner_type.__module__),
    }


class _LightModules:
    """Whether importing a module imports none of :data:`HEAVY_MODULES`, asked of a fresh
    interpreter (this one has them all by now); one answer per module."""

    def __init__(self) -> None:
        self._answers: dict[str, bool] = {}

    def check(self, module: str) -> bool:
        if module not in self._answers:
            script = (
                "import importlib, sys\n"
                f"importlib.import_module({module!r})\n"
                f"print(any(name in sys.modules for name in {HEAVY_MODULES!r}))\n"
            )
            result = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, check=True
            )
            self._answers[module] = result.stdout.strip() == "False"
        return self._answers[module]


# ------------------------------------------------------------------------------- main


def render(data: dict[str, Any]) -> str:
    """The file's text: one key per line, so a change shows as a small diff."""
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def differences(built: dict[str, Any], written: dict[str, Any]) -> list[str]:
    """What differs between two catalogs, by entry (for the staleness message)."""
    found = []
    for key in sorted(set(built) | set(written)):
        if key in KINDS.values():
            old, new = written.get(key, {}), built.get(key, {})
            for name in sorted(set(old) | set(new)):
                if old.get(name) != new.get(name):
                    state = "new" if name not in old else "gone" if name not in new else "changed"
                    found.append(f"{key} {name}: {state}")
        elif key == "fingerprint" and isinstance(written.get(key), dict):
            old_files, new_files = written[key].get("files", {}), built[key]["files"]
            changed = [
                k
                for k in sorted(set(old_files) | set(new_files))
                if old_files.get(k) != new_files.get(k)
            ]
            if changed:
                found.append(f"source files changed: {', '.join(changed)}")
            if written[key].get("modules") != built[key]["modules"]:
                found.append("built-in modules added or removed")
        elif built.get(key) != written.get(key):
            found.append(f"{key}: changed")
    return found


def main(argv: list[str] | None = None) -> int:
    from clbench.fileio import atomic_write_text

    parser = argparse.ArgumentParser(
        prog="python -m clbench.catalog",
        description="Write or check clbench/catalog.json from the live registries.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate the file")
    action.add_argument("--check", action="store_true", help="exit 1 when it is out of date")
    args = parser.parse_args(argv)
    built = build()
    if args.write:
        atomic_write_text(CATALOG_FILE, render(built))
        print(f"wrote {CATALOG_FILE}")
        return 0
    try:
        written = json.loads(CATALOG_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        written = {}
    found = differences(built, written)
    if found:
        print(f"{CATALOG_FILE} is out of date ({'; '.join(found)}); run {REGENERATE}")
        return 1
    print(f"{CATALOG_FILE} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
