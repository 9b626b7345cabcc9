"""The fast paths give the results of the plain ones: query cache, SDPA, bf16 autocast,
loader defaults; and the benchmark's timing arithmetic."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from small_configs import HIDE_SMALL

from clbench.encoders.attention import prompted_attention
from clbench.errors import UsageError
from clbench.prompts import TaskPrefixPrompts
from clbench.registry import STRATEGIES
from clbench.runner import RunRequest, execute, new_run_folder, resolve_run
from clbench.training import resolve_num_workers, resolve_precision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


pytestmark = pytest.mark.usefixtures("one_thread")


# a smaller random ViT than digits-offline's default, and two tasks: a few seconds a run
SMALL_VIT = {"depth": "2", "embed_dim": "32", "num_heads": "2"}


def run_matrix(tmp_path, strategy, scenario, **overrides):
    """The correct-count matrix of a real ``clbench run`` (run loop, checkpoints and all)."""
    request = RunRequest(
        strategy=strategy,
        scenario=scenario,
        device="cpu",
        seed=3,
        strategy_overrides={k: str(v) for k, v in overrides.items()},
        scenario_overrides={"num_experiences": "2"},
        backbone_overrides=SMALL_VIT,
    )
    config = resolve_run(request)
    folder = execute(new_run_folder(tmp_path, config), config, echo=lambda line: None)
    return [record.correct for record in folder.records()]


# -- query cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["l2p", "hide-prompt"])
def test_cached_and_uncached_queries_give_the_same_accuracy_matrix(tmp_path, strategy):
    # Evaluation batches are the same in both runs, so cached features are the very bits a
    # fresh pass computes: the matrices must agree item for item, not just within noise.
    quick = {"epochs": 1, "batch_size": 64, "eval_batch_size": 256}
    if strategy == "l2p":
        quick.update(pool_size=4, top_k=2, prompt_length=2)
    else:
        quick.update(
            num_tasks=2,
            prompt_layers="0,1",
            prompt_length=2,
            tii_epochs=2,
            tii_align_epochs=2,
            tap_epochs=2,
            samples_per_class=32,
        )
    cached = run_matrix(tmp_path / "on", strategy, "digits-offline", **quick)
    plain = run_matrix(tmp_path / "off", strategy, "digits-offline", cache_queries=False, **quick)
    assert len(cached) == 2
    assert cached == plain
    assert sum(cached[-1]) > 0  # something was learnt, so the comparison means something


@pytest.mark.parametrize("cache_train", [False, True])
def test_training_image_queries_are_cached_only_on_request(tiny_vit, cache_train):
    # digits-offline does not augment, so with cache_train_queries the second epoch finds
    # every training query in the cache; without it, training images are never inserted
    from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

    digits = digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)
    experience = digits.benchmark.train_stream[0]
    strategy_class = STRATEGIES.get("l2p")
    config = strategy_class.Config(
        epochs=2,
        batch_size=64,
        pool_size=4,
        top_k=2,
        prompt_length=2,
        cache_train_queries=cache_train,
    )
    strategy = strategy_class(encoder=tiny_vit, num_classes=10, config=config)
    strategy.train(experience)
    items = len(experience.dataset)
    cache = strategy.query_cache
    assert (cache.misses, cache.hits) == ((items, items) if cache_train else (2 * items, 0))
    assert len(cache) == (items if cache_train else 0)
    if cache_train:  # the stored rows are the encoder's queries of those very images
        images = torch.stack([experience.dataset.eval()[i][0] for i in range(8)])
        found, position = cache.lookup(cache.fingerprint(images))
        assert found.all()
        with torch.no_grad():
            torch.testing.assert_close(
                cache.values[position], tiny_vit.query(images), atol=1e-5, rtol=1e-4
            )


@pytest.mark.slow
def test_cached_text_queries_match_within_noise(tmp_path):
    # Text training reuses cached queries across epochs; a fresh pass over a differently
    # composed batch trims padding differently, so features agree to ~1e-6, not bit for bit.
    small = {"epochs": 2, "batch_size": 32, "eval_batch_size": 64}
    scenario = {"n_train": "24", "n_val": "4", "n_test": "12", "max_length": "64"}

    def matrix(**overrides):
        request = RunRequest(
            strategy="l2p",
            scenario="fewrel-offline",
            device="cpu",
            strategy_overrides={k: str(v) for k, v in {**small, **overrides}.items()},
            scenario_overrides=scenario,
        )
        config = resolve_run(request)
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        folder = execute(new_run_folder(out, config), config, echo=lambda line: None)
        # NaN where a test experience was not evaluated (unseen): 0 on both sides
        return torch.tensor(folder.accuracy_matrix()).nan_to_num()

    cached, plain = matrix(), matrix(cache_queries=False)
    assert (cached - plain).abs().max() <= 5.0


# -- attention: SDPA unless a gate needs the logits -------------------------------------------


def reference_attention(q, k, v, prefix, mask, gate=None):
    """softmax([gate(q pK^T) ; q K^T] / sqrt(d) + mask) [pV ; V], written out."""
    batch, heads, _, dim = q.shape
    length = prefix.shape[2]
    split = prefix.reshape(prefix.shape[0], 2, length, heads, dim).permute(1, 0, 3, 2, 4)
    keys = torch.cat([split[0].expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([split[1].expand(batch, -1, -1, -1), v], dim=2)
    logits = q @ keys.transpose(-2, -1) / math.sqrt(dim)
    if gate is not None:
        logits = torch.cat([gate(logits[..., :length]), logits[..., length:]], dim=-1)
    allowed = torch.cat([torch.ones(batch, length, dtype=torch.bool), mask], dim=1)
    logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return logits.softmax(-1) @ values


def test_plain_prefixes_run_through_sdpa_and_equal_the_explicit_maths(monkeypatch):
    calls = []
    fused = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 8) for _ in range(3))
    prefix = torch.randn(1, 2, 5, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False  # text padding
    mask[2, 3:] = False
    out = prompted_attention(q, k, v, prefix=prefix, key_padding_mask=mask)
    assert len(calls) == 1
    torch.testing.assert_close(
        out, reference_attention(q, k, v, prefix, mask), atol=1e-5, rtol=1e-5
    )

    # a gate needs the prefix logits: the explicit path, still the same maths
    def gate(s):
        return s + 0.5 * torch.tanh(2.0 * s)

    gated = prompted_attention(q, k, v, prefix=prefix, gate=gate, key_padding_mask=mask)
    assert len(calls) == 1
    torch.testing.assert_close(
        gated, reference_attention(q, k, v, prefix, mask, gate), atol=1e-5, rtol=1e-5
    )


# -- bf16 autocast ---------------------------------------------------------------------------


def test_precision_resolution_and_bad_values():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None  # fp32 on a CPU unless asked
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(UsageError, match="auto, fp32, bf16"):
        resolve_precision("fp16", cpu)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16


def test_bf16_autocast_matches_fp32_within_tolerance(tiny_vit):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)

    def build(precision):
        torch.manual_seed(1)
        config = STRATEGIES.get("l2p").Config(
            pool_size=6, top_k=2, prompt_length=3, precision=precision, head_input="pooled"
        )
        strategy = STRATEGIES.get("l2p")(encoder=tiny_vit, num_classes=10, config=config)
        strategy.seen_classes[:] = True
        return strategy

    plain, mixed = build("fp32"), build("bf16")
    assert mixed.amp_dtype is torch.bfloat16 and plain.amp_dtype is None
    projections = []
    hook = tiny_vit.model.blocks[0].attn.qkv.register_forward_hook(
        lambda module, inputs, output: projections.append(output.dtype)
    )
    try:
        with torch.no_grad():
            reference = plain.predict(x)
            with mixed.autocast():
                low = mixed.predict(x)
    finally:
        hook.remove()
    # the projections really ran in bf16 under autocast (layer norms stay fp32)
    assert projections[0] == torch.float32 and projections[-1] == torch.bfloat16
    scale = reference.abs().max()
    assert (low.float() - reference).abs().max() <= 0.05 * scale
    assert (low.argmax(1) == reference.argmax(1)).float().mean() >= 0.8


def test_bf16_gated_prefix_path_matches_fp32(tiny_vit):
    # NoRGa's gate runs on explicit logits; under autocast those are bf16
    torch.manual_seed(2)
    prompts = TaskPrefixPrompts(2, [0, 1], 3, tiny_vit.embed_dim, gate_activation="sigmoid")
    prompt = prompts(task=0).prompt
    assert prompt.gates
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        reference = tiny_vit(x, prompt).pooled
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny_vit(x, prompt).pooled
    assert (low.float() - reference).abs().max() <= 0.05 * reference.abs().max()


class DtypeProbe(SupervisedPlugin):
    """The dtypes of what Avalanche's loop saw at each iteration."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, torch.dtype]] = set()

    def after_training_iteration(self, strategy, *args, **kwargs):
        self.seen |= {("output", strategy.mb_output.dtype), ("loss", strategy.loss.dtype)}

    def after_eval_iteration(self, strategy, *args, **kwargs):
        self.seen.add(("eval output", strategy.mb_output.dtype))


def test_bf16_training_runs_through_avalanche_with_fp32_losses_and_parameters(tiny_vit):
    from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

    digits = digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)
    strategy_class = STRATEGIES.get("norga")
    config = strategy_class.Config(**HIDE_SMALL, precision="bf16")
    probe = DtypeProbe()
    strategy = strategy_class(encoder=tiny_vit, num_classes=10, config=config, plugins=[probe])
    before = strategy.model.prompts.prompts[0].detach().clone()
    strategy.train(digits.benchmark.train_stream[0])
    strategy.eval([digits.benchmark.test_stream[0]])
    assert probe.seen == {
        ("output", torch.float32),
        ("loss", torch.float32),
        ("eval output", torch.float32),
    }
    prompt = strategy.model.prompts.prompts[0]
    assert prompt.dtype == torch.float32 and not torch.equal(prompt.detach(), before)


# -- loader defaults ------------------------------------------------------------------------


def test_loader_workers_auto_resolution(tiny_vit):
    assert resolve_num_workers(-1, torch.device("cpu")) == 0  # workers would steal the cores
    assert resolve_num_workers(-1, torch.device("cuda")) >= 1
    assert resolve_num_workers(3, torch.device("cpu")) == 3
    with pytest.raises(UsageError, match="-1 for auto"):
        resolve_num_workers(-2, torch.device("cpu"))
    config = STRATEGIES.get("l2p").Config()
    assert config.num_workers == -1  # the default is auto
    strategy = STRATEGIES.get("l2p")(encoder=tiny_vit, num_classes=10, config=config)
    assert strategy.config.num_workers == 0 and config.num_workers == -1


def test_training_with_persistent_loader_workers(tiny_vit):
    from clbench.scenarios.offline_vision import DigitsOptions, digits_offline

    digits = digits_offline(DigitsOptions(num_experiences=5), tiny_vit, seed=0)
    config = STRATEGIES.get("l2p").Config(
        epochs=2, batch_size=128, num_workers=1, pool_size=4, top_k=2, head_input="pooled"
    )
    strategy = STRATEGIES.get("l2p")(encoder=tiny_vit, num_classes=10, config=config)
    loader_arguments = []
    make_loader = strategy.make_train_dataloader

    def recording(**kwargs):
        loader_arguments.append(kwargs)
        return make_loader(**kwargs)

    strategy.make_train_dataloader = recording
    before = strategy.model.prompt_pool.prompts.detach().clone()
    strategy.train(digits.benchmark.train_stream[0])
    assert loader_arguments[0]["num_workers"] == 1
    assert loader_arguments[0]["persistent_workers"] is True
    assert not torch.equal(strategy.model.prompt_pool.prompts, before)


# -- the benchmark's arithmetic ---------------------------------------------------------------


def test_rates_exclude_warmup_and_weights_count_shared_tensors_once():
    from _avalanche_l2p_worker import items_per_second, weights_mib

    stamps = [(10.0, 8), (11.0, 8), (13.0, 8), (14.0, 4)]
    assert items_per_second(stamps, warmup=1) == pytest.approx(20 / 4)
    assert items_per_second(stamps, warmup=2) == pytest.approx(12 / 3)
    with pytest.raises(ValueError, match="more batches"):
        items_per_second(stamps, warmup=4)
    with pytest.raises(ValueError, match="warm-up"):
        items_per_second(stamps, warmup=0)
    layer = torch.nn.Linear(256, 256, bias=False)  # 256 KiB of fp32 weights
    shared = torch.nn.Sequential(layer, torch.nn.Sequential(layer))
    copy = torch.nn.Linear(256, 256, bias=False)
    assert weights_mib([shared]) == pytest.approx(0.25)
    assert weights_mib([shared, copy]) == pytest.approx(0.5)


def test_clbench_strategies_hold_one_copy_of_the_encoder(tiny_vit):
    from _avalanche_l2p_worker import weights_mib

    for name, options in (("l2p", {}), ("hide-prompt", {"prompt_layers": [0, 1]})):
        strategy_class = STRATEGIES.get(name)
        strategy = strategy_class(
            encoder=tiny_vit, num_classes=10, config=strategy_class.Config(**options)
        )
        trainable = (
            sum(
                p.numel() * 4
                for n, p in strategy.model.named_parameters()
                if not n.startswith("encoder.")
            )
            / 2**20
        )
        assert weights_mib([strategy.model]) <= weights_mib([tiny_vit]) + trainable + 0.01


@pytest.mark.slow
def test_benchmark_and_profile_scripts_run_end_to_end(tmp_path):
    # Avalanche's side too, in a peer venv made here from the interpreter running the tests
    # (a venv, as the README installs into): the peer must find torch and avalanche there
    common = ["--batch-size", "2", "--eval-batch-size", "2", "--batches", "1", "--threads", "1"]
    wheels = REPO / ".gpu_wheels"  # timm 0.6.13 offline where the GPU check brought it
    offline = ["--wheels", str(wheels)] if any(wheels.glob("timm-0.6.13-*.whl")) else []
    bench = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_l2p_vs_avalanche.py"),
            *common,
            "--venv",
            str(tmp_path / "peer"),
            *offline,
            "--strategies",
            "l2p",
            "--curve-tasks",
            "2",
            "--curve-test-items",
            "2",
            "--json",
            str(tmp_path / "bench.json"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "clbench l2p fp32" in bench.stdout and "queries computed" in bench.stdout
    assert "avalanche l2p fp32" in bench.stdout and "clbench l2p fp32 / avalanche" in bench.stdout
    profile = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "profile_epoch.py"),
            "--batch-size",
            "2",
            "--batches",
            "2",
            "--tasks",
            "2",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert profile.returncode == 0, profile.stdout + profile.stderr
    for phase in ("data", "forward", "backward", "selection", "statistics"):
        assert phase in profile.stdout
