"""LayerNorm: a drop-in for timm.layers.LayerNorm running the fused LayerNorm op."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from deit_fast.ops.fused_layer_norm import layer_norm


class LayerNorm(nn.LayerNorm):
    """timm.layers.LayerNorm's signature (num_channels, eps=1e-6, affine=True, **nn.LayerNorm kwargs such as
    bias, device, dtype), parameters `weight` and `bias`, and state_dict. Normalizes the last dimension with
    `deit_fast.ops.layer_norm` (float32 statistics, output in the input's dtype)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)
