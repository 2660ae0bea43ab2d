"""Fused ops, one per file (fused_<op>.py): reference (the spec), Triton kernels, launchers, custom-op registration."""

from deit_fast.ops.fused_attention import attention, attention_ref
from deit_fast.ops.fused_layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref

__all__ = ["attention", "attention_ref", "add_layer_norm", "add_layer_norm_ref", "layer_norm", "layer_norm_ref"]
