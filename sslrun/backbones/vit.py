"""Vision Transformers (Dosovitskiy et al., 2021) in plain torch, with MoCo v3's choices as options:
a fixed 2-D sin-cos position embedding and a frozen random patch projection (Chen et al., 2021, sec. 5).

The forward returns the CLS token after the final LayerNorm (``feat_dim`` = ``embed_dim``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon, which MoCo v3 and DINO use
LEARNED_POS_STD = 0.02  # timm's init of a learned position embedding
CLS_INIT_STD = 1e-6  # MoCo v3's init of the CLS token
SINCOS_TEMPERATURE = 10000.0  # the Transformer's base wavelength


def sincos_pos_embed_2d(h: int, w: int, dim: int, temperature: float = SINCOS_TEMPERATURE) -> torch.Tensor:
    """[h*w, dim] fixed embedding of an h x w token grid in raster order (token ``r*w + c`` at row r,
    column c): ``[sin(r*o), cos(r*o), sin(c*o), cos(c*o)]`` with ``o_i = temperature^(-i/(dim/4))``,
    i < dim/4. On square grids this is MoCo v3's ``build_2d_sincos_position_embedding`` value for value.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    omega = temperature ** (-torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    r, c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, heads, tokens, head_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(*self._qkv(x))
        return self.proj(out.transpose(1, 2).flatten(2))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the CLS query (token 0) over all tokens, [B, heads, tokens]: what
        ``forward`` computes inside its fused kernel, made explicit for visualisation."""
        q, k, _ = self._qkv(x)
        return torch.softmax(q[:, :, :1] @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)[:, :, 0]


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a CLS token. ``pos_embed``: ``sincos`` (fixed, MoCo v3) or ``learned``.

    ``frozen_patch_embed`` is MoCo v3's random patch projection: the patch projection keeps its random
    init and gets no gradient, which the paper found removes the training instability that shows up
    first in that layer's gradients.
    Inputs of another size than ``image_size`` (multi-crop's small crops) get a position embedding for
    their own grid: computed for sin-cos, bicubically resized for a learned one (as DINO does).
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, embed_dim: int = 192,
                 depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0, pos_embed: str = "sincos",
                 frozen_patch_embed: bool = False) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}; "
                             "pick a patch size that divides the image size (4 at 28 or 32 px, 16 at 224 px)")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed={pos_embed!r} is not a valid choice; use one of: sincos, learned")
        self.patch_size = patch_size  # crop sizes must be multiples (Method.check_setup)
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed_kind = pos_embed
        if pos_embed == "sincos":
            # The CLS token's position embedding is zero, as in MoCo v3.
            table = torch.cat([torch.zeros(1, embed_dim), sincos_pos_embed_2d(self.grid, self.grid, embed_dim)])
            self.register_buffer("pos_embed", table.unsqueeze(0))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=LEARNED_POS_STD)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.feat_dim = embed_dim
        self.num_heads = num_heads
        self._init_weights(in_channels * patch_size ** 2, embed_dim)
        if frozen_patch_embed:
            self.patch_embed.requires_grad_(False)
        # The gradient monitors need a trainable first layer: with the patch projection frozen, the
        # first block is the earliest layer whose gradient can spike.
        self.first_layer = "blocks.0" if frozen_patch_embed else "patch_embed"
        self.last_layer = f"blocks.{depth - 1}"

    def _init_weights(self, patch_numel: int, dim: int) -> None:
        """MoCo v3's init: xavier-uniform linears with q, k, v treated as three matrices, zero biases,
        and a xavier-uniform patch projection over the flattened patch."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("qkv"):
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=CLS_INIT_STD)
        bound = math.sqrt(6.0 / (patch_numel + dim))
        nn.init.uniform_(self.patch_embed.weight, -bound, bound)
        nn.init.zeros_(self.patch_embed.bias)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """[1, 1 + h*w, dim] position embedding (CLS first) for an h x w token grid."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls, table = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        if self.pos_embed_kind == "sincos":
            patches = sincos_pos_embed_2d(h, w, self.feat_dim).to(table).unsqueeze(0)
        else:
            grid = table.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            patches = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            patches = patches.flatten(2).transpose(1, 2)
        return torch.cat([cls, patches], dim=1)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """CLS + patch tokens with position embedding, [B, 1 + patches, dim]."""
        x = self.patch_embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self._pos_embed(h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])  # LayerNorm is per token: normalising the CLS token alone is the same

    @torch.no_grad()
    def last_attention(self, x: torch.Tensor, include_cls: bool = False) -> torch.Tensor:
        """The last block's CLS self-attention per head: [B, heads, patches] over the patch tokens in
        raster order (DINO's attention maps; the CLS token's weight on itself is dropped, so a row sums
        to 1 minus it), or [B, heads, 1 + patches] with that weight first when ``include_cls``."""
        x = self._tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        attn = last.attn.cls_attention(last.norm1(x))
        return attn if include_cls else attn[:, :, 1:]


def vit_tiny(**kwargs) -> VisionTransformer:
    """ViT-Tiny (DeiT): dim 192, 12 blocks, 3 heads."""
    return VisionTransformer(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


def vit_small(**kwargs) -> VisionTransformer:
    """ViT-Small (DeiT): dim 384, 12 blocks, 6 heads."""
    return VisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})
