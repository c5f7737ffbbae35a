"""Replace the cross-attention of an existing ViT decoder block with MaskedCrossAttention.

`DecoderBlock` below stands for the block of your codebase: a timm-style cross-attention
(`q`, `kv`, `proj` linears) between pre-norm residual branches. Swapping in
MaskedCrossAttention keeps its weights and outputs; one changed line in the forward then
lets many query views attend one shared reference through a kept subset of its tokens
(LOCA's 20% consecutive run) without copying K and V per view.

Runs on the CPU:  python examples/vit_decoder_cross_attention.py
"""
import torch
from torch import nn

import loca_kernels as lk


class CrossAttention(nn.Module):
    """A timm-style cross-attention, as found in existing ViT decoders."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, context):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(context).reshape(b, -1, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class DecoderBlock(nn.Module):
    """The existing block: cross-attention and MLP, each in a pre-norm residual branch."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, context):
        x = x + self.cross_attn(self.norm1(x), context)
        return x + self.mlp(self.norm2(x))


class MaskedDecoderBlock(DecoderBlock):
    """The same block with MaskedCrossAttention: one new line in __init__, one in forward."""

    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.cross_attn = lk.MaskedCrossAttention(dim, num_heads, qkv_bias=True)

    def forward(self, x, context, keep=None):
        x = x + self.cross_attn(self.norm1(x), context, keep)
        return x + self.mlp(self.norm2(x))


def main():
    torch.manual_seed(0)
    dim, heads, batch, views = 64, 4, 2, 3
    block = DecoderBlock(dim, heads).eval()
    x, reference = torch.randn(batch, 36, dim), torch.randn(batch, 196, dim)

    # 1. In place, with the same call: the outputs do not change.
    expected = block(x, reference)
    block.cross_attn = lk.MaskedCrossAttention.from_timm(block.cross_attn)
    torch.testing.assert_close(block(x, reference), expected, atol=1e-5, rtol=1e-4)

    # 2. A trained block's checkpoint loads unchanged into the masked block (same names).
    masked = MaskedDecoderBlock(dim, heads).eval()
    masked.load_state_dict(block.state_dict())
    torch.testing.assert_close(masked(x, reference), expected, atol=1e-5, rtol=1e-4)

    # 3. LOCA: `views` query views per reference, concatenated view-major, each seeing only
    #    39 consecutive reference tokens (one random run shared by the whole batch).
    queries = torch.randn(views * batch, 36, dim)
    keep = lk.consecutive_keep(1, 196, 39, as_run=True)
    out = masked(queries, reference, keep)
    print(f"{views} views x {batch} references: {tuple(out.shape)}, "
          f"reference tokens visible: {keep.length} of 196")


if __name__ == "__main__":
    main()
