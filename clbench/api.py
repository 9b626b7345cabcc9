"""Entry points for an Avalanche script: a backbone, a scenario and a strategy by name.

The same names as ``clbench run`` (``clbench list`` shows them), and options given as
keyword arguments are checked exactly as ``--set`` checks them (an unknown option or a
malformed value is a :class:`~clbench.errors.UsageError` that lists the valid ones)::

    encoder = clbench.create_encoder("vit-tiny-random")
    scenario = clbench.create_scenario("digits-offline", encoder, seed=0)
    strategy = clbench.create_strategy("l2p", encoder=encoder, scenario=scenario, epochs=1)
    for experience in scenario.benchmark.train_stream:
        strategy.train(experience)
        strategy.eval(scenario.benchmark.test_stream)

torch, Avalanche and the registered modules are imported on the first call, so that
``import clbench`` stays cheap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from clbench.errors import UsageError

if TYPE_CHECKING:
    import torch

    from clbench.encoders.base import PromptableEncoder
    from clbench.scenario import Scenario
    from clbench.strategy import CLStrategy

__all__ = ["create_encoder", "create_scenario", "create_strategy"]

log = logging.getLogger(__name__)


def create_encoder(name: str, /, **options: Any) -> PromptableEncoder:
    """The registered backbone ``name`` (e.g. ``"vit-b16-in21k"``, ``"minilm-l6"``) built
    with ``options`` (its ``backbone.*`` options). A randomly initialised backbone draws
    from torch's global RNG: seed it first for the same weights."""
    from clbench.config import apply_overrides
    from clbench.registry import BACKBONES, options_class

    factory = BACKBONES.get(name)
    resolved = apply_overrides(options_class(factory)(), options, what=f"backbone {name}")
    encoder: PromptableEncoder = factory(resolved)
    return encoder


def create_scenario(
    name: str, encoder: PromptableEncoder, /, seed: int = 0, **options: Any
) -> Scenario:
    """The registered scenario ``name`` for ``encoder`` with ``options`` (its
    ``scenario.*`` options); ``seed`` orders the classes as ``clbench run --seed`` does.
    Its Avalanche benchmark is ``.benchmark`` (``train_stream`` / ``test_stream``)."""
    from clbench.config import apply_overrides
    from clbench.registry import SCENARIOS, options_class

    factory = SCENARIOS.get(name)
    resolved = apply_overrides(options_class(factory)(), options, what=f"scenario {name}")
    spec = SCENARIOS.spec(name)
    if spec.check_options is not None:  # the task-count checks clbench run makes first
        spec.check_options(resolved)
    scenario: Scenario = factory(resolved, encoder, seed)
    return scenario


def create_strategy(
    name: str,
    /,
    *,
    encoder: PromptableEncoder,
    num_classes: int | None = None,
    scenario: Scenario | None = None,
    preset: str = "auto",
    device: str | torch.device = "cpu",
    plugins: list[Any] | None = None,
    evaluator: Any = None,
    **options: Any,
) -> CLStrategy:
    """The registered strategy ``name`` (or ``"path/to/file.py:Class"``) on ``encoder``.

    num_classes: the classes of the whole stream; or give ``scenario``, which also gives
        the class names, the number of tasks (checked against per-task slot options
        before anything trains) and the preset ``auto`` picks.
    preset: a preset name of the strategy (``clbench list strategies``), ``default`` for
        none, or ``auto``: the one named after ``scenario`` if it has one, else none. Its
        hyper-parameters apply; its scenario options (``scenario.n_train``) do not, since
        the scenario is built already (give them to :func:`create_scenario`).
    device: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` or a torch device.
    evaluator: an Avalanche ``EvaluationPlugin`` (with the metrics and loggers
        ``strategy.eval`` reports); None keeps clbench's, which has none.
    options: hyper-parameters (``epochs=1``, ``lr=0.01``, ...), applied over the preset.
    """
    from clbench.config import apply_overrides
    from clbench.registry import load_strategy_class
    from clbench.resolution import BACKBONE_PRESET_KEY
    from clbench.runner import resolve_device, resolve_preset, split_preset

    strategy_class = load_strategy_class(name)
    if scenario is not None:
        if num_classes is not None and num_classes != scenario.num_classes:
            raise UsageError(
                f"num_classes={num_classes}, but scenario {scenario.name} has "
                f"{scenario.num_classes} classes: give one of them"
            )
        num_classes = scenario.num_classes
    if num_classes is None:
        raise UsageError(f"create_strategy({name!r}) needs num_classes= or scenario=")
    _, preset_values = resolve_preset(
        strategy_class, preset, scenario.name if scenario is not None else ""
    )
    # the scenario and the encoder are built already: a preset's scenario.<option> values
    # and its backbone do not apply (the latter is said, as the encoder may differ)
    strategy_values, _ = split_preset(preset_values, set())
    named = preset_values.get(BACKBONE_PRESET_KEY)
    if named is not None:
        log.info(f"preset {preset!r} of {name} runs on backbone {named}; this strategy uses "
                 "the encoder passed in")  # fmt: skip
    config = apply_overrides(
        strategy_class.Config(), strategy_values, what=f"{strategy_class.name} preset"
    )
    config = apply_overrides(config, options, what=strategy_class.name or "strategy")
    extra: dict[str, Any] = {} if evaluator is None else {"evaluator": evaluator}
    if scenario is not None:
        extra.update(class_names=scenario.class_names, num_tasks=scenario.num_experiences)
    strategy: CLStrategy = strategy_class(
        encoder=encoder,
        num_classes=num_classes,
        config=config,
        device=resolve_device(device) if isinstance(device, str) else device,
        plugins=plugins,
        **extra,
    )
    return strategy
