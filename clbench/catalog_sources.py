"""The code a catalog was generated from: its fingerprint, checked at every start-up.

A catalog answers for the built-in strategy, scenario and backbone modules and for
everything they import from clbench (an options base class, a ``Literal`` of choices, a
helper that writes a help text, ...). :func:`closure` finds those modules by reading their
``import`` statements without importing them: every import of a built-in module (its
``describe`` may import lazily), and what runs on import elsewhere (not the imports inside
functions, or ``clbench.api``'s lazy one would bring in the whole run loop).
:func:`fingerprint` is the SHA-256 of each of their files plus the list of the built-in
modules, so that a new strategy file also makes the catalog out of date. Reading and
hashing those sixty-odd files takes a few milliseconds.

Files are named relative to the package that holds them (``clbench.strategies:l2p.py``,
``clbench:encoders/zoo.py``), which works for an editable checkout, where strategies/ and
scenarios/ sit beside clbench/, and for an installed one alike.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# the packages that hold clbench's files (the two built-in folders map into clbench.*)
ROOTS = ("clbench.strategies", "clbench.scenarios", "clbench")
# where a catalog's content comes from besides the built-in modules: how it is built
BUILD_MODULES = ("clbench.catalog", "clbench.catalog_types", "clbench.registry")


def _root_dir(root: str) -> Path:
    # the three root packages are light: importing them imports no torch
    return Path(importlib.import_module(root).__file__ or "").parent


def module_file(name: str) -> tuple[str, Path] | None:
    """``(key, path)`` of a clbench module's file; None for a name that is no module (an
    imported class or function) or lies outside clbench."""
    root = next((r for r in ROOTS if name == r or name.startswith(r + ".")), None)
    if root is None:
        return None
    parts = name[len(root) + 1 :].split(".") if name != root else []
    base = _root_dir(root).joinpath(*parts)
    for path in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if path is not None and path.is_file():
            return f"{root}:{path.relative_to(_root_dir(root)).as_posix()}", path
    return None


def builtin_modules() -> dict[str, list[str]]:
    """The modules of the built-in packages (those the registry imports), by package."""
    from clbench.registry import BUILTIN_PACKAGES

    listing = {}
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name) if package_name in ROOTS else None
        paths = getattr(package, "__path__", None)
        if paths is not None:  # a package: its modules, as the registry finds them
            names = [i.name for i in pkgutil.iter_modules(paths) if not i.name.startswith("_")]
            listing[package_name] = sorted(names)
    return listing


def closure() -> list[str]:
    """Keys of the files of the built-in modules and of every clbench module they import."""
    from clbench.registry import BUILTIN_PACKAGES

    builtin = []
    for package_name in BUILTIN_PACKAGES:
        modules = builtin_modules().get(package_name)
        builtin += [f"{package_name}.{m}" for m in modules] if modules else [package_name]
    pending = [*BUILD_MODULES, *builtin]
    seen: set[str] = set()
    keys: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        found = module_file(name)
        if found is None:
            continue
        key, path = found
        keys.add(key)
        parts = name.split(".")
        pending += [".".join(parts[:i]) for i in range(1, len(parts))]  # its packages run too
        is_package = path.name == "__init__.py"
        pending += _imported_names(path, name, is_package, in_functions=name in builtin)
    return sorted(keys)


def _imported_names(path: Path, module: str, is_package: bool, *, in_functions: bool) -> list[str]:
    """The module names the file's import statements name (and, for ``from m import x``,
    ``m.x`` in case x is a module); relative imports resolved; those inside functions
    only ``in_functions``."""
    names = []
    package = module if is_package else module.rpartition(".")[0]
    for node in _statements(ast.parse(path.read_text(encoding="utf-8")), in_functions):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            names.append(source)
            names += [f"{source}.{alias.name}" for alias in node.names]
    return [n for n in names if n == "clbench" or n.startswith("clbench.")]


def _statements(tree: ast.AST, in_functions: bool) -> Iterator[ast.AST]:
    """The nodes of ``tree``, without the bodies of functions unless ``in_functions``."""
    for node in ast.iter_child_nodes(tree):
        yield node
        if in_functions or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _statements(node, in_functions)


def fingerprint(keys: list[str] | dict[str, str]) -> dict[str, Any]:
    """The built-in module list and the SHA-256 of each file named by ``keys`` (a file
    that is gone hashes as ``"missing"``)."""
    files = {}
    for key in sorted(keys):
        root, _, relative = key.partition(":")
        path = _root_dir(root) / relative
        try:
            files[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        except OSError:
            files[key] = "missing"
    return {"modules": builtin_modules(), "files": files}
