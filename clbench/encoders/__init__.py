"""Promptable encoders: frozen pretrained transformers behind one interface."""

from clbench.encoders.attention import Prompt, ResidualGate, prompted_attention
from clbench.encoders.base import EncoderOutput, OutputRows, PromptableEncoder, Readout

__all__ = [
    "EncoderOutput",
    "OutputRows",
    "Prompt",
    "PromptableEncoder",
    "Readout",
    "ResidualGate",
    "prompted_attention",
]
