"""The virtual environment Avalanche's own LearningToPrompt runs in, beside clbench's.

Avalanche's built-in L2P (``avalanche.models.timm_vit``) is written for timm 0.6.13, and
clbench needs timm 1.x, so one interpreter cannot hold both. The benchmarks run
Avalanche's side in a *peer* venv that holds timm 0.6.13 alone and sees every other
package of the environment the benchmark was started from (torch, avalanche-lib,
scikit-learn, ...) through a ``.pth`` file in its own site-packages:

    <peer>/lib/pythonX.Y/site-packages/
        timm/  timm-0.6.13.dist-info/              <- found first
        _clbench_active_env.pth                    -> the active environment's
                                                      site-packages, after them

A venv made with ``--system-site-packages`` would see the *base* interpreter's packages
instead, which in the README's setup (clbench installed into a venv) hold neither torch
nor avalanche: that was the bug this module replaces. Nothing is copied; timm 0.6.13 is
installed ``--no-deps`` (its needs come from the active environment), from the package
index or offline from a wheel folder (``wheels``, as scripts/gpu_check.sh brings it).
The ``.pth`` is rewritten at every start, so the peer follows whichever environment runs
the benchmark; ``PYTHONPATH`` entries go into it too (and out of the peer's environment
variables), since a ``PYTHONPATH`` entry would come before the peer's own timm.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from clbench.fileio import atomic_write_text

AVALANCHE_TIMM = "0.6.13"
DEFAULT_VENV = (
    Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "clbench" / "bench-venv"
)
LINK_FILE = "_clbench_active_env.pth"
# what the worker imports besides timm; probed without importing them (avalanche alone
# takes tens of seconds to import on a small CPU), so a missing one is named at once
NEEDED_MODULES = ("torch", "torchvision", "avalanche", "sklearn")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def active_package_dirs() -> list[str]:
    """Where this interpreter's packages live: ``PYTHONPATH`` entries, site-packages and
    the user site, in import order, existing directories only."""
    candidates = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    candidates += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    found: list[str] = []
    for candidate in candidates:
        path = str(Path(candidate).resolve())
        if Path(path).is_dir() and path not in found:
            found.append(path)
    return found


def link_file_text(package_dirs: list[str]) -> str:
    # ``site.addsitedir`` (not a bare path line) so that .pth files in those directories
    # (namespace packages, editable installs) work in the peer as they do here; it
    # appends, so the peer's own site-packages (timm 0.6.13) stay first
    lines = [f"import site; site.addsitedir({path!r})" for path in package_dirs]
    return "# written by clbench's benchmarks (scripts/_peer_venv.py)\n" + "\n".join(lines) + "\n"


def peer_environment() -> dict[str, str]:
    """The peer's environment variables: no ``PYTHONPATH`` (its entries are in the .pth,
    after the peer's timm), no hub access (random weights everywhere), and none of
    timm's and Avalanche's deprecation warnings in the output."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**environment, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _peer_python_version(venv: Path) -> str | None:
    config = venv / "pyvenv.cfg"
    if not config.is_file():
        return None
    for line in config.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() in ("version", "version_info"):
            return ".".join(value.strip().split(".")[:2])
    return None


def _site_packages(python: Path) -> Path:
    probe = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        env=peer_environment(),
        check=True,
    )
    return Path(probe.stdout.strip())


def _install_timm(site_packages: Path, wheels: Path | None) -> None:
    # the active environment's pip, into the peer's site-packages: the peer needs no pip
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade"]
    command += ["--target", str(site_packages)]
    if wheels is not None:
        command += ["--no-index", "--find-links", str(wheels)]
    done = subprocess.run([*command, f"timm=={AVALANCHE_TIMM}"])
    if done.returncode != 0:
        source = f"the wheels in {wheels}" if wheels is not None else "the package index"
        raise SystemExit(
            f"could not install timm {AVALANCHE_TIMM} from {source} into {site_packages} "
            f"(pip exit code {done.returncode}); pass --skip-avalanche to time clbench alone"
        )


def probe_peer(python: Path) -> dict[str, object]:
    """What the peer's interpreter finds: timm's version and file, torch's file, and
    which of :data:`NEEDED_MODULES` it cannot find."""
    code = (
        "import importlib.util, json, timm; "
        "print(json.dumps({'timm': timm.__version__, 'timm_file': timm.__file__, "
        "'torch_file': importlib.util.find_spec('torch').origin, "
        f"'missing': [m for m in {list(NEEDED_MODULES)!r} "
        "if importlib.util.find_spec(m) is None]}))"
    )
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=peer_environment()
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last}
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def ensure_peer_venv(
    venv: Path, *, wheels: Path | None = None, say: Callable[[str], None] = print
) -> Path:
    """The peer venv's interpreter, made or brought up to date; exits with a one-line
    reason when the peer cannot run Avalanche's L2P."""
    python = venv_python(venv)
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not python.exists():
        say(f"creating {venv} for Avalanche's L2P (timm {AVALANCHE_TIMM} + this environment)")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    theirs = _peer_python_version(venv)
    if theirs != ours:
        raise SystemExit(
            f"{venv} was made by Python {theirs}, this is Python {ours}: compiled packages "
            f"would not load there; remove it (rm -r {venv}) or pass another --venv"
        )
    site_packages = _site_packages(python)
    atomic_write_text(site_packages / LINK_FILE, link_file_text(active_package_dirs()))
    if not (site_packages / f"timm-{AVALANCHE_TIMM}.dist-info").is_dir():
        say(f"installing timm=={AVALANCHE_TIMM} (--no-deps) into {site_packages}")
        _install_timm(site_packages, wheels)
    found = probe_peer(python)
    own = str(site_packages)
    usable = (
        "error" not in found
        and found["timm"] == AVALANCHE_TIMM
        and str(found["timm_file"]).startswith(own)
        # a venv of the old layout (--system-site-packages, pip-installed torch) would
        # time another torch than clbench's side
        and not str(found["torch_file"]).startswith(own)
        and not found["missing"]
    )
    if not usable:
        raise SystemExit(
            f"the Avalanche venv {venv} cannot run Avalanche's L2P: {found}; it needs timm "
            f"{AVALANCHE_TIMM} of its own and {', '.join(NEEDED_MODULES)} from this "
            f"environment ({sys.executable}); remove it (rm -r {venv}) to have it made again"
        )
    return python
