"""Low-rank adapters (LoRA family) on the frozen encoder's projections.

How an adapter reaches the encoder
----------------------------------
Nothing here wraps, copies or writes the shared frozen encoder. An adapter is a module
of the *strategy's* model (so checkpoints, resume and ``requires_grad`` work as they do
for prompts) that produces :class:`~clbench.encoders.deltas.LowRankTerm` objects; a
:class:`LayerAdapters` gathers them into ``Prompt.deltas`` (layer -> ``LayerDelta``),
and each block adds them next to its frozen modules in the one attention path. The
un-prompted query ``encoder.query(x)`` never sees an adapter, so query caches stay exact.

Targets are backbone-neutral: ``q``, ``k``, ``v`` (attention; on a ViT the thirds of the
fused qkv), ``o`` (attention output projection), ``fc1``, ``fc2`` (the MLP). An update of
target t on block l is ``W x + b + sum_i s_i B_i M_i A_i x (+ dW x)``.

A strategy in a few lines::

    from clbench.adapters import LayerAdapters, LoRA
    from clbench.prompts import merge_prompts

    # setup: one LoRA on k and v of blocks 0-4 (HiDe-LoRA's placement)
    model.lora = LayerAdapters.build(
        encoder, range(5), ("k", "v"),
        lambda weight, layer, target: LoRA(weight.shape[1], weight.shape[0], 5,
                                           target=target, alpha=1.0),
    )
    # forward: adapters + any prefixes in one Prompt
    out = encoder(x, merge_prompts(prefix_prompt, model.lora.prompt()), readout="pooled")
    loss = cross_entropy(head(out.pooled), y) + model.lora.aux_loss()

The pieces a continual-learning strategy builds on:

* **one adapter set per task** - a ``LayerAdapters`` per task in an ``nn.ModuleList``,
  built in ``setup`` (fixed checkpoint layout); ``begin_task`` turns on the current
  one's ``requires_grad``, ``end_task`` calls ``.freeze()``. Old tasks stay active by
  merging their deltas: ``merge_deltas(*(t.deltas() for t in tasks[: task + 1]))``
  (O-LoRA; SD-LoRA with ``LoRA(..., magnitude=0.8)`` and earlier factors frozen);
* **per-sample routing** - ``stack_tasks(tasks, predicted_task)`` stacks every task's
  factors and gathers them per sample in one batched product (HiDe-LoRA at test time);
* **frozen, designed factors** - ``LoRA(..., down=F_t, train_down=False)`` (InfLoRA: B
  trained over a designed A); ``LoRA(..., down=A, up=B, middle=zeros(r, r),
  train_down=False, train_up=False)`` trains only the r x r middle (NuSA-CL);
* **merging a finished task** - ``MergedOffsets(encoder, layers, targets)`` holds
  dW_acc as fp32 buffers; ``offsets.absorb(task_adapters)`` adds the task's dense update;
  ``offsets.deltas()`` is the dense part of ``Prompt.deltas`` (merge it with the live
  adapters' deltas). ``encoder.projection_weight(layer, target)`` plus the offset is the
  merged weight an SVD-based method (NuSA) decomposes;
* **observing a projection's input** - ``LayerDelta(taps={"k": fn})`` calls ``fn`` with
  the projection's input (InfLoRA's input covariance); module forward hooks do not fire
  for a target whose delta has a dense term, taps always do;
* **LoRA+** - ``loraplus_parameter_groups(model, lr, ratio)`` as the strategy's
  ``trainable_parameters()``.

Parameterisations (one module each): :class:`LoRA` (rsLoRA option), :func:`pissa` /
:func:`milora` (``svd_init``: principal / minor singular components, a frozen offset
keeps the initial function exact), :class:`KaSA`, :class:`RepLoRA` (generated factors;
what is and is not known about the paper is in its module docstring).
"""

from clbench.adapters.base import LowRankAdapter, kaiming_down, scaling
from clbench.adapters.container import AdapterFactory, LayerAdapters, stack_tasks
from clbench.adapters.kasa import KaSA
from clbench.adapters.lora import LoRA
from clbench.adapters.loraplus import loraplus_parameter_groups
from clbench.adapters.offsets import MergedOffsets
from clbench.adapters.replora import RepLoRA
from clbench.adapters.svd_init import milora, pissa, singular_components, svd_lora
from clbench.encoders.deltas import LayerDelta, LowRankTerm, merge_deltas

__all__ = [
    "AdapterFactory",
    "KaSA",
    "LayerAdapters",
    "LayerDelta",
    "LoRA",
    "LowRankAdapter",
    "LowRankTerm",
    "MergedOffsets",
    "RepLoRA",
    "kaiming_down",
    "loraplus_parameter_groups",
    "merge_deltas",
    "milora",
    "pissa",
    "scaling",
    "singular_components",
    "stack_tasks",
    "svd_lora",
]
