"""The trainer's networks: the ViT encoder every objective shares (no class token), the EMA
teacher, and each objective's student network (encoder + that objective's heads).

- LocaNet: a clustering head, and the query branch (one cross-attention block to the reference
  tokens, then the position predictor). The student runs everything on the query views; the
  EMA teacher, a copy of the same network, encodes the reference view and gives its tokens (the
  cross-attention's keys and values) and its prototype scores (the Sinkhorn targets).
- DenseCLNet: a global and a dense projection head (DenseCL's neck).
- GTSANet: GTSA's conv projector and predictor, and the rotation predictor.
- MMCNet: a mask token, a pixel decoder, a distillation head and a contrast head.
Each objective's module (objectives/) says where its network's choices come from.
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from loca_kernels.modules import (LAYER_NORM_EPS, ClusteringHead, CrossAttentionBlock, PositionPredictor,
                                  RotationPredictor)

from .config import Config


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `rate` in training."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.rate
        return x * keep.to(x.dtype) / (1 - self.rate)


class EncoderBlock(nn.Module):
    """Pre-norm self-attention + MLP block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, LAYER_NORM_EPS), nn.LayerNorm(dim, LAYER_NORM_EPS)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.drop_path(self.proj(attn))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Encoder(nn.Module):
    """ViT encoder over a patch grid; positional embeddings are learnt at the reference grid and
    resized (bilinear, antialiased) for other view sizes, as in the official LOCA code."""

    def __init__(self, cfg: Config):
        super().__init__()
        dim, grid = cfg.embed_dim, cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, grid, grid) * dim ** -0.5)
        rates = [cfg.stochastic_depth * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(EncoderBlock(dim, cfg.num_heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim, LAYER_NORM_EPS)

    def forward(self, images: torch.Tensor, kept: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, mask_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images (B, 3, H, W) -> tokens (B, N, dim) in raster order; with kept (B, n) int64,
        only those token positions are encoded (dropped before the first block); with mask
        (B, N) bool, the patch embeddings there are replaced by mask_token (dim,) before the
        positions are added (SimMIM's masking)."""
        x = self.patch_embed(images)
        if mask is not None:
            grid = mask.view(mask.shape[0], 1, *x.shape[-2:])
            x = torch.where(grid, mask_token.view(1, -1, 1, 1).to(x.dtype), x)
        x = (x + resize_pos_embed(self.pos_embed, x.shape[-2:])).flatten(2).transpose(1, 2)
        if kept is not None:
            x = x.gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def resize_pos_embed(pos: torch.Tensor, grid) -> torch.Tensor:
    """Positional embeddings (1, dim, h, w) at another grid (h', w'): bilinear, antialiased."""
    if tuple(pos.shape[-2:]) == tuple(grid):
        return pos
    return F.interpolate(pos, size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)


class QueryOutputs(NamedTuple):
    """Student outputs for the first query (B rows) and the focal queries (V_f * B rows)."""

    position_logits: torch.Tensor       # (B, n0, R) and below (V_f * B, nf, R): R reference patches
    focal_position_logits: torch.Tensor
    cluster_logits: torch.Tensor        # (B, n0, K) prototype logits
    focal_cluster_logits: torch.Tensor


class LocaNet(nn.Module):
    """Encoder + clustering head + cross-attention block + position predictor."""

    def __init__(self, cfg: Config):
        super().__init__()
        ref_grid = cfg.image_size // cfg.patch_size
        self.encoder = Encoder(cfg)
        self.cluster_head = ClusteringHead(cfg.embed_dim, cfg.num_prototypes,
                                           hidden_dim=cfg.head_hidden_dim,
                                           bottleneck_dim=cfg.head_bottleneck_dim)
        self.cross_block = CrossAttentionBlock(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                                               backend=cfg.backend)
        self.position_head = PositionPredictor(cfg.embed_dim, ref_grid * ref_grid)
        if cfg.init == "xavier":
            init_official(self)
        else:
            self.apply(init_weights)

    def reference(self, images: torch.Tensor):
        """Teacher side: reference tokens (B, R, dim) and their prototype logits (B, R, K)."""
        tokens = self.encoder(images)
        return tokens, self.cluster_head(tokens)

    def forward(self, query: torch.Tensor, query_kept: torch.Tensor, focal: torch.Tensor,
                ref_tokens: torch.Tensor, ref_keep) -> QueryOutputs:
        """Student side: the first query (B, 3, H, W) encoded at its kept tokens, the focal
        queries (V_f * B, 3, h, w) whole; both attend the visible reference tokens."""
        tokens = self.encoder(query, query_kept)
        focal_tokens = self.encoder(focal)
        return QueryOutputs(
            self.position_head(self.cross_block(tokens, ref_tokens, ref_keep)),
            self.position_head(self.cross_block(focal_tokens, ref_tokens, ref_keep)),
            self.cluster_head(tokens),
            self.cluster_head(focal_tokens),
        )


def ema_teacher(student: nn.Module, cfg: Config, parts: Optional[Tuple[str, ...]] = None) -> nn.Module:
    """The EMA teacher: a frozen copy of the student's child modules `parts` (None: all of them;
    the others are left out, so the teacher's state_dict has the student's keys of those parts),
    in training mode for teacher_mode "train" (as the official trainer applies it with
    train=True: stochastic depth active), else eval."""
    teacher = copy.deepcopy(student)
    if parts is not None:
        own = [name for name, _ in student.named_children()]
        for name in own + [name for name, _ in student.named_parameters(recurse=False)]:
            if name not in parts:
                delattr(teacher, name)
    return teacher.requires_grad_(False).train(cfg.teacher_mode == "train")


def _xavier_blocks(linear: nn.Linear, blocks: int, bias_std: float = 0.0) -> None:
    """xavier_uniform on each of `blocks` equal row blocks of the weight (a fused q/k/v or k/v
    projection holds one flax Dense per block); bias N(0, bias_std) (zeros for 0)."""
    for part in linear.weight.data.chunk(blocks, dim=0):
        nn.init.xavier_uniform_(part)
    if linear.bias is not None:
        nn.init.normal_(linear.bias, std=bias_std)


def _lecun_normal(weight: torch.Tensor) -> None:
    """flax's default kernel init: truncated normal (at 2 std) of variance 1 / fan_in."""
    fan_in = weight[0].numel()
    std = (1 / fan_in) ** 0.5 / 0.87962566103423978   # std of a unit normal truncated at 2
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def init_official(net: "LocaNet") -> None:
    """The official LOCA initialisation (scenic vit.py; flax defaults elsewhere): xavier_uniform
    for the attention projections (one matrix per q, k, v and output, zero biases) and the MLP
    layers of the encoder and cross-attention blocks (biases N(0, 1e-6)); lecun_normal with zero
    biases for the patch embedding, clustering head and position predictor."""
    mlps = [block.mlp for block in net.encoder.blocks] + [net.cross_block.mlp]
    for block in net.encoder.blocks:
        _xavier_blocks(block.qkv, 3)
        _xavier_blocks(block.proj, 1)
    attn = net.cross_block.attn
    _xavier_blocks(attn.q, 1)
    _xavier_blocks(attn.kv, 2)
    _xavier_blocks(attn.proj, 1)
    for mlp in mlps:
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                _xavier_blocks(layer, 1, bias_std=1e-6)
    done = {id(m) for block in net.encoder.blocks for m in (block.qkv, block.proj)}
    done |= {id(m) for m in (attn.q, attn.kv, attn.proj)} | {id(m) for mlp in mlps for m in mlp}
    for module in net.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and id(module) not in done:
            _lecun_normal(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def init_weights(module: nn.Module) -> None:
    """truncated N(0, 0.02) dense weights, zero biases (`net.apply(init_weights)`)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# DenseCL's neck.
def _mlp(dim: int, out: int) -> nn.Sequential:
    # DenseCLNeck: hidden width = input width (2048 for C5), ReLU between.
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


class DenseCLNet(nn.Module):
    """Encoder + global head + dense head. forward(views) -> (patch tokens (B, N, dim), global
    projections (B, D), dense projections (B, N, D)); the teacher runs the same forward."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.global_head = _mlp(cfg.embed_dim, cfg.projection_dim)
        self.dense_head = _mlp(cfg.embed_dim, cfg.projection_dim)
        self.apply(init_weights)

    def forward(self, views: torch.Tensor):
        tokens = self.encoder(views)
        return tokens, self.global_head(tokens.mean(dim=1)), self.dense_head(tokens)


# GTSA's heads.
class _ChannelNorm(nn.Module):
    """LayerNorm over the channels of (N, C, h, w), without affine parameters (GTSA's
    TransposeLast + LayerNorm(elementwise_affine=False) + TransposeLast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), x.shape[1:2]).movedim(-1, 1)


class ConvHead(nn.Module):
    """GTSA's Projector (residual=True, 2 blocks) and Predictor (residual=False, 1 block):
    blocks of 3x3 conv, channel LayerNorm, GELU, then a 1x1 conv to `out`. Conv weights
    N(0, 0.02), zero biases, as GTSA initialises them."""

    def __init__(self, dim: int, hidden: int, out: int, blocks: int, residual: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim if i == 0 else hidden, hidden, 3, padding=1), _ChannelNorm(), nn.GELU())
            for i in range(blocks))
        self.proj = nn.Conv2d(hidden, out, 1)
        self.residual = residual
        for conv in [block[0] for block in self.blocks] + [self.proj]:
            nn.init.normal_(conv.weight, std=0.02)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            y = block(x)
            x = x + y if self.residual and y.shape == x.shape else y
        return self.proj(x)


def _grid(tokens: torch.Tensor) -> torch.Tensor:
    """(N, h * w, C) raster-order tokens of a square grid -> (N, C, h, w)."""
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).unflatten(2, (side, side))


class GTSANet(nn.Module):
    """Encoder, projector, predictor and rotation predictor.

    forward(global_views (2B, 3, S, S), local_views (L B, 3, s, s)) -> (global maps (2B, D, g, g)
    and local maps (L B, D, l, l) after projector and predictor, rotation logits ((2 + L) B, 4)).
    target_maps(global_views) -> the projector's maps (2B, D, g, g): the teacher's side."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.projector = ConvHead(cfg.embed_dim, cfg.embed_dim, cfg.projection_dim, blocks=2, residual=True)
        self.predictor = ConvHead(cfg.projection_dim, cfg.projection_dim, cfg.projection_dim, blocks=1,
                                  residual=False)
        self.rotation_head = RotationPredictor(cfg.embed_dim, hidden_dim=cfg.head_hidden_dim,
                                               bottleneck_dim=cfg.head_bottleneck_dim)
        self.encoder.apply(init_weights)
        self.rotation_head.apply(init_weights)

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor):
        global_tokens, local_tokens = self.encoder(global_views), self.encoder(local_views)
        rotation = torch.cat([self.rotation_head(global_tokens), self.rotation_head(local_tokens)])
        return (self.predictor(self.projector(_grid(global_tokens))),
                self.predictor(self.projector(_grid(local_tokens))), rotation)

    def target_maps(self, global_views: torch.Tensor) -> torch.Tensor:
        return self.projector(_grid(self.encoder(global_views)))


# MMC's heads.
class MMCNet(nn.Module):
    """Encoder, mask token, pixel decoder, distillation head and contrast head.

    forward(global_views (2B, 3, S, S), masks (2B, N), local_views (L B, 3, s, s)) ->
    (predicted pixels (2B, N, 3 p^2), distillation logits ((2 + L) B, K), contrast queries (2B, D)).
    targets(global_views) -> (distillation logits (2B, K), contrast keys (2B, D)): the teacher's side.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        dim = cfg.embed_dim
        self.encoder = Encoder(cfg)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.decoder = nn.Linear(dim, 3 * cfg.patch_size ** 2)    # SimMIM's one-layer prediction head
        self.distill_head = ClusteringHead(dim, cfg.num_prototypes, hidden_dim=cfg.head_hidden_dim,
                                           bottleneck_dim=cfg.head_bottleneck_dim)
        # MoCo v2's projection: fc-ReLU-fc.
        self.contrast_head = nn.Sequential(nn.Linear(dim, cfg.head_hidden_dim), nn.ReLU(),
                                           nn.Linear(cfg.head_hidden_dim, cfg.projection_dim))
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, global_views: torch.Tensor, masks: torch.Tensor, local_views: torch.Tensor):
        global_tokens = self.encoder(global_views, mask=masks, mask_token=self.mask_token)
        pooled = global_tokens.mean(dim=1)
        logits = self.distill_head(torch.cat([pooled, self.encoder(local_views).mean(dim=1)]))
        return self.decoder(global_tokens), logits, self.contrast_head(pooled)

    def targets(self, global_views: torch.Tensor):
        pooled = self.encoder(global_views).mean(dim=1)
        return self.distill_head(pooled), self.contrast_head(pooled)
