"""masked_cross_attention: the reference against an explicit per-row computation, float64
gradcheck, the keep forms, fully masked rows, and every SPEC error."""
import importlib.util

import pytest
import torch

import loca_kernels as lk
from helpers import (IGNORE_NUMPY_NAN_WARNINGS, TOLERANCES, assert_close, backend_params, compile_for_gpu,
                     non_finite_params)
from loca_kernels._backends import extension_has_kernel
from loca_kernels.attention.keep import compact_keep


def explicit(q, k, v, mask, scale):
    """One query row at a time, visible keys gathered: independent of the reference's code."""
    out = torch.zeros_like(q, dtype=torch.float64)
    bk = k.shape[0]
    for i in range(q.shape[0]):
        visible = mask[i].nonzero().flatten()
        if len(visible) == 0:
            continue
        kk, vv = k[i % bk, visible].double(), v[i % bk, visible].double()   # (n, H, D)
        scores = torch.einsum("qhd,nhd->hqn", q[i].double(), kk) * scale
        out[i] = torch.einsum("hqn,nhd->qhd", scores.softmax(-1), vv)
    return out


def make(bk, views, nq, nk, h, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(views * bk, nq, h, d, generator=g, dtype=dtype)
    k = torch.randn(bk, nk, h, d, generator=g, dtype=dtype)
    v = torch.randn(bk, nk, h, d, generator=g, dtype=dtype)
    return q, k, v


def keep_forms(bk, views, nk, g):
    bq = bk * views
    per_row = torch.rand(bq, nk, generator=g) < 0.4
    per_row[0] = False                                   # a row with no visible key
    shared = torch.rand(bk, nk, generator=g) < 0.5
    if bk > 1:
        shared[-1] = False                               # every view of a reference sees nothing
    return {
        "none": None,
        "bool_per_row": per_row,
        "bool_shared": shared,
        "index_per_row": lk.random_keep(bq, nk, max(1, nk // 3), generator=g),
        "index_shared": lk.random_keep(bk, nk, max(1, nk // 2), generator=g),
        "run_shared_by_all": lk.consecutive_keep(1, nk, max(1, nk // 5), generator=g, as_run=True),
        "run_as_index": lk.consecutive_keep(bk, nk, max(1, nk // 5), generator=g),
        "run_per_row": lk.consecutive_keep(bq, nk, max(1, nk // 4), generator=g, as_run=True),
    }


@pytest.mark.parametrize("shape", [(2, 1, 1, 1, 1, 16), (2, 9, 7, 7, 3, 16), (1, 10, 36, 196, 2, 64)])
def test_reference_matches_explicit_rows_for_every_keep_form(shape):
    bk, views, nq, nk, h, d = shape
    q, k, v = make(bk, views, nq, nk, h, d)
    for name, keep in keep_forms(bk, views, nk, torch.Generator().manual_seed(1)).items():
        mask = lk.keep_to_mask(keep, q.shape[0], nk, q.device)
        got = lk.masked_cross_attention(q, k, v, keep, backend="torch")
        assert_close(got, explicit(q, k, v, mask, d ** -0.5), name=name)


def test_reference_gradcheck_float64_with_a_fully_masked_row():
    q, k, v = (t.requires_grad_() for t in make(2, 3, 5, 7, 3, 4))
    keep = torch.rand(6, 7, generator=torch.Generator().manual_seed(0)) < 0.5
    keep[2] = False
    fn = lambda q, k, v: lk.masked_cross_attention(q, k, v, keep, scale=0.7, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    out = fn(q, k, v)
    assert (out[2] == 0).all()
    out.sum().backward()
    assert (q.grad[2] == 0).all() and torch.isfinite(k.grad).all()


def test_scale_and_dtype_of_the_output():
    q, k, v = make(1, 2, 3, 4, 1, 8, dtype=torch.float32)
    out = lk.masked_cross_attention(q, k, v, scale=0.1, backend="torch")
    assert out.dtype == torch.float32
    assert_close(out, explicit(q, k, v, torch.ones(2, 4, dtype=torch.bool), 0.1))


def _base():
    return make(2, 3, 4, 5, 2, 8, dtype=torch.float32)


def _zeros(*shape):
    return torch.zeros(*shape)


# case: (arguments replaced in the base call, error type, message). Base: q (6, 4, 2, 8),
# k and v (2, 5, 2, 8) float32, keep None.
ERRORS = {
    "rank": (lambda q, k, v: dict(q=q[:, :, 0]), ValueError,
             r"q must have 4 dimensions \(B, N, H, D\), got shape \(6, 4, 8\)"),
    "multiple": (lambda q, k, v: dict(k=_zeros(4, 5, 2, 8), v=_zeros(4, 5, 2, 8)), ValueError,
                 r"Bq=6 \(q.shape\[0\]\) must be a multiple of Bk=4"),
    "heads": (lambda q, k, v: dict(k=_zeros(2, 5, 3, 8), v=_zeros(2, 5, 3, 8)), ValueError,
              "q has H=2, D=8 but k has H=3, D=8"),
    "dim": (lambda q, k, v: dict(k=_zeros(2, 5, 2, 4), v=_zeros(2, 5, 2, 4)), ValueError,
            "q has H=2, D=8 but k has H=2, D=4"),
    "kv_shape": (lambda q, k, v: dict(v=_zeros(2, 6, 2, 8)), ValueError, "k and v must have the same shape"),
    "dtype_mix": (lambda q, k, v: dict(v=v.half()), TypeError, "must share one dtype"),
    "int_q": (lambda q, k, v: dict(q=q.long()), TypeError,
              r"q must have dtype in \(float32, float16, bfloat16, float64\), got torch.int64"),
    "keep_rows": (lambda q, k, v: dict(keep=torch.ones(4, 5, dtype=torch.bool)), ValueError,
                  r"keep must have R in \(1, Bk=2, Bq=6\) rows, got shape \(4, 5\)"),
    "keep_cols": (lambda q, k, v: dict(keep=torch.ones(2, 6, dtype=torch.bool)), ValueError,
                  r"bool keep must have shape \(R, Nk=5\), got \(2, 6\)"),
    "keep_float": (lambda q, k, v: dict(keep=torch.ones(2, 5)), TypeError,
                   "keep must be a bool mask or an integer index tensor, got torch.float32"),
    "keep_range": (lambda q, k, v: dict(keep=torch.tensor([[0, 5], [1, 2]])), ValueError,
                   r"keep positions out of range: expected values in \[0, 5\)"),
    "keep_negative": (lambda q, k, v: dict(keep=torch.tensor([[0, -1], [1, 2]])), ValueError,
                      "keep positions out of range"),
    "keep_repeat": (lambda q, k, v: dict(keep=torch.tensor([[1, 1], [1, 2]])), ValueError,
                    "keep positions must be distinct"),
    "run_range": (lambda q, k, v: dict(keep=lk.KeepRun(torch.tensor([3, 0]), 3)), ValueError,
                  "keep run positions out of range"),
    "device": (lambda q, k, v: dict(k=k.to("meta")), ValueError, "k is on meta but q is on cpu"),
    "keep_device": (lambda q, k, v: dict(keep=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError,
                    "keep is on meta but q is on cpu"),
    "not_tensor": (lambda q, k, v: dict(v=v.tolist()), TypeError, "v must be a torch.Tensor, got list"),
    "head_dim": (lambda q, k, v: dict(q=_zeros(2, 1, 1, 300), k=_zeros(2, 1, 1, 300), v=_zeros(2, 1, 1, 300)),
                 ValueError, "head dim D=300 is larger than the supported 256"),
    "backend": (lambda q, k, v: dict(backend="fast"), ValueError, "backend must be None or one of"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors(case):
    replace, kind, match = ERRORS[case]
    q, k, v = _base()
    args = dict(q=q, k=k, v=v, keep=None)
    args.update(replace(q, k, v))
    with pytest.raises(kind, match=match):
        lk.masked_cross_attention(**args)


def _direct_call_args(**replace):
    """Valid arguments of loca_kernels::attention_forward (Nk = 5) but for `replace`; tuples become int32 tensors."""
    q, k, v = make(2, 1, 3, 5, 2, 8, dtype=torch.float32)
    args = dict(q=q, k=k, v=v, keep_index=((0, 1, 3), (0, 2, 4)), keep_count=(3, 3), keep_is_run=False, scale=0.25)
    args.update(replace)
    return {name: torch.tensor(a, dtype=torch.int32) if isinstance(a, tuple) else a for name, a in args.items()}


# The C++ CPU kernels check every argument themselves (csrc/attention/checks.h and cpu.cpp): a direct
# caller of the operator cannot make them read out of bounds or count a token twice.
CPU_OPERATOR_ERRORS = {
    "repeated": (dict(keep_index=((0, 1, 3), (2, 4, 2))), ValueError,
                 r"keep_index\[1, 2\]=2 repeats a position of its row; the visible positions of a row must be "
                 "distinct"),
    "range": (dict(keep_index=((0, 1, 5), (0, 2, 4))), ValueError, r"keep_index\[0, 2\]=5 is out of range \[0, Nk=5\)"),
    "count": (dict(keep_count=(3, 4)), ValueError, r"keep_count\[1\]=4 is out of range"),
    "run": (dict(keep_index=((4,), (0,)), keep_count=(2, 2), keep_is_run=True), ValueError,
            r"keep run of row 0 \(start 4, length 2\) does not fit in Nk=5"),
    "keep_dtype": (dict(keep_index=torch.zeros(2, 3, dtype=torch.int64)), TypeError,
                   "keep_index and keep_count must be int32, got Long and Int"),
    "dtype_mix": (dict(v=torch.zeros(2, 5, 2, 8, dtype=torch.float64)), TypeError,
                  "v has dtype Double but q has Float; they must match"),
}


@pytest.mark.skipif(not extension_has_kernel("attention_forward", "CPU"), reason="extension built without CPU kernels")
@pytest.mark.parametrize("case", CPU_OPERATOR_ERRORS)
def test_cpu_operator_checks_its_arguments(case):
    replace, kind, match = CPU_OPERATOR_ERRORS[case]
    with pytest.raises(kind, match=r"^loca_kernels\.attention_forward \(cpu\): " + match):
        torch.ops.loca_kernels.attention_forward(**_direct_call_args(**replace))
    torch.ops.loca_kernels.attention_forward(**_direct_call_args())  # the unchanged arguments are valid


def test_inputs_are_not_written():
    q, k, v = _base()
    copies = [t.clone() for t in (q, k, v)]
    lk.masked_cross_attention(q, k, v, torch.tensor([[0, 3], [1, 2]]))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))


# ---- fused backends against the reference -------------------------------------------------

FUSED = backend_params("attention_forward", reference=False)
SHAPES = [  # (Bk, V, Nq, Nk, H, D)
    (2, 1, 1, 1, 1, 16),
    (2, 9, 7, 7, 3, 16),
    (1, 10, 36, 196, 2, 64),
    (3, 2, 70, 37, 1, 32),
]


def _dtypes(backend, device):
    dtypes = [torch.float32, torch.float16]
    # bf16 tl.dot is wrong under Triton's interpreter (operands multiplied as integers): checked on a GPU only.
    if not (backend == "triton" and device == "cpu"):
        dtypes.append(torch.bfloat16)
    return dtypes


def _grads(backend, q, kv, keep, grad_out):
    """Output and gradients with k and v as strided views of one (Bk, Nk, 2, H, D) tensor."""
    q, kv = q.detach().requires_grad_(), kv.detach().requires_grad_()
    out = lk.masked_cross_attention(q, kv[:, :, 0], kv[:, :, 1], keep, backend=backend)
    grad_q, grad_kv = torch.autograd.grad(out, (q, kv), grad_out.to(out.dtype))
    return out, grad_q, grad_kv[:, :, 0], grad_kv[:, :, 1]


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_backend_matches_reference(backend, device, shape):
    check_against_reference(backend, device, shape)


# The C++ kernel takes any D <= 256: vector tails (D = 40, 8) and the largest D.
@pytest.mark.parametrize("shape", [(1, 3, 5, 9, 2, 256), (2, 2, 17, 33, 1, 40), (1, 4, 65, 3, 1, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cpu_backend_matches_reference_for_any_head_dim(shape):
    if not extension_has_kernel("attention_forward", "CPU"):
        pytest.skip("extension built without the CPU attention kernels")
    check_against_reference("cpu", "cpu", shape)


def check_against_reference(backend, device, shape):
    """Output and every gradient in every dtype and keep form against the float64 reference."""
    bk, views, nq, nk, h, d = shape
    g = torch.Generator().manual_seed(sum(shape))
    q64 = torch.randn(views * bk, nq, h, d, generator=g, dtype=torch.float64)
    kv64 = torch.randn(bk, nk, 2, h, d, generator=g, dtype=torch.float64)
    grad_out = torch.randn(views * bk, nq, h, d, generator=g, dtype=torch.float64)
    for dtype in _dtypes(backend, device):
        # The oracle sees the same rounded inputs (grad_out included), in float64.
        q, kv = q64.to(dtype), kv64.to(dtype)
        forms = keep_forms(bk, views, nk, torch.Generator().manual_seed(7))
        if backend == "triton" and device == "cpu" and dtype != torch.float32:
            # The interpreter is slow (CI budget): beyond float32, the three forms that exercise
            # its distinct code paths (no keep, index lists, runs); every form on a GPU.
            forms = {name: forms[name] for name in ("none", "index_per_row", "run_shared_by_all")}
        for form, keep in forms.items():
            moved = lk.KeepRun(keep.start.to(device), keep.length) if isinstance(keep, lk.KeepRun) else \
                None if keep is None else keep.to(device)
            got = _grads(backend, q.to(device), kv.to(device), moved, grad_out.to(device))
            expected = _grads("torch", q.double(), kv.double(), keep, grad_out.to(dtype).double())
            for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), got, expected):
                assert a.dtype == dtype
                assert_close(a, e, dtype, name=f"{backend} {dtype} keep={form} {name}")


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_backend_is_deterministic_and_zero_on_empty_rows(backend, device):
    q, k, v = (t.to(device) for t in make(2, 3, 9, 11, 2, 16, dtype=torch.float32))
    keep = torch.rand(6, 11, generator=torch.Generator().manual_seed(3)).to(device) < 0.5
    keep[1] = False
    runs = [_grads(backend, q, torch.stack([k, v], dim=2), keep, torch.ones_like(q)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    out, grad_q = runs[0][:2]
    assert (out[1] == 0).all() and (grad_q[1] == 0).all() and all(torch.isfinite(t).all() for t in runs[0])


def test_cpu_backend_does_not_depend_on_the_thread_count():
    if not extension_has_kernel("attention_forward", "CPU"):
        pytest.skip("extension built without the CPU attention kernels")
    q, k, v = make(2, 5, 13, 29, 3, 24, dtype=torch.float32)
    keep = lk.random_keep(2, 29, 9, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads("cpu", q, torch.stack([k, v], dim=2), keep, torch.ones_like(q))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, _grads("cpu", q, torch.stack([k, v], dim=2), keep, torch.ones_like(q))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", FUSED)
def test_opcheck_fused_operators(backend, device):
    suffix = "_triton" if backend == "triton" else ""
    forward = getattr(torch.ops.loca_kernels, "attention_forward" + suffix)
    backward = getattr(torch.ops.loca_kernels, "attention_backward" + suffix)
    q, k, v = (t.to(device) for t in make(2, 3, 5, 7, 2, 16, dtype=torch.float32))
    keep_index, keep_count, _ = compact_keep(torch.rand(2, 7).to(device) < 0.6, 7, q.device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), keep_index, keep_count, False, 0.25)
    torch.library.opcheck(forward.default, args)
    with torch.no_grad():  # the backward operator itself is not differentiable
        out, lse = forward(*args)
    torch.library.opcheck(backward.default, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                                             keep_index, keep_count, False, 0.25))


def test_backend_none_falls_back_and_named_backend_explains():
    q, k, v = make(1, 2, 3, 4, 1, 48, dtype=torch.float32)
    assert_close(lk.masked_cross_attention(q, k, v), lk.masked_cross_attention(q.double(), k.double(), v.double(),
                                                                               backend="torch"))
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run this call"):
        lk.masked_cross_attention(q, k, v, backend="triton")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_for_a_gpu():
    # The interpreter runs Python (and multiplies in fp32), not Triton's compiler: every
    # kernel is also compiled for sm_90 with GPU-mode dots in fp16, bf16 and fp32 (no GPU
    # needed).
    compile_for_gpu("""
        import itertools
        from loca_kernels.attention import triton as attention_triton

        KERNELS = [(attention_triton._forward_kernel, {}), (attention_triton._grad_q_kernel, {}),
                   (attention_triton._grad_kv_kernel, {"SHARED": True}),
                   (attention_triton._grad_kv_kernel, {"SHARED": False})]
        VARIANTS = [(dtype, 64, is_run) for dtype in ("fp16", "bf16", "fp32") for is_run in (True, False)]
        VARIANTS += [("bf16", d, False) for d in attention_triton.HEAD_DIMS]
        for (kernel, extra), (dtype, d, is_run) in itertools.product(KERNELS, VARIANTS):
            types = {}
            for param in kernel.params:
                if param.is_constexpr:
                    continue
                if param.name in ("lse", "delta"):
                    types[param.name] = "*fp32"
                elif param.name in ("keep_index", "keep_count"):
                    types[param.name] = "*i32"
                elif param.name == "visible":
                    types[param.name] = "*i8"
                elif param.name in ("q", "k", "v", "out", "grad_out", "grad_q", "grad_k", "grad_v"):
                    types[param.name] = "*" + dtype
                else:
                    types[param.name] = "fp32" if param.name == "scale" else "i32"
            constexprs = dict(D=d, BLOCK_M=64, BLOCK_N=attention_triton.BLOCK_N, IS_RUN=is_run, DOT_FP32=False,
                              **extra)
            compile_triton_kernel(kernel, types, constexprs, options={"enable_fp_fusion": True})
    """)


# ---- NaN and infinities (SPEC.md section 1): they spread from what a row sees, never from
# hidden tokens, and a non-finite score makes its whole row NaN on every backend.

BACKENDS = backend_params("attention_forward")
# (Bk=2, V=2, Nq=5, Nk=9, H=2, D=16). Query rows 0 and 2 read reference 0, rows 1 and 3
# reference 1; row 3 sees no token.
_SEEN = {0: [0, 2, 3, 7], 1: [1, 4, 5, 8], 2: [0, 3, 6], 3: []}
# where: (tensor, index of the bad entry, the out entries it makes non-finite: (rows, heads, channels)).
_NON_FINITE_CASES = {
    "q": ("q", (1, 2, 0, 3), ([1], [2], [0], slice(None))),
    "q-of-a-row-seeing-nothing": ("q", (3, 1, 1, 0), None),
    "k-seen-by-two-views": ("k", (0, 3, 1, 5), ([0, 2], slice(None), [1], slice(None))),
    "k-seen-by-one-view": ("k", (0, 7, 0, 2), ([0], slice(None), [0], slice(None))),
    "k-hidden": ("k", (0, 1, 1, 5), None),
    "v-seen": ("v", (1, 4, 0, 7), ([1], slice(None), [0], [7])),
    "v-hidden": ("v", (1, 6, 1, 7), None),
    "scale": ("scale", None, ([0, 1, 2], slice(None), slice(None), slice(None))),
}


def _non_finite_problem():
    q, k, v = make(2, 2, 5, 9, 2, 16, dtype=torch.float32, seed=5)
    keep = torch.zeros(4, 9, dtype=torch.bool)
    for row, seen in _SEEN.items():
        keep[row, seen] = True
    return q, k, v, keep


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend,device,where,value",
                         non_finite_params(BACKENDS, {where: (where,) for where in _NON_FINITE_CASES}))
def test_non_finite_inputs_spread_only_from_visible_tokens(where, value, backend, device):
    q, k, v, keep = _non_finite_problem()
    name, index, spread = _NON_FINITE_CASES[where]
    scale = 0.25
    clean = lk.masked_cross_attention(q, k, v, keep, scale=scale, backend="torch")
    if name == "scale":
        scale = value
    else:
        {"q": q, "k": k, "v": v}[name][index] = value
    got = lk.masked_cross_attention(q.to(device), k.to(device), v.to(device), keep.to(device), scale=scale,
                                    backend=backend).cpu()
    expected = torch.zeros(got.shape, dtype=torch.bool)
    if spread is not None:
        rows, tokens, heads, channels = spread
        for row in rows:
            expected[row, tokens, heads, channels] = True
    if name == "v":  # NaN for NaN; an infinity stays one (positive weights, no opposite infinity)
        is_nan = value != value
        assert torch.equal(got.isnan(), expected & is_nan) and torch.equal(got.isinf(), expected & (not is_nan))
        assert torch.all(got[got.isinf()] == value)
    else:
        assert torch.equal(got.isnan(), expected), f"{int(got.isnan().sum())} NaN, expected {int(expected.sum())}"
        assert not got.isinf().any()
    assert torch.all(got[3] == 0)  # the row seeing nothing
    # The rest is untouched, and the reference agrees everywhere.
    assert_close(got[~expected], clean[~expected], torch.float32)
    reference = lk.masked_cross_attention(q, k, v, keep, scale=scale, backend="torch")
    assert_close(got, reference, torch.float32)


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend,device,keep_form,value",
                         non_finite_params(BACKENDS, {"index": ("index",), "run": ("run",)}))
def test_non_finite_hidden_tokens_do_not_count_for_index_and_run_keeps(keep_form, value, backend, device):
    q, k, v = make(2, 2, 5, 40, 2, 16, dtype=torch.float32, seed=6)
    if keep_form == "index":
        keep = torch.tensor([[5, 1, 33], [2, 30, 39]])     # per reference, shared by its views
    else:
        keep = lk.KeepRun(torch.tensor([1, 30]), 3)        # tokens 1..3 of reference 0, 30..32 of reference 1
    clean = lk.masked_cross_attention(q, k, v, keep, backend="torch")
    k[0, 4], v[0, 4], k[1, 35], v[1, 35] = value, value, value, value   # hidden in both forms
    got = lk.masked_cross_attention(q.to(device), k.to(device), v.to(device),
                                    keep if keep_form == "index" else lk.KeepRun(keep.start.to(device), 3),
                                    backend=backend).cpu()
    assert torch.isfinite(got).all()
    assert_close(got, clean, torch.float32)
    k[1, 30, 1, 0] = value                                 # seen by the views of reference 1, head 1 (both forms)
    got = lk.masked_cross_attention(q.to(device), k.to(device), v.to(device),
                                    keep if keep_form == "index" else lk.KeepRun(keep.start.to(device), 3),
                                    backend=backend).cpu()
    expected = torch.zeros(got.shape, dtype=torch.bool)
    expected[[1, 3], :, 1] = True
    assert torch.equal(got.isnan(), expected)
    assert_close(got, lk.masked_cross_attention(q, k, v, keep, backend="torch"), torch.float32)


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_finite_inputs_in_half_precision(backend, device):
    q, k, v, keep = _non_finite_problem()
    q, k, v = q.half(), k.half(), v.half()
    q[1, 2, 0, 3], k[1, 8, 1, 0], k[0, 1, 1, 5] = float("inf"), float("nan"), float("nan")  # the last hidden
    got = lk.masked_cross_attention(q.to(device), k.to(device), v.to(device), keep.to(device), backend=backend).cpu()
    expected = torch.zeros(got.shape, dtype=torch.bool)
    expected[1, 2, 0] = True
    expected[1, :, 1] = True
    assert torch.equal(got.isnan(), expected)


def test_uint8_keep_is_a_dtype_error():
    q, k, v = make(2, 1, 3, 5, 1, 16)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"masked_cross_attention: keep .*got torch.uint8.*keep.bool\(\)"):
        lk.masked_cross_attention(q, k, v, mask)


# ---- float32 precision of the Triton kernels on a GPU, emulated --------------------------
# The interpreter multiplies tl.dot's float32 operands in full float32; a GPU rounds them to
# TF32 (10-bit mantissas) unless the kernel asks otherwise (loca_kernels/_triton_dot.py). The
# emulation below rounds the operands of each dot of the Triton kernels as the tensor cores
# would and computes the rest in float64: rounding the operands is the error TF32 adds.

def _tf32(x):
    """x (float32) rounded to TF32, as cvt.rna.tf32.f32: 10 mantissa bits, ties away from zero."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def _emulated_dot(a, b, precision):
    """a @ b of float32 operands as tl.dot(a, b, input_precision=precision) on a GPU."""
    if precision == "ieee":
        return (a.double() @ b.double()).float()
    if precision == "tf32":
        return (_tf32(a).double() @ _tf32(b).double()).float()
    assert precision == "tf32x3"  # Triton's split: big + small TF32 parts, small * small dropped
    big_a, big_b = _tf32(a), _tf32(b)
    small_a, small_b = _tf32(a - big_a).double(), _tf32(b - big_b).double()
    big_a, big_b = big_a.double(), big_b.double()
    return (small_a @ big_b + big_a @ small_b + big_a @ big_b).float()


def _emulated_triton_attention(q, k, v, mask, grad_out, scale, precision):
    """Output and gradients of the Triton kernels' dots (attention/triton.py) in float32 at
    `precision`: S = Q K^T, out = P V / sum P; dP = dO V^T, dS = P (dP - delta), dQ = dS K,
    dV = P^T dO and dK = dS^T Q summed over the views of a reference."""
    bq, bk = q.shape[0], k.shape[0]
    dot = lambda a, b: _emulated_dot(a, b, precision)  # noqa: E731
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731  (B, N, H, D) -> (B, H, N, D)
    qh, kh, vh = heads_first(q), heads_first(k[torch.arange(bq) % bk]), heads_first(v[torch.arange(bq) % bk])
    go = heads_first(grad_out)
    visible = mask[:, None, None, :]
    s = dot(qh, kh.transpose(-1, -2)) * scale
    peak = s.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True).clamp_min(-3e38)
    p = torch.exp(s - peak).masked_fill(~visible, 0.0)
    total = p.sum(-1, keepdim=True)
    out = dot(p, vh) / total.clamp_min(1e-30)
    p = p / total.clamp_min(1e-30)
    delta = (go * out).sum(-1, keepdim=True)
    ds = p * (dot(go, vh.transpose(-1, -2)) - delta) * scale
    grad_q = dot(ds, kh)
    per_view = lambda t: heads_first(t).reshape(bq // bk, bk, *k.shape[1:]).sum(0)  # noqa: E731
    grad_v = per_view(dot(p.transpose(-1, -2), go))
    grad_k = per_view(dot(ds.transpose(-1, -2), qh))
    return heads_first(out), heads_first(grad_q), grad_k, grad_v


def _out_of_tolerance(actual, expected, dtype):
    """(elements out of tolerance, the largest error / allowed error)."""
    atol, rtol = TOLERANCES[dtype]
    ratio = (actual.double() - expected).abs() / (atol + rtol * expected.abs())
    return int((ratio > 1).sum()), ratio.max().item()


@pytest.mark.parametrize("shape", [(2, 9, 7, 7, 3, 16), (1, 10, 36, 196, 2, 64)], ids=lambda s: "x".join(map(str, s)))
def test_float32_triton_precision_on_a_gpu_by_emulation(shape):
    # TF32 (tl.dot's GPU default) puts float32 results outside the float32 tolerance; the
    # precision the kernels use (input_precision) and tf32x3 stay inside it.
    tl = pytest.importorskip("triton.language")
    from loca_kernels._triton_dot import input_precision

    chosen = input_precision(tl.float32)
    bk, views, nq, nk, h, d = shape
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(views * bk, nq, h, d, generator=g)
    k, v, grad_out = torch.randn(bk, nk, h, d, generator=g), torch.randn(bk, nk, h, d, generator=g), \
        torch.randn(views * bk, nq, h, d, generator=g)
    keep = lk.random_keep(views * bk, nk, max(1, nk // 3), generator=g)
    mask = lk.keep_to_mask(keep, q.shape[0], nk, q.device)
    expected = _grads("torch", q.double(), torch.stack([k, v], dim=2).double(), keep, grad_out.double())
    worst = {}
    for precision in ("tf32", "tf32x3", chosen):
        got = _emulated_triton_attention(q, k, v, mask, grad_out, d ** -0.5, precision)
        worst[precision] = {name: _out_of_tolerance(a, e, torch.float32)
                            for name, a, e in zip(("out", "grad_q", "grad_k", "grad_v"), got, expected)}
    assert worst["tf32"]["out"][0] > 0, worst
    for precision in ("tf32x3", chosen):
        assert all(count == 0 for count, _ in worst[precision].values()), (precision, worst)
