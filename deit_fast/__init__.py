"""deit_fast: fused kernels, drop-in timm layers and a training loop for DeiT vision transformers."""

from deit_fast import ops
from deit_fast._backend import BackendUnavailableError
from deit_fast.layers import Attention, Block, LayerNorm, Mlp, PatchEmbed
from deit_fast.models import create_model, patch, unpatch
from deit_fast.ops import add_layer_norm, attention, layer_norm

__version__ = "0.1.0"

__all__ = [
    "Attention", "BackendUnavailableError", "Block", "LayerNorm", "Mlp", "PatchEmbed", "__version__", "add_layer_norm",
    "attention", "create_model", "layer_norm", "ops", "patch", "unpatch",
]
