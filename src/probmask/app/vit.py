"""A small Vision Transformer for the runner's small-image data sets (``model.name=vit_tiny``).

Patches of ``patch x patch`` pixels are embedded by one strided convolution, a learned class token
and learned position embeddings are added, ``depth`` pre-norm encoder blocks follow (multi-head
self-attention by ``nn.MultiheadAttention``, then a two-layer GELU MLP, each with a residual
connection), and a linear head reads the class token. With the defaults on 28x28 MNIST digits
(patch 7: 16 patches and the class token; width 64, 4 blocks, 4 heads, MLP 128) it has about
137k parameters, 134,848 of them in prunable weight matrices.

Two declarations tell the runner how to prune it (see :mod:`probmask.app.models`):

* :attr:`ViTTiny.prune_include`: the attention's input projection ``in_proj_weight`` (queries,
  keys and values in one ``[3 dim, dim]`` matrix) is a plain parameter of ``nn.MultiheadAttention``,
  not the weight of a ``nn.Linear``, so the default selection (Linear and Conv weights) would leave
  it dense; the model asks for it by name pattern. Its output projection ``out_proj`` is a
  ``nn.Linear`` and is selected by default.
* :meth:`ViTTiny.parameter_role`: the role of each prunable weight (patch embedding, attention
  input projection, attention output, MLP, head), by which results, report and plot group layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from probmask.app.errors import UserError

__all__ = ["ROLES", "ViTTiny"]

# the roles of vit_tiny's prunable weights, in the order they are shown
ROLES = ("patch embedding", "attention in (q, k, v)", "attention out", "MLP", "head")


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTTiny(nn.Module):
    """Vision Transformer: patch embedding, class token, ``depth`` encoder blocks, linear head."""

    # prunable beyond the default Linear / Conv weights (fnmatch patterns of parameter names)
    prune_include: tuple[str, ...] = ("*.in_proj_weight",)

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], patch: int = 7, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise UserError(f"vit_tiny needs images [C, H, W], got input shape {list(input_shape)}")
        channels, height, width = input_shape
        for key, value in (("patch", patch), ("dim", dim), ("depth", depth), ("heads", heads), ("mlp", mlp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"vit_tiny option {key} must be a positive integer, got {value!r}")
        if height % patch or width % patch:
            raise UserError(f"vit_tiny: patch {patch} must divide the image size {height}x{width} "
                            f"(e.g. model.options.patch=7 for 28x28, 4 or 8 for 32x32)")
        if dim % heads:
            raise UserError(f"vit_tiny: dim {dim} must be a multiple of heads {heads}")
        if not 0.0 <= float(dropout) < 1.0:
            raise UserError(f"vit_tiny option dropout must lie in [0, 1), got {dropout!r}")
        self.num_patches = (height // patch) * (width // patch)
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp, float(dropout)) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def parameter_role(name: str) -> str | None:
        """The role of prunable parameter ``name`` (one of :data:`ROLES`), None for other names."""
        if name == "patch_embed.weight":
            return ROLES[0]
        if name == "head.weight":
            return ROLES[4]
        if name.startswith("blocks."):
            if name.endswith(".attn.in_proj_weight"):
                return ROLES[1]
            if name.endswith(".attn.out_proj.weight"):
                return ROLES[2]
            if ".mlp." in name and name.endswith(".weight"):
                return ROLES[3]
        return None

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, patches, dim]
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))

