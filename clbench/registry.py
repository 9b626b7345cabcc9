"""Registries: strategies, scenarios and backbones are created by name.

Every entry carries a one-line description (for ``clbench list``); an unknown name is a
:class:`~clbench.errors.UsageError` that lists the valid ones.

Filling the registries means importing the built-in strategy, scenario and backbone
modules, and with them torch, Avalanche, timm and transformers (tens of seconds on a busy
CPU). What ``clbench list`` and the checks of bad input need from them is written down in
:mod:`clbench.catalog`, so the command line reads that instead while this process has
registered nothing; the registries stay the truth for running.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, get_type_hints

from clbench.errors import UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: its target (a class or a factory), the line ``clbench list``
    prints, and the typed metadata that travels with the name (a scenario's
    :class:`~clbench.scenario.ScenarioSpec`; None where a kind has none)."""

    name: str
    target: T
    description: str
    spec: Any = None
    # the module whose import registered it: the catalog holds the built-in ones only
    module: str = ""


class Registry(Generic[T]):
    """A name -> object map with a decorator to fill it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str, *, spec: Any = None) -> Callable[[T], T]:
        """Decorator: ``@SCENARIOS.register("x", "one line", spec=ScenarioSpec(...))``.

        A registered class gets its ``name`` from here (its ``name`` attribute is set), so
        the name is written once, in the decorator.
        """

        module = sys._getframe(1).f_globals.get("__name__", "")

        def decorate(target: T) -> T:
            if name in self._entries and self._entries[name].target is not target:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, target, description, spec, module)
            if isinstance(target, type) and hasattr(target, "name"):
                target.name = name
            return target

        return decorate

    def get(self, name: str) -> T:
        _load_builtin_modules()
        if name not in self._entries:
            raise UsageError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            )
        return self._entries[name].target

    def entry(self, name: str) -> Entry[T]:
        self.get(name)
        return self._entries[name]

    def spec(self, name: str) -> Any:
        """The typed metadata registered with ``name`` (UsageError for an unknown name)."""
        return self.entry(name).spec

    def names(self) -> list[str]:
        _load_builtin_modules()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        _load_builtin_modules()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __contains__(self, name: str) -> bool:
        _load_builtin_modules()
        return name in self._entries

    def is_empty(self) -> bool:
        """Nothing registered in this process yet (the built-in modules not loaded)."""
        return not self._entries


STRATEGIES: Registry[Any] = Registry("strategy")
SCENARIOS: Registry[Any] = Registry("scenario")
BACKBONES: Registry[Any] = Registry("backbone")

BUILTIN_PACKAGES = ("clbench.strategies", "clbench.scenarios", "clbench.encoders.zoo")
_loaded = False


def nothing_registered() -> bool:
    """True while this process has registered nothing: no built-in module loaded, no
    user's class or script entry. Only then does the catalog say all the registries know."""
    return not _loaded and all(r.is_empty() for r in (STRATEGIES, SCENARIOS, BACKBONES))


def is_builtin_module(module: str) -> bool:
    """Whether ``module`` is one of the built-in packages' (whose entries the catalog holds)."""
    return any(module == p or module.startswith(p + ".") for p in BUILTIN_PACKAGES)


def _load_builtin_modules() -> None:
    """Import every module of the built-in packages once, so their decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import pkgutil

    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")


def options_class(factory: Callable[..., Any]) -> type:
    """The options dataclass a scenario / backbone factory takes as ``options``."""
    return get_type_hints(factory)["options"]


def _import_user_file(path: Path) -> Any:
    """The module of a user's strategy file, executed once per process: a second
    ``--strategy file.py:Class`` (the run loop resolves the name twice) gets the same module,
    so its ``@STRATEGIES.register`` runs once."""
    resolved = path.resolve()
    for module in list(sys.modules.values()):
        if getattr(module, "__clbench_user_file__", None) == str(resolved):
            return module
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    module_name = f"clbench_user_{resolved.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module.__clbench_user_file__ = str(resolved)  # type: ignore[attr-defined]
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]  # a fixed file can be loaded again
        raise
    return module


def load_strategy_class(spec: str) -> Any:
    """A registered name, or ``module:Class`` / ``path/to/file.py:Class`` for a user's class."""
    if ":" not in spec:
        return STRATEGIES.get(spec)
    module_part, _, class_name = spec.rpartition(":")
    if module_part.endswith(".py") or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise UsageError(f"strategy file {path} does not exist (from --strategy {spec!r})")
        module = _import_user_file(path)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as error:
            raise UsageError(f"cannot import module {module_part!r}: {error}") from error
    if not hasattr(module, class_name):
        raise UsageError(f"{module_part} has no class {class_name!r}")
    strategy_class = getattr(module, class_name)
    from clbench.strategy import CLStrategy

    if not (isinstance(strategy_class, type) and issubclass(strategy_class, CLStrategy)):
        raise UsageError(f"{spec} is not a subclass of clbench.strategy.CLStrategy")
    if not strategy_class.name:  # an unregistered user class is known by its class name
        strategy_class.name = class_name
    return strategy_class
