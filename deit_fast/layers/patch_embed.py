"""PatchEmbed: a drop-in for timm.layers.PatchEmbed running the fused patch embedding (deit_fast.ops.patch_embed).

It subclasses timm's module: the constructor (every argument and default), `proj` (a Conv2d, so `proj.weight` keeps
its (C, Cin, p, p) shape and state_dicts load both ways), `norm`, `flatten`, `strict_img_size`, `dynamic_img_pad`
and `set_input_size` are timm's own. `forward` runs the fused op for flattened output (the ViT case); other output
formats run timm's forward. It also takes uint8 (B, H, W, Cin) batches once `set_normalization(mean, std)` is given.
`forward_tokens` is the model-level embedding: patches, prefix tokens and position embedding in one launch.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.layers import Format
from timm.layers import PatchEmbed as TimmPatchEmbed
from torch import Tensor, nn

from deit_fast.ops.fused_patch_embed import patch_embed, resample_pos_embed

logger = logging.getLogger("deit_fast")
_logged: set[str] = set()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("deit_fast PatchEmbed: %s; running timm's forward", reason)


class PatchEmbed(TimmPatchEmbed):
    """timm.layers.PatchEmbed with the Conv2d + flatten + transpose (and, via forward_tokens, the token concat and the
    position embedding) done by one fused kernel."""

    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None

    def set_normalization(self, mean, std) -> None:
        """Accept uint8 (B, H, W, Cin) batches, normalized in the kernel as (u / 255 - mean) / std (timm's units)."""
        self.input_mean, self.input_std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def _check_size(self, H: int, W: int) -> None:
        if self.img_size is not None and self.strict_img_size:
            if (H, W) != tuple(self.img_size):
                raise ValueError(f"input size {H}x{W} doesn't match the model's {self.img_size[0]}x"
                                 f"{self.img_size[1]} (strict_img_size=True)")

    def _prepare(self, x: Tensor) -> tuple[Tensor, dict]:
        """Validate the size, pad for dynamic_img_pad, and return the image with the op's normalization kwargs."""
        uint8 = x.dtype == torch.uint8
        if uint8:
            if self.input_mean is None:
                raise ValueError("uint8 images need set_normalization(mean, std) on the PatchEmbed first")
            H, W = x.shape[1], x.shape[2]
        else:
            H, W = x.shape[-2], x.shape[-1]
        self._check_size(H, W)
        ph, pw = self.patch_size
        if self.dynamic_img_pad and (H % ph or W % pw):
            if uint8:
                raise ValueError("dynamic_img_pad pads normalized images with zeros; uint8 input is normalized in "
                                 "the kernel, so pad it (or resize) before the model")
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        elif H % ph or W % pw:
            if self.img_size is not None and not self.strict_img_size:
                raise ValueError(f"input size {H}x{W} is not divisible by the patch size {ph}x{pw} "
                                 "(strict_img_size=False without dynamic_img_pad, as timm requires)")
            # timm's strided Conv2d drops the last rows and columns that do not fill a patch; a view does the same.
            Hc, Wc = H // ph * ph, W // pw * pw
            x = x[:, :Hc, :Wc, :] if uint8 else x[..., :Hc, :Wc]
        return x, (dict(mean=self.input_mean, std=self.input_std) if uint8 else {})

    def forward(self, x: Tensor) -> Tensor:
        if not self.flatten or self.output_fmt != Format.NCHW:
            _log_once("unflattened output formats are not fused")
            return super().forward(x)
        x, norm_kwargs = self._prepare(x)
        return self.norm(patch_embed(x, self.proj.weight, self.proj.bias, **norm_kwargs))

    def forward_tokens(self, x: Tensor, pos_embed: Tensor | None, prefix_tokens: Tensor | None,
                       no_embed_class: bool = False) -> Tensor:
        """(B, T + P, C) tokens as VisionTransformer's patch_embed + _pos_embed make them: prefix tokens (T, C) (e.g.
        cls and dist), position embedding (1, T + P, C), or (1, P, C) with no_embed_class; a position embedding made
        for another grid is resampled as timm's dynamic_img_size does (resample_abs_pos_embed)."""
        x, norm_kwargs = self._prepare(x)
        H, W = (x.shape[1], x.shape[2]) if x.dtype == torch.uint8 else (x.shape[-2], x.shape[-1])
        grid = (H // self.patch_size[0], W // self.patch_size[1])
        T = prefix_tokens.shape[0] if prefix_tokens is not None else 0
        if pos_embed is not None:
            pos_prefix = 0 if no_embed_class else T
            if pos_embed.shape[1] != pos_prefix + grid[0] * grid[1]:
                pos_embed = resample_pos_embed(pos_embed, grid, self.grid_size, num_prefix_tokens=pos_prefix)
        if not isinstance(self.norm, nn.Identity):
            # timm normalizes the patch tokens before the prefix tokens and position are added: keep that order.
            tokens = self.norm(patch_embed(x, self.proj.weight, self.proj.bias, **norm_kwargs))
            if no_embed_class and pos_embed is not None:
                tokens = tokens + pos_embed
            if T:
                tokens = torch.cat([prefix_tokens.unsqueeze(0).expand(tokens.shape[0], -1, -1).to(tokens.dtype),
                                    tokens], dim=1)
            return tokens + pos_embed if (pos_embed is not None and not no_embed_class) else tokens
        return patch_embed(x, self.proj.weight, self.proj.bias, pos_embed, prefix_tokens,
                           no_embed_class=no_embed_class, **norm_kwargs)
