"""MaskedCrossAttention (SPEC.md section 2) and the LOCA heads built around it.

Every module takes batch-first tokens. Query views and their references follow the op's
convention (SPEC.md section 1): query rows are the V views concatenated view-major, so
query row i attends reference row i % Bk.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_features, shape_str
from .attention import masked_cross_attention

__all__ = ["MaskedCrossAttention", "CrossAttentionBlock", "PositionPredictor", "ClusteringHead", "RotationPredictor"]

# LayerNorm epsilon of LOCA's (flax) and timm's ViTs.
LAYER_NORM_EPS = 1e-6


def _check_attention_inputs(owner: str, x, context, dim: int, context_dim: int) -> None:
    """x (Bq, Nq, dim) and context (Bk, Nk, context_dim) with Bq a multiple of Bk, named as
    the module's arguments and checked before any projection (shapes only: no host sync)."""
    check_features(owner, "x", x, "Bq, Nq", dim)
    check_features(owner, "context", context, "Bk, Nk", context_dim, "context_dim")
    if x.shape[0] % context.shape[0]:
        raise ValueError(f"{owner}: x must hold V views of each of the Bk={context.shape[0]} references of "
                         f"context (Bq = V * Bk, view-major), got x of shape {shape_str(x)}")


def _warn_dropout_ignored(source: str, p: float) -> None:
    if p > 0:
        warnings.warn(f"MaskedCrossAttention.{source}: the source applies dropout p={p} in training; "
                      "MaskedCrossAttention has no dropout, so training outputs will differ "
                      "(evaluation outputs agree)", UserWarning, stacklevel=3)


class MaskedCrossAttention(nn.Module):
    """Multi-head cross-attention of query tokens to (a kept subset of) reference tokens.

    `q = x W_q`, `(k, v)` from one projection of `context`, attention by
    `loca_kernels.masked_cross_attention`, then an output projection. K and V are views of
    the single kv projection (no copies) and are never repeated per view.

    Args:
        dim: width of the query tokens and of the output.
        num_heads: number of heads; must divide `dim`.
        context_dim: width of the reference tokens (default `dim`).
        qkv_bias: bias in the q and kv projections.
        proj_bias: bias in the output projection.
        backend: passed to `masked_cross_attention` (None: fastest available).
        device, dtype: factory arguments of the parameters.

    Parameters (the names of a timm-style cross-attention, so state dicts load unchanged):
        q: Linear(dim, dim); kv: Linear(context_dim, 2 * dim), rows [k; v]; proj: Linear(dim, dim).
    `scale` (float attribute) multiplies q.k, default head_dim ** -0.5.

    Shapes of `forward(x, context, keep=None)`:
        x: (Bq, Nq, dim); context: (Bk, Nk, context_dim) with Bq = V * Bk (view-major);
        keep: as in `masked_cross_attention` (None, bool (R, Nk), int (R, Nkeep) or KeepRun,
        R in {1, Bk, Bq}). Returns (Bq, Nq, dim).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, context_dim: Optional[int] = None,
                 qkv_bias: bool = False, proj_bias: bool = True, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"MaskedCrossAttention: dim must be a positive multiple of num_heads, "
                             f"got dim={dim}, num_heads={num_heads}")
        context_dim = dim if context_dim is None else context_dim
        if context_dim <= 0:
            raise ValueError(f"MaskedCrossAttention: context_dim must be positive, got {context_dim}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.context_dim = dim, num_heads, context_dim
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **factory)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **factory)

    def forward(self, x: torch.Tensor, context: torch.Tensor, keep=None) -> torch.Tensor:
        _check_attention_inputs(type(self).__name__, x, context, self.dim, self.context_dim)
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim))                   # (Bq, Nq, H, D)
        kv = self.kv(context).unflatten(-1, (2, self.num_heads, self.head_dim))        # (Bk, Nk, 2, H, D)
        out = masked_cross_attention(q, kv[:, :, 0], kv[:, :, 1], keep, scale=self.scale,
                                     backend=self.backend)
        return self.proj(out.flatten(-2))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, context_dim={self.context_dim}, "
                f"scale={self.scale:.4g}, backend={self.backend!r}")

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, *,
                                 backend: Optional[str] = None) -> "MaskedCrossAttention":
        """A MaskedCrossAttention holding the weights of `mha` (batch_first or not).

        The result takes batch-first inputs; with V = 1, `y = new(x, context, keep)` equals
        `mha(x, context, context, key_padding_mask=~keep)[0]` (inputs transposed when
        `mha` is not batch_first). `mha` needs kdim == vdim (one kv projection), no
        add_bias_kv and no add_zero_attn. Its attention dropout is not carried over.
        """
        name = "from_multihead_attention"
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"MaskedCrossAttention.{name}: mha must be a torch.nn.MultiheadAttention, "
                            f"got {type(mha).__name__}")
        if mha.kdim != mha.vdim:
            raise ValueError(f"MaskedCrossAttention.{name}: keys and values must have one width "
                             f"(one kv projection), got kdim={mha.kdim}, vdim={mha.vdim}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"MaskedCrossAttention.{name}: add_bias_kv and add_zero_attn append "
                             "tokens to the keys; they are not supported")
        _warn_dropout_ignored(name, mha.dropout)
        dim = mha.embed_dim
        weight = mha.out_proj.weight
        attn = cls(dim, mha.num_heads, context_dim=mha.kdim, qkv_bias=mha.in_proj_bias is not None,
                   proj_bias=mha.out_proj.bias is not None, backend=backend,
                   device=weight.device, dtype=weight.dtype)
        if mha._qkv_same_embed_dim:
            w_q, w_k, w_v = mha.in_proj_weight.split(dim)
        else:
            w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        with torch.no_grad():
            attn.q.weight.copy_(w_q)
            attn.kv.weight.copy_(torch.cat([w_k, w_v]))
            if mha.in_proj_bias is not None:
                b_q, b_kv = mha.in_proj_bias.split([dim, 2 * dim])
                attn.q.bias.copy_(b_q)
                attn.kv.bias.copy_(b_kv)
            attn.proj.load_state_dict(mha.out_proj.state_dict())
        return attn

    @classmethod
    def from_timm(cls, module: nn.Module, *, backend: Optional[str] = None) -> "MaskedCrossAttention":
        """A MaskedCrossAttention holding the weights of a timm-style cross-attention.

        `module` has `q` (Linear dim -> dim), `kv` (Linear context_dim -> 2 * dim, output
        laid out as (2, num_heads, head_dim)), `proj` (Linear dim -> dim), `num_heads` and
        `scale`. Optional `q_norm` / `k_norm` must be identities; `attn_drop` / `proj_drop`
        dropout is not carried over.
        """
        name = "from_timm"
        for attr in ("q", "kv", "proj"):
            if not isinstance(getattr(module, attr, None), nn.Linear):
                raise TypeError(f"MaskedCrossAttention.{name}: module must have a Linear `{attr}`, "
                                f"got {type(getattr(module, attr, None)).__name__}")
        for attr in ("q_norm", "k_norm"):
            norm = getattr(module, attr, None)
            if norm is not None and not isinstance(norm, nn.Identity):
                raise ValueError(f"MaskedCrossAttention.{name}: module.{attr} is {type(norm).__name__}; "
                                 "query/key normalisation is not supported")
        for attr in ("attn_drop", "proj_drop"):
            drop = getattr(module, attr, None)
            _warn_dropout_ignored(name, getattr(drop, "p", 0.0))
        dim, context_dim = module.q.in_features, module.kv.in_features
        if module.q.out_features != dim or module.kv.out_features != 2 * dim:
            raise ValueError(f"MaskedCrossAttention.{name}: expected q: Linear({dim}, {dim}) and "
                             f"kv: Linear({context_dim}, {2 * dim}), got q out_features="
                             f"{module.q.out_features}, kv out_features={module.kv.out_features}")
        if (module.q.bias is None) != (module.kv.bias is None):
            raise ValueError(f"MaskedCrossAttention.{name}: q and kv must both have a bias or both not")
        weight = module.proj.weight
        attn = cls(dim, int(module.num_heads), context_dim=context_dim, qkv_bias=module.q.bias is not None,
                   proj_bias=module.proj.bias is not None, backend=backend,
                   device=weight.device, dtype=weight.dtype)
        attn.scale = float(module.scale)
        with torch.no_grad():
            for attr in ("q", "kv", "proj"):
                getattr(attn, attr).load_state_dict(getattr(module, attr).state_dict())
        return attn


class CrossAttentionBlock(nn.Module):
    """LOCA's pre-norm cross-attention block: query tokens attend the reference tokens.

        y = x + attn(norm_q(x), norm_context(context), keep)
        out = y + mlp(norm_mlp(y)),   mlp = Linear(dim, mlp_ratio * dim), GELU, Linear(.., dim)

    Args:
        dim, num_heads, context_dim, backend: as in MaskedCrossAttention.
        mlp_ratio: hidden width of the MLP in units of `dim` (LOCA: 4).
        qkv_bias: bias in the q and kv projections (LOCA: True).
        device, dtype: factory arguments of the parameters.

    Shapes of `forward(x, context, keep=None)`: x (Bq, Nq, dim), context (Bk, Nk, context_dim),
    Bq = V * Bk (view-major); keep as in `masked_cross_attention`. Returns (Bq, Nq, dim).
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: Optional[int] = None,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        context_dim = dim if context_dim is None else context_dim
        hidden = int(dim * mlp_ratio)
        self.norm_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS, **factory)
        self.norm_context = nn.LayerNorm(context_dim, eps=LAYER_NORM_EPS, **factory)
        self.attn = MaskedCrossAttention(dim, num_heads, context_dim=context_dim, qkv_bias=qkv_bias,
                                         backend=backend, **factory)
        self.norm_mlp = nn.LayerNorm(dim, eps=LAYER_NORM_EPS, **factory)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, **factory), nn.GELU(),
                                 nn.Linear(hidden, dim, **factory))

    def forward(self, x: torch.Tensor, context: torch.Tensor, keep=None) -> torch.Tensor:
        _check_attention_inputs(type(self).__name__, x, context, self.attn.dim, self.attn.context_dim)
        x = x + self.attn(self.norm_q(x), self.norm_context(context), keep)
        return x + self.mlp(self.norm_mlp(x))


class PositionPredictor(nn.Module):
    """LOCA's position head: LayerNorm, then Linear to one logit per reference patch.

    `forward(x)`: x (..., dim) -> logits (..., num_positions) (LOCA: 196 = 14 x 14).
    """

    def __init__(self, dim: int, num_positions: int = 196, *, device=None, dtype=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS, device=device, dtype=dtype)
        self.linear = nn.Linear(dim, num_positions, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features(type(self).__name__, "x", x, "...", self.norm.normalized_shape[0])
        return self.linear(self.norm(x))


class ClusteringHead(nn.Module):
    """LOCA's patch-clustering head: an MLP to an L2-normalised embedding, then cosine
    logits against weight-normalised prototypes.

        z = normalize(Linear(GELU(Linear(...GELU(Linear(x))))))     (num_layers hidden layers)
        logits = z @ normalize(prototypes).T                           (no bias)

    Each prototype (a row of `prototypes.weight`, (num_prototypes, bottleneck_dim)) is
    divided by its norm on every call: unit norm with no learned gain, as in LOCA.

    Args:
        dim: input width. num_prototypes: K (LOCA: 4096). hidden_dim: MLP width (2048).
        bottleneck_dim: embedding width (256). num_layers: hidden layers (2).

    `forward(x)`: x (..., dim) -> logits (..., num_prototypes), each in [-1, 1].
    """

    def __init__(self, dim: int, num_prototypes: int = 4096, *, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 2, device=None, dtype=None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ClusteringHead: num_layers must be >= 1, got {num_layers}")
        factory = {"device": device, "dtype": dtype}
        layers = []
        for i in range(num_layers):
            layers += [nn.Linear(dim if i == 0 else hidden_dim, hidden_dim, **factory), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim, **factory))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Linear(bottleneck_dim, num_prototypes, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features(type(self).__name__, "x", x, "...", self.mlp[0].in_features)
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes.weight, dim=-1))


class RotationPredictor(nn.Sequential):
    """GTSA's quarter-turn classifier: the mean of a view's patch tokens, then
    Linear + LayerNorm + GELU twice, Linear + LayerNorm to a bottleneck, and Linear to 4 logits
    (turns 0, 90, 180, 270 degrees: torch.rot90's k).

    The layers are numbered as GTSA's `rot_predictor` nn.Sequential (model_pretrain/gtsa.py), with
    its LayerNorm epsilon (PyTorch's default 1e-5), so its state_dict loads as is.

    `forward(tokens)`: tokens (..., N, dim) -> logits (..., 4).
    """

    def __init__(self, dim: int, hidden_dim: int = 768, bottleneck_dim: int = 128, *, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Linear(dim, hidden_dim, **factory), nn.LayerNorm(hidden_dim, **factory), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim, **factory), nn.LayerNorm(hidden_dim, **factory), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim, **factory), nn.LayerNorm(bottleneck_dim, **factory),
            nn.Linear(bottleneck_dim, 4, **factory))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_features(type(self).__name__, "tokens", tokens, "..., N", self[0].in_features)
        return super().forward(tokens.mean(dim=-2))
