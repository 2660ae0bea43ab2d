"""deit_fast: fused kernels, drop-in timm layers and a training loop for DeiT vision transformers."""

from deit_fast import ops
from deit_fast._backend import BackendUnavailableError
from deit_fast.layers import Attention, LayerNorm
from deit_fast.ops import add_layer_norm, attention, layer_norm

__version__ = "0.1.0"

__all__ = [
    "Attention", "BackendUnavailableError", "LayerNorm", "__version__", "add_layer_norm", "attention", "layer_norm",
    "ops",
]
