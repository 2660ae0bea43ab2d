"""DeiT models on the fused layers, and one-call conversion of existing timm ViT/DeiT models.

`create_model(name)` builds timm's own VisionTransformer / VisionTransformerDistilled through constructor injection
(embed_layer, block_fn, attn_layer, mlp_layer, norm_layer from deit_fast.layers), so parameter names, buffers and
state_dict keys are timm's: timm and facebookresearch/deit checkpoints load strictly and ours load into timm. The model
class is timm's with one method overridden, `forward_features`, which makes the tokens (patches, class/distillation/
register tokens, position embedding) with the fused embedding in one launch instead of timm's Conv2d + cat + add.

`patch(model)` converts an existing model in place by changing the class of each standard timm module to deit_fast's
subclass of it (which adds no state: every parameter, buffer, device, dtype and hook stays as it is); `unpatch(model)`
restores the original classes. Both return the model.
"""

from __future__ import annotations

import functools
import warnings

import timm
import torch
from timm.layers import Attention as TimmAttention
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import Mlp as TimmMlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.models.deit import VisionTransformerDistilled as TimmVisionTransformerDistilled
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import Tensor, nn

from deit_fast.layers import Attention, Block, LayerNorm, Mlp, PatchEmbed

DEIT_MODELS = (
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384",
    "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
    "deit_base_distilled_patch16_384",
)


class _FusedTokens:
    """forward_features with the fused token embedding; the rest is timm's code path."""

    def prefix_tokens(self) -> Tensor | None:
        """(T, C): the class, distillation and register tokens in timm's order, or None."""
        tokens = [t.reshape(-1, t.shape[-1]) for t in (getattr(self, "cls_token", None),
                                                         getattr(self, "dist_token", None),
                                                         getattr(self, "reg_token", None)) if t is not None]
        return torch.cat(tokens) if tokens else None

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if not isinstance(self.patch_embed, PatchEmbed):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        x = self.patch_embed.forward_tokens(x, self.pos_embed, self.prefix_tokens(), self.no_embed_class)
        x = self.pos_drop(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        if attn_mask is not None or is_causal:
            for block in self.blocks:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models._manipulate import checkpoint_seq

            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class VisionTransformer(_FusedTokens, TimmVisionTransformer):
    """timm's VisionTransformer with the fused token embedding (see the module docstring)."""


class VisionTransformerDistilled(_FusedTokens, TimmVisionTransformerDistilled):
    """timm's VisionTransformerDistilled (DeiT's distillation token) with the fused token embedding. In training with
    `distilled_training = True` it returns (cls_logits, dist_logits), else their average, as timm and DeiT do."""


# timm class -> deit_fast subclass. Only exact classes convert: a subclass of timm's Attention or Block may compute
# something else, so it is left alone (and listed).
CONVERSIONS: dict[type, type] = {
    TimmVisionTransformer: VisionTransformer, TimmVisionTransformerDistilled: VisionTransformerDistilled,
    TimmBlock: Block, TimmAttention: Attention, TimmMlp: Mlp, TimmPatchEmbed: PatchEmbed,
    nn.LayerNorm: LayerNorm, TimmLayerNorm: LayerNorm,
}
_ORIGINAL = "_deit_fast_original_class"
# Module kinds the fused layers stand in for; others of these kinds that stay unconverted are reported.
_TRANSFORMER_PARTS = ("Attention", "Block", "Mlp", "PatchEmbed", "LayerNorm", "VisionTransformer")


def _set_normalization(model: nn.Module) -> None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(getattr(model, "patch_embed", None), PatchEmbed) and "mean" in cfg and "std" in cfg:
        model.patch_embed.set_normalization(cfg["mean"], cfg["std"])


def patch(model: nn.Module) -> nn.Module:
    """Convert a timm ViT/DeiT model (any VisionTransformer built with timm's standard layers) to deit_fast's fused
    layers in place and return it. Parameters, buffers, devices, dtypes and the state_dict are unchanged. Modules that
    cannot be converted, or that will run timm's own forward (e.g. a tanh-GELU MLP), are listed in one warning."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    left = []
    converted = 0
    for name, module in model.named_modules():
        cls = type(module)
        target = CONVERSIONS.get(cls)
        if target is not None:
            if cls is nn.LayerNorm and len(module.normalized_shape) != 1:
                left.append(f"{name or 'model'} ({cls.__name__} over {tuple(module.normalized_shape)})")
                continue
            setattr(module, _ORIGINAL, cls)
            module.__class__ = target
            converted += 1
        elif cls not in CONVERSIONS.values() and any(part in cls.__name__ for part in _TRANSFORMER_PARTS):
            left.append(f"{name or 'model'} ({cls.__module__}.{cls.__name__})")
    for name, module in model.named_modules():
        if isinstance(module, Block) and (reason := module.unfusable_reason()):
            left.append(f"{name} (runs timm's forward: {reason})")
    _set_normalization(model)
    if left:
        warnings.warn(f"deit_fast.patch converted {converted} modules and left these as they are: " + "; ".join(left),
                      stacklevel=2)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: every converted module gets its original timm class back. Returns the model."""
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is not None:
            module.__class__ = original
    return model


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """A timm ViT/DeiT model built on the fused layers; `name` and kwargs as timm.create_model takes them.

    Every DeiT variant (DEIT_MODELS, distilled too) and other timm VisionTransformer names work; kwargs that change the
    architecture (img_size, num_classes, drop_path_rate, global_pool, class_token, no_embed_class, reg_tokens,
    init_values, qk_norm, dynamic_img_size, ...) pass through to timm, which builds the same modules it always builds,
    with deit_fast's layer classes. Passing your own embed_layer/block_fn/attn_layer/mlp_layer/norm_layer overrides
    ours (the fused paths then run only where those are the standard kinds). uint8 (B, H, W, 3) batches are accepted
    and normalized in the embedding kernel with the model's pretrained_cfg mean/std.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a timm model name (str), got {type(name).__name__}")
    if not timm.is_model(name):
        close = [m for m in timm.list_models(name.split("_")[0] + "*")][:8]
        raise ValueError(f"unknown model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    for key, value in _standard_layers(name, kwargs).items():
        kwargs.setdefault(key, value)
    return patch(_build(name, pretrained, kwargs))


def _build(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ValueError(f"{name} does not take these arguments ({e}); deit_fast.create_model builds timm "
                         "VisionTransformer models (the DeiT family and other ViTs)") from e
    if not isinstance(model, TimmVisionTransformer):
        raise ValueError(f"{name} builds a {type(model).__name__}, not a timm VisionTransformer; deit_fast models are "
                         "ViT/DeiT models")
    return model


def _standard_layers(name: str, kwargs: dict) -> dict:
    """The constructor slots (embed_layer, block_fn, attn_layer, mlp_layer, norm_layer) that deit_fast's layers can
    fill without changing the architecture: those where timm's own build of `name` (made on the meta device, so no
    memory or initialization is spent) uses the standard timm class. Entry points that choose other layers (a
    ResPostBlock, a conv stem, a LayerNorm without bias or with eps 1e-5 as CLIP's) keep them."""
    with torch.device("meta"):
        probe = _build(name, False, kwargs)
    layers = {}
    if type(probe.patch_embed) is TimmPatchEmbed:
        layers["embed_layer"] = PatchEmbed
    blocks = list(probe.blocks)
    if blocks and all(type(b) is TimmBlock for b in blocks):
        layers["block_fn"] = Block
        if all(type(b.attn) is TimmAttention for b in blocks):
            layers["attn_layer"] = Attention
        if all(type(b.mlp) is TimmMlp for b in blocks):
            layers["mlp_layer"] = Mlp
    norms = {(m.eps, m.elementwise_affine, m.bias is not None) for m in probe.modules()
             if type(m) in (nn.LayerNorm, TimmLayerNorm) and len(m.normalized_shape) == 1}
    others = [m for m in probe.modules() if "Norm" in type(m).__name__ and type(m) not in (nn.LayerNorm, TimmLayerNorm)]
    if len(norms) == 1 and not others:
        ((eps, affine, bias),) = norms
        layers["norm_layer"] = functools.partial(LayerNorm, eps=eps, affine=affine, bias=bias)
    return layers
