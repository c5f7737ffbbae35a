"""MaskedCrossAttention and the LOCA heads (loca_kernels/modules.py) against plain PyTorch:
weight import from nn.MultiheadAttention and a timm-style cross-attention, outputs and
gradients of every module, torch.compile(fullgraph=True) without graph breaks, autocast."""
import pathlib
import runpy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loca_kernels
from loca_kernels import ClusteringHead, CrossAttentionBlock, KeepRun, MaskedCrossAttention, PositionPredictor
from helpers import assert_close, backend_params

# Every backend that can run masked_cross_attention on CPU tensors here. Fused backends are
# run in float32 (the Triton interpreter supports no float64); "torch" in float64.
BACKENDS = [pytest.param(p.values[0], torch.float64 if p.values[0] == "torch" else torch.float32, marks=p.marks,
                         id=p.id) for p in backend_params("attention_forward") if p.values[1] == "cpu"]
DIM, HEADS, CONTEXT_DIM = 32, 2, 24          # head dim 16: a size every fused backend supports


def _reference_attention(q, k, v, mask, scale):
    """Plain masked attention: q (Bq, Nq, H, D), k and v (Bk, Nk, H, D) repeated per view,
    mask (Bq, Nk) True = visible (every row sees a token)."""
    rows = torch.arange(q.shape[0]) % k.shape[0]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k[rows].transpose(1, 2), v[rows].transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=scale)
    return out.transpose(1, 2)


def _reference_masked_cross_attention(p, prefix, x, context, mask, heads, scale):
    """MaskedCrossAttention written with F.linear and SDPA on the parameters `p`."""
    q = F.linear(x, p[prefix + "q.weight"], p.get(prefix + "q.bias")).unflatten(-1, (heads, -1))
    k, v = F.linear(context, p[prefix + "kv.weight"], p.get(prefix + "kv.bias")).chunk(2, dim=-1)
    out = _reference_attention(q, k.unflatten(-1, (heads, -1)), v.unflatten(-1, (heads, -1)), mask, scale)
    return F.linear(out.flatten(-2), p[prefix + "proj.weight"], p.get(prefix + "proj.bias"))


def _check_module(module, reference, inputs, dtype, seed=0):
    """Outputs and gradients (inputs and parameters) of `module(*inputs)` against
    `reference(params, *inputs)` computed in float64 on copies."""
    params = {n: p.detach().double().requires_grad_() for n, p in module.named_parameters()}
    ref_inputs = [x.detach().double().requires_grad_() if torch.is_tensor(x) and x.is_floating_point() else x
                  for x in inputs]
    out = module(*inputs)
    expected = reference(params, *ref_inputs)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    for i, (x, ref_x) in enumerate(zip(inputs, ref_inputs)):
        if torch.is_tensor(x) and x.requires_grad:
            assert_close(x.grad, ref_x.grad, dtype, name=f"grad of input {i}")
    for name, p in module.named_parameters():
        assert_close(p.grad, params[name].grad, dtype, name=f"grad of {name}")


def _inputs(views, bk, nq, nk, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(views * bk, nq, DIM, generator=g, dtype=dtype, requires_grad=True)
    context = torch.randn(bk, nk, CONTEXT_DIM, generator=g, dtype=dtype, requires_grad=True)
    return x, context


def _keeps(views, bk, nk):
    """Each keep form with R in {1, Bk, Bq}; every query row sees at least one token."""
    g = torch.Generator().manual_seed(1)
    bool_keep = torch.rand(views * bk, nk, generator=g) < 0.5
    bool_keep[:, 2] = True
    index_keep = loca_kernels.random_keep(bk, nk, 3, generator=g)
    return {"none": None, "bool-per-row": bool_keep, "index-per-reference": index_keep,
            "run-shared": KeepRun(torch.tensor([nk - 4]), 4)}


def _mask(keep, rows, nk):
    return loca_kernels.keep_to_mask(keep, rows, nk, torch.device("cpu"))


# ---------------------------------------------------------------- weight import


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim,bias", [(None, True), (CONTEXT_DIM, True), (CONTEXT_DIM, False)])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_from_multihead_attention_matches_multihead_attention(batch_first, kdim, bias, backend, dtype):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias,
                                dtype=dtype).eval()
    attn = MaskedCrossAttention.from_multihead_attention(mha, backend=backend)
    context_dim = kdim or DIM
    x, context = torch.randn(3, 5, DIM, dtype=dtype), torch.randn(3, 9, context_dim, dtype=dtype)
    keep = torch.rand(3, 9) < 0.5
    keep[:, 4] = True
    for k in (keep, None):
        got = attn(x, context, k)
        padding = None if k is None else ~k
        if batch_first:
            expected = mha(x, context, context, key_padding_mask=padding, need_weights=False)[0]
        else:
            expected = mha(x.transpose(0, 1), context.transpose(0, 1), context.transpose(0, 1),
                           key_padding_mask=padding, need_weights=False)[0].transpose(0, 1)
        assert_close(got, expected, dtype)


class TimmStyleCrossAttention(nn.Module):
    """The layout of timm-style cross-attention modules: q, kv (k and v stacked), proj."""

    def __init__(self, dim, num_heads, context_dim, qkv_bias, scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, mask=None):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn.masked_fill(~mask[:, None, None, :], float("-inf"))
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("qkv_bias,scale", [(True, None), (False, 0.37)])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_from_timm_matches_timm_style_cross_attention(qkv_bias, scale, backend, dtype):
    torch.manual_seed(0)
    timm_attn = TimmStyleCrossAttention(DIM, HEADS, CONTEXT_DIM, qkv_bias, scale).to(dtype)
    attn = MaskedCrossAttention.from_timm(timm_attn, backend=backend)
    assert attn.scale == timm_attn.scale
    x, context = torch.randn(2, 6, DIM, dtype=dtype), torch.randn(2, 7, CONTEXT_DIM, dtype=dtype)
    keep = torch.tensor([[True, False, True, False, False, True, True], [False] * 6 + [True]])
    assert_close(attn(x, context, keep), timm_attn(x, context, keep), dtype)
    # Same parameter names: checkpoints of the timm-style module load unchanged.
    fresh = MaskedCrossAttention(DIM, HEADS, context_dim=CONTEXT_DIM, qkv_bias=qkv_bias, backend=backend,
                                 dtype=dtype)
    fresh.load_state_dict(timm_attn.state_dict(), strict=False)
    assert set(fresh.state_dict()) == set(timm_attn.state_dict())
    fresh.scale = attn.scale
    assert_close(fresh(x, context, keep), attn(x, context, keep), dtype)


def test_weight_import_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="from_multihead_attention: keys and values must have one width"):
        MaskedCrossAttention.from_multihead_attention(nn.MultiheadAttention(DIM, HEADS, kdim=8, vdim=16))
    with pytest.raises(ValueError, match="add_bias_kv and add_zero_attn"):
        MaskedCrossAttention.from_multihead_attention(nn.MultiheadAttention(DIM, HEADS, add_bias_kv=True))
    with pytest.raises(TypeError, match="mha must be a torch.nn.MultiheadAttention, got Linear"):
        MaskedCrossAttention.from_multihead_attention(nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="dropout p=0.1"):
        MaskedCrossAttention.from_multihead_attention(nn.MultiheadAttention(DIM, HEADS, dropout=0.1))
    timm_attn = TimmStyleCrossAttention(DIM, HEADS, CONTEXT_DIM, True)
    timm_attn.q_norm = nn.LayerNorm(DIM // HEADS)
    with pytest.raises(ValueError, match="from_timm: module.q_norm is LayerNorm"):
        MaskedCrossAttention.from_timm(timm_attn)
    with pytest.raises(TypeError, match="from_timm: module must have a Linear `q`, got NoneType"):
        MaskedCrossAttention.from_timm(nn.MultiheadAttention(DIM, HEADS))
    with pytest.raises(ValueError, match="dim must be a positive multiple of num_heads, got dim=30"):
        MaskedCrossAttention(30, 4)


# ---------------------------------------------------------------- input checks

BAD_INPUTS = [  # (module, inputs, error, message): x (B, N, 32), context (B, N, 24)
    ("MaskedCrossAttention", ((2, 5, 20), (2, 6, 24)), ValueError,
     r"MaskedCrossAttention: x must be \(Bq, Nq, 32\) \(dim=32\), got shape \(2, 5, 20\)"),
    ("MaskedCrossAttention", ((10, 32), (2, 6, 24)), ValueError,
     r"MaskedCrossAttention: x must be \(Bq, Nq, 32\) \(dim=32\), got shape \(10, 32\)"),
    ("MaskedCrossAttention", ((2, 5, 32), (2, 6, 32)), ValueError,
     r"MaskedCrossAttention: context must be \(Bk, Nk, 24\) \(context_dim=24\), got shape \(2, 6, 32\)"),
    ("MaskedCrossAttention", ((2, 5, 32), (6, 24)), ValueError,
     r"MaskedCrossAttention: context must be \(Bk, Nk, 24\) \(context_dim=24\), got shape \(6, 24\)"),
    ("MaskedCrossAttention", ((3, 5, 32), (2, 6, 24)), ValueError,
     r"MaskedCrossAttention: x must hold V views of each of the Bk=2 references of context \(Bq = V \* Bk, "
     r"view-major\), got x of shape \(3, 5, 32\)"),
    ("MaskedCrossAttention", ((torch.int64, (2, 5, 32)), (2, 6, 24)), TypeError,
     "MaskedCrossAttention: x must be a floating-point tensor, got torch.int64"),
    ("MaskedCrossAttention", ("x", (2, 6, 24)), TypeError, "MaskedCrossAttention: x must be a torch.Tensor, got str"),
    ("CrossAttentionBlock", ((2, 5, 20), (2, 6, 24)), ValueError,
     r"CrossAttentionBlock: x must be \(Bq, Nq, 32\) \(dim=32\), got shape \(2, 5, 20\)"),
    ("CrossAttentionBlock", ((2, 5, 32), (2, 6, 32)), ValueError,
     r"CrossAttentionBlock: context must be \(Bk, Nk, 24\) \(context_dim=24\), got shape \(2, 6, 32\)"),
    ("CrossAttentionBlock", ((4, 5, 32), (3, 6, 24)), ValueError, r"CrossAttentionBlock: x must hold V views .*Bk=3"),
    ("PositionPredictor", ((2, 5, 24),), ValueError,
     r"PositionPredictor: x must be \(\.\.\., 32\) \(dim=32\), got shape \(2, 5, 24\)"),
    ("PositionPredictor", ((),), ValueError, r"PositionPredictor: x must be \(\.\.\., 32\) \(dim=32\), got shape \(\)"),
    ("ClusteringHead", ((7, 31),), ValueError,
     r"ClusteringHead: x must be \(\.\.\., 32\) \(dim=32\), got shape \(7, 31\)"),
    ("RotationPredictor", ((2, 5, 24),), ValueError,
     r"RotationPredictor: tokens must be \(\.\.\., N, 32\) \(dim=32\), got shape \(2, 5, 24\)"),
    ("RotationPredictor", ((32,),), ValueError,
     r"RotationPredictor: tokens must be \(\.\.\., N, 32\) \(dim=32\), got shape \(32\)"),
    ("PatchCorrespondenceLoss", ((2, 5, 8), (3, 5, 8)), ValueError,
     r"PatchCorrespondenceLoss: teacher must be \(B, Nt, C\) with the student's B=2 and C=8, got shape \(3, 5, 8\)"),
    ("PatchCorrespondenceLoss", ((2, 5, 8), (2, 5, 7)), ValueError,
     r"PatchCorrespondenceLoss: teacher must be \(B, Nt, C\) with the student's B=2 and C=8, got shape \(2, 5, 7\)"),
    ("PatchCorrespondenceLoss", ((2, 5, 8), (torch.float64, (2, 5, 8))), TypeError,
     "PatchCorrespondenceLoss: teacher must have the student's dtype torch.float32, got torch.float64"),
]


def _bad_input_module(name):
    return {"MaskedCrossAttention": lambda: MaskedCrossAttention(DIM, HEADS, context_dim=CONTEXT_DIM),
            "CrossAttentionBlock": lambda: CrossAttentionBlock(DIM, HEADS, context_dim=CONTEXT_DIM),
            "PositionPredictor": lambda: PositionPredictor(DIM, 36),
            "ClusteringHead": lambda: ClusteringHead(DIM, 16, hidden_dim=32, bottleneck_dim=8),
            "RotationPredictor": lambda: loca_kernels.RotationPredictor(DIM, 16, 8),
            "PatchCorrespondenceLoss": lambda: loca_kernels.PatchCorrespondenceLoss(2)}[name]()


def _bad_input(spec):
    """A shape tuple -> float32 zeros, (dtype, shape) -> zeros of that dtype, else as given."""
    if isinstance(spec, tuple) and spec and isinstance(spec[0], torch.dtype):
        return torch.zeros(spec[1], dtype=spec[0])
    return torch.zeros(spec) if isinstance(spec, tuple) else spec


@pytest.mark.parametrize("name,inputs,kind,match", BAD_INPUTS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_inputs_are_named_before_any_layer_runs(name, inputs, kind, match, monkeypatch):
    module = _bad_input_module(name)

    def fail(*args, **kwargs):
        raise AssertionError("a layer ran before the inputs were checked")

    # The module's own check must fire first: no projection, norm or matching runs.
    for layer in (nn.Linear, nn.LayerNorm):
        monkeypatch.setattr(layer, "forward", fail)
    monkeypatch.setattr(loca_kernels.losses.gtsa, "patch_matching", fail)   # the matching of PatchCorrespondenceLoss
    with pytest.raises(kind, match=match):
        module(*[_bad_input(spec) for spec in inputs])


def test_good_inputs_pass_the_input_checks():
    # The checks accept what the modules document: extra leading dims for the heads, V views.
    x, context = torch.randn(4, 3, DIM), torch.randn(2, 6, CONTEXT_DIM)
    assert _bad_input_module("MaskedCrossAttention")(x, context).shape == (4, 3, DIM)
    assert _bad_input_module("CrossAttentionBlock")(x, context).shape == (4, 3, DIM)
    assert _bad_input_module("PositionPredictor")(torch.randn(2, 2, 3, DIM)).shape == (2, 2, 3, 36)
    assert _bad_input_module("ClusteringHead")(torch.randn(DIM)).shape == (16,)
    assert _bad_input_module("RotationPredictor")(torch.randn(2, 2, 3, DIM)).shape == (2, 2, 4)


def test_k_and_v_are_views_of_one_kv_projection(monkeypatch):
    seen = {}

    def spy(q, k, v, keep=None, *, scale=None, backend=None):
        seen.update(k=k, v=v)
        return loca_kernels.masked_cross_attention(q, k, v, keep, scale=scale, backend=backend)

    monkeypatch.setattr(loca_kernels.modules, "masked_cross_attention", spy)
    attn = MaskedCrossAttention(DIM, HEADS, context_dim=CONTEXT_DIM)
    x, context = _inputs(views=2, bk=3, nq=4, nk=5, dtype=torch.float32)
    attn(x, context)
    k, v = seen["k"], seen["v"]
    assert k.shape == v.shape == (3, 5, HEADS, DIM // HEADS)
    assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert v.data_ptr() - k.data_ptr() == DIM * k.element_size()     # v follows k in each token's row


# ---------------------------------------------------------------- outputs and gradients


@pytest.mark.parametrize("keep_name", ["none", "bool-per-row", "index-per-reference", "run-shared"])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_masked_cross_attention_gradients_match_plain_pytorch(keep_name, backend, dtype):
    views, bk, nq, nk = 3, 2, 5, 7
    torch.manual_seed(0)
    attn = MaskedCrossAttention(DIM, HEADS, context_dim=CONTEXT_DIM, qkv_bias=True, backend=backend,
                                dtype=dtype)
    keep = _keeps(views, bk, nk)[keep_name]
    mask = _mask(keep, views * bk, nk)

    def reference(p, x, context, keep):
        return _reference_masked_cross_attention(p, "", x, context, mask, HEADS, attn.scale)

    _check_module(attn, reference, [*_inputs(views, bk, nq, nk, dtype), keep], dtype)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_cross_attention_block_gradients_match_plain_pytorch(backend, dtype):
    views, bk, nq, nk = 2, 2, 4, 6
    torch.manual_seed(0)
    block = CrossAttentionBlock(DIM, HEADS, context_dim=CONTEXT_DIM, backend=backend, dtype=dtype)
    for p in block.parameters():                     # LayerNorms away from their identity init
        nn.init.normal_(p, std=0.5)
    keep = _keeps(views, bk, nk)["index-per-reference"]
    mask = _mask(keep, views * bk, nk)

    def reference(p, x, context, keep):
        def norm(name, t):
            return F.layer_norm(t, t.shape[-1:], p[name + ".weight"], p[name + ".bias"], eps=1e-6)

        x = x + _reference_masked_cross_attention(p, "attn.", norm("norm_q", x), norm("norm_context", context),
                                                  mask, HEADS, block.attn.scale)
        hidden = F.gelu(F.linear(norm("norm_mlp", x), p["mlp.0.weight"], p["mlp.0.bias"]))
        assert hidden.shape[-1] == 4 * DIM
        return x + F.linear(hidden, p["mlp.2.weight"], p["mlp.2.bias"])

    _check_module(block, reference, [*_inputs(views, bk, nq, nk, dtype), keep], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_position_predictor_gradients_match_plain_pytorch(dtype):
    torch.manual_seed(0)
    head = PositionPredictor(DIM, 49, dtype=dtype)
    nn.init.normal_(head.norm.weight)
    x = torch.randn(2, 3, 5, DIM, dtype=dtype, requires_grad=True)

    def reference(p, x):
        x = F.layer_norm(x, (DIM,), p["norm.weight"], p["norm.bias"], eps=1e-6)
        return F.linear(x, p["linear.weight"], p["linear.bias"])

    _check_module(head, reference, [x], dtype)


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clustering_head_gradients_match_plain_pytorch(num_layers, dtype):
    torch.manual_seed(0)
    head = ClusteringHead(DIM, 40, hidden_dim=24, bottleneck_dim=16, num_layers=num_layers, dtype=dtype)
    x = torch.randn(3, 7, DIM, dtype=dtype, requires_grad=True)

    def reference(p, x):
        for i in range(num_layers):
            x = F.gelu(x @ p[f"mlp.{2 * i}.weight"].T + p[f"mlp.{2 * i}.bias"])
        z = x @ p[f"mlp.{2 * num_layers}.weight"].T + p[f"mlp.{2 * num_layers}.bias"]
        w = p["prototypes.weight"]
        return (z / z.norm(dim=-1, keepdim=True)) @ (w / w.norm(dim=-1, keepdim=True)).T

    _check_module(head, reference, [x], dtype)
    assert head.prototypes.bias is None


def test_clustering_head_is_invariant_to_the_scale_of_each_prototype():
    torch.manual_seed(0)
    head = ClusteringHead(DIM, 8, hidden_dim=16, bottleneck_dim=8)
    x = torch.randn(5, DIM)
    logits = head(x)
    assert logits.abs().max() <= 1 + 1e-6
    with torch.no_grad():
        head.prototypes.weight.mul_(torch.rand(8, 1) * 10 + 0.1)
    assert_close(head(x), logits)


# ---------------------------------------------------------------- torch.compile and autocast


def _module_cases(backend):
    views, bk, nq, nk = 2, 2, 3, 6
    x, context = _inputs(views, bk, nq, nk, torch.float32)
    keep = KeepRun(torch.tensor([1]), 3)
    return {
        "MaskedCrossAttention": (MaskedCrossAttention(DIM, HEADS, context_dim=CONTEXT_DIM, backend=backend),
                                 (x, context, keep)),
        "CrossAttentionBlock": (CrossAttentionBlock(DIM, HEADS, context_dim=CONTEXT_DIM, backend=backend),
                                (x, context, loca_kernels.random_keep(bk, nk, 4))),
        "PositionPredictor": (PositionPredictor(DIM, 36), (x,)),
        "ClusteringHead": (ClusteringHead(DIM, 16, hidden_dim=32, bottleneck_dim=8), (x,)),
    }


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("name", ["MaskedCrossAttention", "CrossAttentionBlock", "PositionPredictor",
                                  "ClusteringHead"])
def test_compile_fullgraph_has_no_graph_break(name, backend):
    module, inputs = _module_cases(backend)[name]
    explanation = torch._dynamo.explain(module)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # Runs (forward and backward through the fake functions) and agrees with eager mode.
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    assert_close(out, module(*inputs))
    out.sum().backward()


@pytest.mark.parametrize("name", ["MaskedCrossAttention", "CrossAttentionBlock", "PositionPredictor",
                                  "ClusteringHead"])
def test_autocast_bfloat16_runs_and_agrees_with_float32(name):
    torch.manual_seed(0)
    module, inputs = _module_cases(None)[name]
    expected = module(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(*inputs)
    # The residual stream of the block keeps the dtype of its input, as in timm's blocks.
    assert out.dtype == (torch.float32 if name == "CrossAttentionBlock" else torch.bfloat16)
    assert_close(out.float(), expected, torch.bfloat16)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


# ---------------------------------------------------------------- the example


def test_vit_decoder_example_runs():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "vit_decoder_cross_attention.py"
    runpy.run_path(str(path), run_name="__main__")
