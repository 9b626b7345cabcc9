"""The GPU check's steps (scripts/gpu_check.sh runs them; see that file for the whole).

``prepare`` (here, with the package index): wheels into a folder, for the GPU machine,
which has torch, timm and transformers but neither avalanche-lib nor POT, and no network:
avalanche-lib, POT and every package they need that the machine's image lacks (the
closure of their requirements as this environment has them installed, at these
versions, less :data:`DEVICE_HAS`), timm 0.6.13 for Avalanche's L2P, and timm 1.x in
case the machine's is older.

``install`` (there, offline): the wheels whose distribution the machine lacks, and
clbench itself, into a target folder that goes on ``PYTHONPATH``.

``run`` (there): the environment; the bf16-vs-fp32 agreement of l2p's logits on the GPU;
throughput and peak memory of clbench's l2p, hide-prompt and norga against Avalanche's
LearningToPrompt on ViT-B/16 (random weights: nothing is fetched) at each batch size, in
bf16 and fp32, each row a fresh process run and tabled as scripts/bench_l2p_vs_avalanche.py
does (plain prefixes and L2P's tokens run through ``scaled_dot_product_attention``; the
SDPA kernels enabled are printed); then the bf16 agreement tests of
tests/test_perf_paths.py. A time budget (``--budget-s``) stops starting new rows when it
is spent, keeping a minute for the tests, so the script ends in time with what it has.
``--dry-run`` runs the same steps on the CPU with a tiny ViT (to test the script where
there is no GPU).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DEVICE_PYTHON = "3.12"  # python3 of the GPU machine's image
AVALANCHE_TIMM = "0.6.13"
CLBENCH_TIMM = "1.0.31"  # brought in case the machine's timm is older than 1.0
# POT 0.9.7's cp312 wheel is 33 MB (it bundles libraries); 0.9.5's is 0.9 MB and
# satisfies clbench's pot>=0.9
PINNED = {"pot": "0.9.5"}
# The GPU machine's image (python3 3.12, torch 2.11): its packages need no wheel.
DEVICE_HAS = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
    attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama
    contourpy coverage cycler cython einops filelock flatbuffers fonttools fsspec grpcio h11
    h5py hf-xet httpcore httpx huggingface-hub idna imageio iniconfig jinja2 joblib
    kiwisolver lazy-loader markdown markdown-it-py markupsafe matplotlib mdurl ml-dtypes
    mpmath msgpack multidict networkx ninja numpy packaging pandas pathspec pillow pip
    pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    pygments pyparsing pytest python-dateutil pyyaml regex requests rich safetensors
    scikit-image scikit-learn scipy seaborn sentencepiece setuptools six sympy tabulate
    tensorboard tensorboard-data-server threadpoolctl tifffile timm tokenizers toolz torch
    torchaudio torchmetrics torchvision tqdm transformers triton typing-extensions urllib3
    werkzeug wheel wrapt xxhash yarl zipp""".split()
)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 27, 28, 31, 34)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- prepare (here) -----------------------------------------------------------------------------


def requirement_closure(roots: list[str], python_version: str) -> dict[str, str]:
    """Distribution -> version for ``roots`` and everything they require (no extras,
    markers evaluated for ``python_version``), as installed here, less DEVICE_HAS."""
    from packaging.requirements import Requirement

    environment = {"python_version": python_version, "python_full_version": python_version}
    found: dict[str, str] = {}
    pending = list(roots)
    while pending:
        name = normalise(pending.pop())
        if name in found or name in DEVICE_HAS:
            continue
        distribution = importlib.metadata.distribution(name)
        found[name] = PINNED.get(name, distribution.version)
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                pending.append(requirement.name)
    return found


def download(spec: str, folder: Path, python_version: str) -> None:
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder)]
    binary = ["--only-binary=:all:", "--python-version", python_version, "--implementation"]
    binary += ["cp", *(part for p in PLATFORMS for part in ("--platform", p))]
    if subprocess.run([*base, *binary, spec], capture_output=True).returncode == 0:
        return
    # a source-only release (GPUtil): build its pure-Python wheel here
    print(f"    no wheel of {spec} for Python {python_version}: building one from its source")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(folder), spec]
    )
    if built.returncode != 0:
        raise SystemExit(f"could not download or build a wheel of {spec}")


def prepare(folder: Path, python_version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    wanted = requirement_closure(["avalanche-lib", "pot"], python_version)
    specs = [f"{name}=={version}" for name, version in sorted(wanted.items())]
    specs += [f"timm=={AVALANCHE_TIMM}", f"timm=={CLBENCH_TIMM}"]
    for spec in specs:
        present = {wheel_name(w) for w in folder.glob("*.whl")}
        name, _, version = spec.partition("==")
        if (normalise(name), version) not in present:
            print(f"  {spec}", flush=True)
            download(spec, folder, python_version)
    total = sum(w.stat().st_size for w in folder.glob("*.whl")) / 2**20
    print(f"{len(list(folder.glob('*.whl')))} wheels, {total:.1f} MiB in {folder}")


# -- install (there) ----------------------------------------------------------------------------


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def wheels_to_install(folder: Path) -> list[Path]:
    """The wheels whose distribution this interpreter lacks (timm: only a 1.x, and only
    when the installed one is older; timm 0.6.13 is for Avalanche's peer venv)."""
    chosen = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel_name(wheel)
        have = installed_version(name)
        if name == "timm":
            if version.startswith("1.") and (have is None or have.startswith("0.")):
                chosen.append(wheel)
        elif have is None:
            chosen.append(wheel)
    return chosen


def install(folder: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    pip += ["--no-compile", "--no-cache-dir", "--target", str(target)]
    chosen = wheels_to_install(folder)
    print(f"installing {len(chosen)} wheels: {' '.join(w.name for w in chosen) or '(none)'}")
    if chosen:
        subprocess.run([*pip, *map(str, chosen)], check=True)
    print("installing clbench itself (no dependencies, no build isolation)")
    subprocess.run([*pip, "--no-build-isolation", str(REPO)], check=True)


# -- run (there) --------------------------------------------------------------------------------


def environment_lines() -> list[str]:
    """Versions, the GPU and which SDPA kernels are on."""
    import torch

    lines = [f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}"]
    for name in ("timm", "avalanche-lib", "pot", "transformers", "clbench"):
        lines.append(f"  {name} {installed_version(name)}")
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        lines.append(
            f"GPU {properties.name}, {properties.total_memory / 2**30:.0f} GiB, CUDA "
            f"{torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}"
        )
        backends = torch.backends.cuda
        lines.append(
            f"SDPA kernels enabled: flash {backends.flash_sdp_enabled()}, memory-efficient "
            f"{backends.mem_efficient_sdp_enabled()}, cuDNN {backends.cudnn_sdp_enabled()}, "
            f"math {backends.math_sdp_enabled()}; TF32 matmul "
            f"{backends.matmul.allow_tf32} (fp32 rows are true fp32)"
        )
    return lines


def agreement(device: str, model: str, depth: int, batch: int) -> dict[str, Any]:
    """l2p's logits in bf16 against fp32 on the same random ViT and inputs."""
    import torch

    from clbench.encoders.vit import create_vit
    from clbench.registry import STRATEGIES

    torch.manual_seed(0)
    encoder = create_vit(model, pretrained=False, **({"depth": depth} if depth else {}))
    x = torch.randn(batch, 3, 224, 224, device=device)
    logits = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)
        config = STRATEGIES.get("l2p").Config(precision=precision, head_input="pooled")
        strategy = STRATEGIES.get("l2p")(
            encoder=encoder, num_classes=100, config=config, device=device
        )
        strategy.seen_classes[:] = True
        with torch.no_grad(), strategy.autocast():
            logits[precision] = strategy.predict(x).float()
    reference, low = logits["fp32"], logits["bf16"]
    scale = float(reference.abs().max())
    return {
        "max_abs_difference": float((low - reference).abs().max()),
        "scale": scale,
        "relative": float((low - reference).abs().max()) / scale,
        "argmax_agreement": float((low.argmax(1) == reference.argmax(1)).float().mean()),
        "items": batch,
    }


def run_logged(command: list[str], log: Path, timeout: float) -> int:
    """Run ``command``, its output to the terminal and to ``log``; -1 when it ran out of
    time (it is killed)."""
    print("$ " + " ".join(command), flush=True)
    with log.open("a") as sink:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        for line in process.stdout:
            sys.stdout.write(line)
            sink.write(line)
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                return -1
        return process.wait()


SIDES = ("avalanche", "l2p", "hide-prompt", "norga")
RESERVE_S = 60  # kept for the bf16 tests at the end


def throughput_rows(
    args: argparse.Namespace, batch: int, left: Any, summary: dict[str, Any]
) -> list[dict[str, Any]]:
    """One fresh process per (side, precision) at ``batch``, as bench_l2p_vs_avalanche.py
    runs them (its children and its table), each with the time left as its limit, so a
    slow row costs that row only."""
    import bench_l2p_vs_avalanche as bench
    from _peer_venv import ensure_peer_venv, peer_environment

    tiny = args.dry_run
    flags = ["--device", "cpu" if tiny else "cuda", "--batch-size", str(batch)]
    flags += ["--eval-batch-size", str(batch)]
    if tiny:
        flags += ["--model", "vit_tiny_patch16_224", "--depth", "2", "--threads", "1"]
        flags += ["--batches", "1", "--warmup", "1"]
    else:
        flags += ["--model", "vit_base_patch16_224", "--batches", "8", "--warmup", "2"]
    common = bench.common_arguments(bench.parse_arguments(flags))
    peer = ensure_peer_venv(args.venv, wheels=args.wheels)
    rows = []
    # the dry run tests the steps, not every row: Avalanche's and clbench's l2p
    for side in SIDES[:2] if tiny else SIDES:
        for precision in ("bf16", "fp32"):
            what = f"{'avalanche l2p' if side == 'avalanche' else 'clbench ' + side} {precision}"
            if left() < RESERVE_S + 30:
                summary["skipped"].append(f"batch {batch}, {what}: the time budget was spent")
                continue
            if side == "avalanche":
                command = [str(peer), str(bench.WORKER), *common, "--precision", precision]
                environment = peer_environment()
            else:
                command = [sys.executable, str(SCRIPTS / "bench_l2p_vs_avalanche.py"), *common]
                command += ["--run-one", side, "--precision", precision]
                environment = bench.child_environment()
            try:
                rows.append(bench.run_child(command, what, environment, timeout=left() - RESERVE_S))
            except (SystemExit, subprocess.TimeoutExpired) as error:
                summary["failed"].append(f"batch {batch}, {what}: {error}")
    return rows


def run(args: argparse.Namespace) -> None:
    import torch

    began = time.monotonic()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (--dry-run runs on the CPU)")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    summary: dict[str, Any] = {
        "environment": environment_lines(),
        "agreement": None,
        "bench": {},
        "skipped": [],
        "failed": [],
    }
    for line in summary["environment"]:
        print(line)

    def left() -> float:
        return args.budget_s - (time.monotonic() - began)

    device = "cpu" if args.dry_run else "cuda"
    model = "vit_tiny_patch16_224" if args.dry_run else "vit_base_patch16_224"
    found = agreement(device, model, 2 if args.dry_run else 0, batch=8 if args.dry_run else 64)
    print(
        f"bf16 vs fp32, l2p logits of {found['items']} images ({model}, {device}): max |diff| "
        f"{found['max_abs_difference']:.3g} of scale {found['scale']:.3g} "
        f"({100 * found['relative']:.2f}%), argmax agreement "
        f"{100 * found['argmax_agreement']:.1f}%",
        flush=True,
    )
    summary["agreement"] = found
    import bench_l2p_vs_avalanche as bench

    for batch in [2] if args.dry_run else args.batch_sizes:
        rows = throughput_rows(args, batch, left, summary)
        summary["bench"][batch] = rows
        if rows:
            kind = rows[0]["memory_kind"]
            print(f"\nbatch {batch}: throughput (items/s) and peak memory ({kind}):")
            print(bench.throughput_table(rows, on_cpu=args.dry_run))
            for line in bench.ratio_lines(rows, on_cpu=args.dry_run):
                print(line)
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    tests += [str(REPO / "tests" / "test_perf_paths.py"), "-k", "bf16"]
    summary["bf16_tests_exit_code"] = run_logged(tests, log, timeout=max(left(), 30))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    for line in summary["skipped"] + summary["failed"]:
        print(f"not measured: {line}")
    print(f"gpu check done in {time.monotonic() - began:.0f}s; results in {out}")
    sys.exit(1 if summary["failed"] or summary["bf16_tests_exit_code"] != 0 else 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    step = steps.add_parser("prepare", help="download the wheels (needs the package index)")
    step.add_argument("--wheels", type=Path, default=REPO / ".gpu_wheels")
    step.add_argument("--python-version", default=DEVICE_PYTHON)
    step = steps.add_parser("install", help="install the wheels the machine lacks, offline")
    step.add_argument("--wheels", type=Path, default=REPO / ".gpu_wheels")
    step.add_argument("--target", type=Path, required=True)
    step = steps.add_parser("run", help="measure (after install)")
    step.add_argument("--out", type=Path, default=REPO / ".gpu_check")
    step.add_argument("--wheels", type=Path, help="timm 0.6.13 for the peer venv, offline")
    step.add_argument("--venv", type=Path, default=Path("/tmp/clbench-gpu-check-peer"))
    step.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    step.add_argument("--budget-s", type=float, default=380, help="seconds for the run step")
    step.add_argument("--dry-run", action="store_true", help="CPU, tiny ViT: test the steps")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: random weights
    if args.step == "prepare":
        prepare(args.wheels, args.python_version)
    elif args.step == "install":
        install(args.wheels, args.target)
    else:
        run(args)


if __name__ == "__main__":
    main()
