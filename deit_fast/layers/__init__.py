"""timm-shaped nn.Modules built on deit_fast.ops: same constructor arguments, defaults and state_dict keys."""

from deit_fast.layers.attention import Attention
from deit_fast.layers.mlp import Block, Mlp
from deit_fast.layers.norm import LayerNorm
from deit_fast.layers.patch_embed import PatchEmbed

__all__ = ["Attention", "Block", "LayerNorm", "Mlp", "PatchEmbed"]
