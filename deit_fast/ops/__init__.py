"""Fused ops, one per file (fused_<op>.py): reference (the spec), Triton kernels, launchers, custom-op registration."""

from deit_fast.ops.fused_attention import attention, attention_ref
from deit_fast.ops.fused_batch_prep import (
    BatchPrep,
    BatchPrepConfig,
    BatchPrepDraws,
    batch_prep,
    batch_prep_ref,
    mix_targets,
    sample_draws,
)
from deit_fast.ops.fused_distill_loss import distill_loss, distill_loss_ref
from deit_fast.ops.fused_layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref
from deit_fast.ops.fused_mlp import mlp, mlp_ref
from deit_fast.ops.fused_patch_embed import normalize_uint8, patch_embed, patch_embed_ref, resample_pos_embed

__all__ = [
    "BatchPrep", "BatchPrepConfig", "BatchPrepDraws", "batch_prep", "batch_prep_ref", "mix_targets", "sample_draws",
    "add_layer_norm", "add_layer_norm_ref", "attention", "attention_ref", "distill_loss", "distill_loss_ref",
    "layer_norm", "layer_norm_ref", "mlp", "mlp_ref", "normalize_uint8", "patch_embed", "patch_embed_ref",
    "resample_pos_embed",
]
