"""Attention: a drop-in for timm.layers.Attention whose core runs on the packed qkv output (deit_fast.ops.attention).

It subclasses timm's module, so the constructor (every argument and default), the submodules (`qkv`, `q_norm`,
`k_norm`, `attn_drop`, `norm`, `gate`, `proj`, `proj_drop`), the attributes and the state_dict are timm's own. Only
`forward` changes. Cases the fused op does not cover run timm's own forward, with a one-time log line: an attention
mask, `is_causal`, and attention dropout while training. Setting `fused_attn = False` (timm's switch, e.g. to hook
the attention maps through `attn_drop`) runs timm's explicit path too, as it does in timm.
"""

from __future__ import annotations

import logging

import torch
from timm.layers import Attention as TimmAttention
from torch import nn

from deit_fast.ops.fused_attention import attention

logger = logging.getLogger("deit_fast")
_logged: set[str] = set()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("deit_fast Attention: %s; running timm's attention", reason)


class Attention(TimmAttention):
    """timm.layers.Attention with the attention core fused and no layout copies around it."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not self.fused_attn:
            _log_once("fused_attn is False (timm's explicit path requested)")
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            _log_once("attention masks and is_causal are not fused")
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self.training and self.attn_drop.p > 0:
            _log_once("attention dropout is not fused")
            return super().forward(x)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x)
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            # q_norm/k_norm act on the last (head) dimension, so they apply to the packed layout as they are.
            q, k, v = qkv.view(B, N, 3, self.num_heads, self.head_dim).unbind(2)
            qkv = torch.stack([self.q_norm(q), self.k_norm(k), v], dim=2).reshape(B, N, -1)
        x = attention(qkv, self.num_heads, self.scale)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
