"""Promptable encoders: frozen pretrained transformers behind one interface."""

from clbench.encoders.attention import Prompt, ResidualGate, prompted_attention
from clbench.encoders.base import EncoderOutput, PromptableEncoder

__all__ = ["EncoderOutput", "Prompt", "PromptableEncoder", "ResidualGate", "prompted_attention"]
