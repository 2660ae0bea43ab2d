"""Mlp and Block: drop-ins for timm.layers.Mlp and timm's vision-transformer Block running the fused MLP half.

Both subclass timm's modules, so constructors (every argument and default), submodules (`fc1`, `act`, `drop1`,
`norm`, `fc2`, `drop2`; `norm1`, `attn`, `ls1`, `drop_path1`, `norm2`, `mlp`, `ls2`, `drop_path2`) and state_dicts
are timm's own; only `forward` changes. The Block's defaults take deit_fast's LayerNorm, Attention and Mlp, but its
fused path reads the parameters of whatever submodules it was built with (timm's VisionTransformer passes its own
norm and mlp classes through `block_fn`), so it runs fused whenever they are the standard kinds. Anything else (a
tanh GELU, a hidden norm, MLP dropout while training, conv MLPs, custom drop-path or layer-scale modules) runs timm's
forward, with a one-time log line naming why.
"""

from __future__ import annotations

import logging

import torch
from timm.layers import DropPath
from timm.layers import Mlp as TimmMlp
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import LayerScale
from torch import Tensor, nn

from deit_fast.layers.attention import Attention
from deit_fast.layers.norm import LayerNorm
from deit_fast.ops.fused_layer_norm import add_layer_norm
from deit_fast.ops.fused_mlp import mlp

logger = logging.getLogger("deit_fast")
_logged: set[str] = set()


def _log_once(module: str, reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("deit_fast %s: %s; running timm's forward", module, reason)


def mlp_unfusable_reason(m: nn.Module) -> str | None:
    """None when `m` is a timm-style Mlp the fused op computes exactly (Linear, exact GELU, Linear, no hidden norm,
    no active dropout), else why not."""
    if not isinstance(m, TimmMlp):
        return f"mlp is a {type(m).__name__}, not timm's Mlp"
    if not (isinstance(m.fc1, nn.Linear) and isinstance(m.fc2, nn.Linear)):
        return "conv (use_conv=True) MLPs are not fused"
    if not (isinstance(m.act, nn.GELU) and m.act.approximate == "none"):
        return f"the activation is {m.act!r}, not exact-erf nn.GELU"
    if not isinstance(m.norm, nn.Identity):
        return "a norm between fc1 and fc2 is not fused"
    if m.training and (m.drop1.p > 0 or m.drop2.p > 0):
        return "MLP dropout is not fused"
    return None


class Mlp(TimmMlp):
    """timm.layers.Mlp whose fc1 -> GELU -> fc2 runs as one fused op (bias and GELU in the GEMM epilogues)."""

    def forward(self, x: Tensor) -> Tensor:
        reason = mlp_unfusable_reason(self) or (None if x.dim() >= 2 else "inputs need a leading dimension")
        if reason:
            _log_once("Mlp", reason)
            return super().forward(x)
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


def _branch_dtype(x: Tensor, layer_scale: Tensor | None) -> torch.dtype:
    """The dtype timm's MLP branch has before drop_path: the Linear's output (the autocast dtype under autocast),
    promoted by a layer scale's gamma."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return torch.promote_types(dtype, layer_scale.dtype) if layer_scale is not None else dtype


def drop_path_scale(drop_path: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """timm's per-sample drop-path factor (bernoulli(keep) / keep), drawn exactly as timm's drop_path draws it (same
    shape, dtype and random stream), as a (B,) tensor; None when drop path is inactive."""
    if not drop_path.training or drop_path.drop_prob == 0.0:
        return None
    keep = 1.0 - drop_path.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=dtype).bernoulli_(keep)
    if keep > 0.0 and drop_path.scale_by_keep:
        mask.div_(keep)
    return mask.view(x.shape[0])


class Block(TimmBlock):
    """timm's vision-transformer Block: x = x + drop_path1(ls1(attn(norm1(x)))), then the residual add, norm2 and the
    whole MLP half (fc1, GELU, fc2, layer scale, drop path, residual) fused: add_layer_norm + deit_fast.ops.mlp.
    Drop path and layer scale are exact, in training and eval."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, scale_attn_norm: bool = False, scale_mlp_norm: bool = False,
                 proj_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: float | None = None, drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = LayerNorm, mlp_layer: type[nn.Module] = Mlp,
                 attn_layer=Attention, depth: int = 0, device=None, dtype=None) -> None:
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                         scale_attn_norm=scale_attn_norm, scale_mlp_norm=scale_mlp_norm, proj_bias=proj_bias,
                         proj_drop=proj_drop, attn_drop=attn_drop, init_values=init_values, drop_path=drop_path,
                         act_layer=act_layer, norm_layer=norm_layer, mlp_layer=mlp_layer, attn_layer=attn_layer,
                         depth=depth, device=device, dtype=dtype)

    def unfusable_reason(self) -> str | None:
        """None when the MLP half runs fused, else why it runs timm's forward."""
        if not (isinstance(self.norm2, nn.LayerNorm) and len(self.norm2.normalized_shape) == 1):
            return f"norm2 is a {type(self.norm2).__name__}, not a LayerNorm"
        if not isinstance(self.ls2, (LayerScale, nn.Identity)) or getattr(self.ls2, "inplace", False):
            return "ls2 is not timm's (out-of-place) LayerScale"
        if not isinstance(self.drop_path2, (DropPath, nn.Identity)):
            return "drop_path2 is not timm's DropPath"
        return mlp_unfusable_reason(self.mlp)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        reason = self.unfusable_reason()
        if reason:
            _log_once("Block", reason)
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        h = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        h = self.drop_path1(self.ls1(h))
        dtype = torch.promote_types(x.dtype, h.dtype)
        x, xn = add_layer_norm(x.to(dtype), h.to(dtype), self.norm2.weight, self.norm2.bias, self.norm2.eps)
        layer_scale = self.ls2.gamma if isinstance(self.ls2, LayerScale) else None
        sample_scale = None
        if isinstance(self.drop_path2, DropPath):
            sample_scale = drop_path_scale(self.drop_path2, xn, _branch_dtype(xn, layer_scale))
        m = self.mlp
        return mlp(xn, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, residual=x, layer_scale=layer_scale,
                   sample_scale=sample_scale)
