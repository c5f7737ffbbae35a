"""patch_matching: the reference against an explicit per-row search, every backend's index,
similarity and both gradients against the reference, ties, zero vectors, strided inputs,
determinism, opcheck, gradcheck, every SPEC error, and the Triton kernels compiled for sm_90."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import loca_kernels as lk
from helpers import IGNORE_NUMPY_NAN_WARNINGS, assert_close, backend_params, compile_for_gpu, non_finite_params
from loca_kernels._backends import extension_has_kernel

BACKENDS = backend_params("patch_matching")
FUSED = backend_params("patch_matching", reference=False)
HAS_CPU_KERNEL = extension_has_kernel("patch_matching", "CPU")


def make(batch, na, nb, c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, na, c, generator=g, dtype=dtype), torch.randn(batch, nb, c, generator=g, dtype=dtype))


def explicit(a, b):
    """One row at a time, in float64: the first row of b reaching the highest cosine."""
    index = torch.empty(a.shape[:2], dtype=torch.int64)
    for bi in range(a.shape[0]):
        for i in range(a.shape[1]):
            x = a[bi, i].double()
            cos = [float(x @ y.double()) / max(float(x.norm()), 1e-12) / max(float(y.double().norm()), 1e-12)
                   for y in b[bi]]
            index[bi, i] = cos.index(max(cos))
    return index


def at_index(a, b, index):
    """The cosine of each row of a with the row `index` of b, through F.normalize (float64)."""
    a_n, b_n = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    return (a_n * b_n.gather(1, index[..., None].expand(-1, -1, b.shape[2]))).sum(-1)


def run(backend, a, b, grad):
    """index, similarity, grad_a and grad_b of one call (grad: the gradient of similarity)."""
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    index, similarity = lk.patch_matching(a, b, backend=backend)
    grad_a, grad_b = torch.autograd.grad(similarity, (a, b), grad.to(similarity.dtype))
    return index, similarity, grad_a, grad_b


def check_against_reference(backend, device, a, b, grad, dtype, label=""):
    """The backend on (a, b) rounded to dtype against float64 maths on the same rounded values.

    Near-ties: two cosines closer than float32 rounding may be ordered differently by two
    summation orders, so an index may differ from the float64 argmax only where its cosine is
    within tolerance of the maximum; the gradients are checked at the backend's own index."""
    a, b = a.to(dtype), b.to(dtype)
    index, similarity, grad_a, grad_b = run(backend, a.to(device), b.to(device), grad.to(device))
    index, similarity = index.cpu(), similarity.cpu()
    assert index.dtype == torch.int64 and grad_a.dtype == dtype and grad_b.dtype == dtype
    assert similarity.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    cosine = torch.bmm(F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1).transpose(1, 2))
    best = cosine.max(-1).values
    chosen = cosine.gather(-1, index[..., None]).squeeze(-1)
    assert ((best - chosen) <= 1e-5).all(), f"{label}: an index far from the maximum"
    top2 = cosine.topk(min(2, b.shape[1]), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1] > 1e-4) if b.shape[1] > 1 else torch.ones_like(best, dtype=torch.bool)
    assert torch.equal(index[clear], cosine.argmax(-1)[clear]), f"{label}: index differs from the reference"
    similarity_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close(similarity, chosen, similarity_dtype, name=f"{label} similarity")
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    expected = torch.autograd.grad(at_index(a64, b64, index), (a64, b64), grad.double())
    # The gradients scale with 1 / |x|: the tolerance is the dtype's, relative to that scale.
    for name, got, want in zip(("grad_a", "grad_b"), (grad_a, grad_b), expected):
        assert_close(got.cpu(), want, dtype, name=f"{label} {name}")


def _dtypes(backend):
    return [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend in ("torch", "cpu") else [])


SHAPES = [(1, 1, 1, 1), (2, 7, 13, 1), (2, 7, 13, 16), (1, 9, 70, 130), (1, 3, 5, 384)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_reference(backend, device, shape):
    batch, na, nb, c = shape
    if backend == "triton" and device == "cpu" and shape == (2, 7, 13, 1):
        pytest.skip("one channel is covered by the ties test; the interpreter is slow")
    a, b = make(batch, na, nb, c, seed=sum(shape))
    grad = torch.randn(batch, na, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dtypes = _dtypes(backend)
    if backend == "triton" and device == "cpu" and c > 16:   # the interpreter is slow: fp16 on small C only
        dtypes = [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        check_against_reference(backend, device, a, b, grad, dtype, label=f"{backend} {dtype}")


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="extension built without the CPU kernel")
@pytest.mark.parametrize("c", [16, 384])
def test_cpu_backend_at_gtsa_size(c):
    a, b = make(3, 196, 196, c, seed=c)
    grad = torch.randn(3, 196, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference("cpu", "cpu", a, b, grad, dtype, label=f"cpu {dtype}")


def test_reference_matches_explicit_search_and_its_own_gradient():
    a, b = make(2, 7, 13, 5)
    index, similarity = lk.patch_matching(a, b, backend="torch")
    assert torch.equal(index, explicit(a, b))
    assert_close(similarity, at_index(a, b, index))
    # The autograd of normalize + bmm + argmax/gather is the gradient through the chosen pairs.
    grad = torch.randn(2, 7, dtype=torch.float64)
    _, _, grad_a, grad_b = run("torch", a, b, grad)
    a64, b64 = a.clone().requires_grad_(), b.clone().requires_grad_()
    want_a, want_b = torch.autograd.grad(at_index(a64, b64, index), (a64, b64), grad)
    assert_close(grad_a, want_a, name="grad_a")
    assert_close(grad_b, want_b, name="grad_b")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_float64(backend):
    if backend == "cpu" and not HAS_CPU_KERNEL:
        pytest.skip("extension built without the CPU kernel")
    a, b = make(2, 5, 4, 3)
    a, b = a.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lk.patch_matching(a, b, backend=backend)[1], (a, b))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ties_go_to_the_lowest_index(backend, device):
    # Rows 2, 5, 9 and 70 of b (two tiles of the Triton kernel) are positive multiples of e_0:
    # their normalised rows are exactly e_0 and their cosines with a multiple of e_0 exactly 1,
    # in any summation order. Every backend must pick 2, as torch.argmax, in every dtype.
    a, b = make(2, 6, 75, 24, seed=3)
    e0 = torch.zeros(24, dtype=torch.float64)
    e0[0] = 1
    for row, scale in zip((2, 5, 9, 70), (1.0, 2.0, 3.5, 0.25)):
        b[:, row] = scale * e0
    a[:, :3] = torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64)[:, None] * e0
    # Generic equal rows: rows 11 and 40 of b equal a's row 3. Exact ties need every column
    # summed alike: true of the C++ kernel and of tl.dot on a GPU, not of the BLAS behind the
    # Triton interpreter's tl.dot (nor of the reference's float64 bmm for float64 inputs).
    b[:, 11] = b[:, 40] = a[:, 3]
    generic = backend == "cpu" or device == "cuda"
    for dtype in _dtypes(backend):
        index, similarity = lk.patch_matching(a.to(dtype).to(device), b.to(dtype).to(device), backend=backend)
        assert (index[:, :3].cpu() == 2).all() and (similarity[:, :3] == 1).all(), f"{backend} {dtype}"
        if generic or (backend == "torch" and dtype != torch.float64):
            assert (index[:, 3].cpu() == 11).all(), f"{backend} {dtype}: {index[:, 3].tolist()}"
    # One channel: every cosine is exactly +-1, so the first row of b of a's sign wins.
    a1 = torch.tensor([[[0.3], [-2.0], [5.0]]])
    b1 = torch.tensor([[[-1.0], [0.7], [-3.0], [9.0]]])
    for dtype in _dtypes(backend):
        index, similarity = lk.patch_matching(a1.to(dtype).to(device), b1.to(dtype).to(device), backend=backend)
        assert index.cpu().tolist() == [[1, 0, 1]] and (similarity == 1).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_vectors(backend, device):
    # A zero row has cosine 0 to everything. Gradients as F.normalize's: the clamped norm passes
    # none, so a zero x gets g * other_n / eps (g = 1e-12 keeps it finite in every dtype).
    # Image 1: rows shorter than eps (not zero in float32 and bfloat16), whose gradient lacks the
    # term through the norm: a tiny row of a choosing row 0, a row choosing the tiny row 2 of b.
    a = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [-1.0, -1.0], [3.0, -4.0]],
                      [[4e-13, 3e-13], [-1.0, -3.0], [0.0, 0.0], [3.0, -4.0]]], dtype=torch.float64)
    b = torch.tensor([[[-1.0, 0.0], [1.0, 1.0], [0.0, 0.0]],
                      [[1.0, 1.0], [0.0, 0.0], [-2e-13, 0.0]]], dtype=torch.float64)
    grad = torch.tensor([[1e-12, 1.0, 2.0, 1e-12], [1e-12] * 4], dtype=torch.float64)
    for dtype in _dtypes(backend):
        index, similarity, grad_a, grad_b = run(backend, a.to(dtype).to(device), b.to(dtype).to(device),
                                                grad.to(device))
        # cosines per row: (0, 0, 0), (-1, .71, 0), (.71, -1, 0), (-.6, -.14, 0): first maxima 0, 1, 0, 2.
        assert index[0].cpu().tolist() == [0, 1, 0, 2], f"{backend} {dtype}"
        a64, b64 = a.to(dtype).double().requires_grad_(), b.to(dtype).double().requires_grad_()
        expected_index, reference = lk.patch_matching(a64, b64, backend="torch")
        assert torch.equal(index.cpu(), expected_index)
        want_a, want_b = torch.autograd.grad(reference, (a64, b64), grad)
        assert_close(similarity.cpu(), reference, torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(grad_a.cpu(), want_a, dtype, name=f"{backend} {dtype} grad_a")
        assert_close(grad_b.cpu(), want_b, dtype, name=f"{backend} {dtype} grad_b")
        # 1e-12 * other_n / 1e-12: the zero rows' gradients are those of F.normalize at zero.
        assert grad_a[0, 0].cpu().tolist() == [-1.0, 0.0]
        assert_close(grad_b[0, 2].cpu(), torch.tensor([0.6, -0.8], dtype=torch.float64), dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_inputs_are_read_in_place(backend, device):
    # a as a transposed view of (B, C, Na), b as every other row of a larger tensor.
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 20, 9, generator=g).to(device).transpose(1, 2)
    b = torch.randn(2, 26, 20, generator=g).to(device)[:, ::2]
    grad = torch.randn(2, 9, generator=g, dtype=torch.float64)
    assert a.stride() == (180, 1, 9) and b.stride() == (520, 40, 1)
    check_against_reference(backend, device, a, b, grad, torch.float32, label=f"{backend} strided")


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_backend_is_deterministic(backend, device):
    a, b = make(2, 30, 8, 16, dtype=torch.float32)   # many rows of a share a row of b
    grad = torch.randn(2, 30)
    first, second = (run(backend, a.to(device), b.to(device), grad.to(device)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(first, second))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="extension built without the CPU kernel")
def test_cpu_backend_does_not_depend_on_the_thread_count():
    a, b = make(3, 41, 37, 70, dtype=torch.float32)
    grad = torch.randn(3, 41)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpu", a, b, grad)
    finally:
        torch.set_num_threads(threads)
    torch.set_num_threads(max(2, threads))
    try:
        many = run("cpu", a, b, grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(one, many))


@pytest.mark.parametrize("backend,device", FUSED)
def test_opcheck_fused_operators(backend, device):
    suffix = "_triton" if backend == "triton" else ""
    forward = getattr(torch.ops.loca_kernels, "patch_matching" + suffix)
    backward = getattr(torch.ops.loca_kernels, "patch_matching_backward" + suffix)
    a, b = (t.to(device) for t in make(2, 5, 7, 16, dtype=torch.float32))
    torch.library.opcheck(forward.default, (a.requires_grad_(), b.requires_grad_()))
    with torch.no_grad():
        similarity, index = forward(a, b)
    torch.library.opcheck(backward.default, (torch.randn_like(similarity), a.detach(), b.detach(), index))


def test_backend_none_falls_back_and_named_backend_explains():
    a, b = make(1, 3, 4, 8, dtype=torch.float32)
    index, _ = lk.patch_matching(a, b)
    assert torch.equal(index, lk.patch_matching(a, b, backend="torch")[0])
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run this call"):
        lk.patch_matching(a.double(), b.double(), backend="triton")
    with pytest.raises(ValueError, match="backend 'cuda' is not implemented"):
        lk.patch_matching(a, b, backend="cuda")


def test_inputs_are_not_written():
    a, b = make(2, 4, 5, 6, dtype=torch.float32)
    copies = (a.clone(), b.clone())
    index, similarity = lk.patch_matching(a.requires_grad_(), b.requires_grad_())
    similarity.sum().backward()
    assert torch.equal(a.detach(), copies[0]) and torch.equal(b.detach(), copies[1])


def _zeros(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


# case: (arguments replaced in the base call, error type, message). Base: a (2, 4, 8), b (2, 5, 8).
ERRORS = {
    "rank_a": (dict(a=_zeros(4, 8)), ValueError, r"a must have 3 dimensions \(B, N, C\), got shape \(4, 8\)"),
    "rank_b": (dict(b=_zeros(1, 2, 5, 8)), ValueError, r"b must have 3 dimensions \(B, N, C\)"),
    "batch": (dict(b=_zeros(3, 5, 8)), ValueError, "a has B=2 but b has B=3"),
    "channels": (dict(b=_zeros(2, 5, 7)), ValueError, "a has C=8 but b has C=7"),
    "zero_c": (dict(a=_zeros(2, 4, 0), b=_zeros(2, 5, 0)), ValueError, r"a and b have a feature dim of zero \(C=0\)"),
    "zero_na": (dict(a=_zeros(2, 0, 8)), ValueError, r"a has no rows \(Na=0\)"),
    "zero_nb": (dict(b=_zeros(2, 0, 8)), ValueError, r"b has no rows \(Nb=0\)"),
    "dtype_mix": (dict(b=_zeros(2, 5, 8, dtype=torch.float16)), TypeError, "a and b must share one dtype"),
    "int": (dict(a=_zeros(2, 4, 8, dtype=torch.int64)), TypeError,
            r"a must have dtype in \(float32, float16, bfloat16, float64\), got torch.int64"),
    "device": (dict(b=torch.zeros(2, 5, 8, device="meta")), ValueError, "b is on meta but a is on cpu"),
    "not_tensor": (dict(b=[[0.0]]), TypeError, "b must be a torch.Tensor, got list"),
    "backend": (dict(backend="fast"), ValueError, "backend must be None or one of"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors(case):
    replace, kind, match = ERRORS[case]
    args = dict(a=_zeros(2, 4, 8), b=_zeros(2, 5, 8))
    args.update(replace)
    with pytest.raises(kind, match="patch_matching: " + match):
        lk.patch_matching(**args)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="extension built without the CPU kernel")
@pytest.mark.parametrize("operator,args,kind,match", [
    ("patch_matching", (_zeros(2, 4, 8, dtype=torch.int64),) * 2, TypeError,
     "a must be float32, float64, float16 or bfloat16, got Long"),
    ("patch_matching", (_zeros(2, 4, 8), _zeros(2, 5, 7)), ValueError, "a and b must share B and C"),
    ("patch_matching_backward", (_zeros(2, 4), _zeros(2, 4, 8), _zeros(2, 5, 8), torch.full((2, 4), 5)), ValueError,
     r"index values must lie in \[0, Nb = 5\), got 5"),
])
def test_cpp_operator_errors(operator, args, kind, match):
    # The C++ kernel's own checks, below the Python validation: a ValueError or TypeError naming
    # the operator and backend.
    with pytest.raises(kind, match=rf"loca_kernels\.{operator} \(cpu\): {match}"):
        getattr(torch.ops.loca_kernels, operator)(*args)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_for_a_gpu():
    # The interpreter runs Python, not Triton's compiler: every kernel is also compiled for
    # sm_90 (no GPU needed).
    compile_for_gpu("""
        from loca_kernels.matching import triton as matching_triton

        POINTERS = {"index": "*i64", "order": "*i64", "starts": "*i64", "chosen": "*i64", "similarity": "*fp32",
                    "grad_similarity": "*fp32", "weight": "*fp32", "along": "*fp32"}
        BLOCKS = dict(BLOCK_M=64, BLOCK_N=matching_triton.BLOCK_N, BLOCK_K=matching_triton.BLOCK_K,
                      BLOCK_J=matching_triton.BLOCK_J, BLOCK_G=matching_triton.BLOCK_G)
        # The forward's tl.dot for every input dtype; the backward kernels compute in fp32 from
        # loads of any dtype (bf16 here).
        VARIANTS = [(matching_triton._forward_kernel, dtype) for dtype in ("fp16", "bf16", "fp32")]
        VARIANTS += [(matching_triton._grad_a_kernel, "bf16"), (matching_triton._grad_b_kernel, "bf16")]
        for kernel, dtype in VARIANTS:
            names = [param.name for param in kernel.params]
            types = {name: POINTERS.get(name, "*" + dtype) if name in POINTERS or name in ("a", "b", "grad_a", "grad_b")
                     else "fp32" if name == "eps" else "i32" for name in names if name not in BLOCKS}
            compile_triton_kernel(kernel, types, {name: BLOCKS[name] for name in names if name in BLOCKS})
    """)


# ---- PatchCorrespondenceLoss (GTSA) -----------------------------------------------------------

def gtsa_direction(inputs, candidates, num_matches):
    """One direction of GTSA's term, one image at a time: each input patch's nearest candidate
    by cosine distance, the num_matches smallest distances kept (in patch order), minus the
    cosine of the kept pairs recomputed from the features, averaged over images and pairs."""
    per_image = []
    for x, y in zip(inputs, candidates):
        distance = -(F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T)     # (Nx, Ny)
        nearest_distance, nearest = distance.min(dim=1)
        kept = nearest_distance.argsort()[:num_matches].sort().values
        per_image.append(-F.cosine_similarity(x[kept], y[nearest[kept]], dim=-1))
    return torch.stack(per_image).mean()


def gtsa_loss(student, teacher, num_matches):
    teacher = teacher.detach()
    return 0.5 * (gtsa_direction(student, teacher, num_matches) + gtsa_direction(teacher, student, num_matches))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("sizes", [(3, 196, 196, 98), (2, 36, 196, 18), (2, 5, 7, 5)], ids=str)
def test_patch_correspondence_loss_matches_gtsa(backend, device, sizes):
    batch, ns, nt, matches = sizes
    if backend == "triton" and device == "cpu" and nt > 100:
        pytest.skip("GTSA's sizes are too slow under the Triton interpreter")
    g = torch.Generator().manual_seed(ns)
    student = torch.randn(batch, ns, 24, generator=g, dtype=torch.float32)
    teacher = torch.randn(batch, nt, 24, generator=g, dtype=torch.float32)
    s = student.to(device).detach().requires_grad_()
    t = teacher.to(device).detach().requires_grad_()
    loss = lk.PatchCorrespondenceLoss(matches, backend=backend)(s, t)
    loss.backward()
    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    expected = gtsa_loss(s64, t64, matches)
    expected.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss.cpu(), expected, torch.float32, name="loss")
    assert_close(s.grad.cpu(), s64.grad, torch.float32, name="grad student")
    assert t.grad is None and t64.grad is None   # the teacher is detached, as in GTSA


def test_patch_correspondence_loss_compiles_without_graph_breaks():
    student, teacher = make(2, 36, 49, 16, dtype=torch.float32)
    module = lk.PatchCorrespondenceLoss(18, backend="torch")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    s = student.clone().requires_grad_()
    got = compiled(s, teacher)
    got.backward()
    s_eager = student.clone().requires_grad_()
    want = module(s_eager, teacher)
    want.backward()
    assert_close(got, want, name="loss")
    assert_close(s.grad, s_eager.grad, name="grad student")


@pytest.mark.parametrize("num_matches,kind,match", [
    (50, ValueError, r"num_matches=50 is larger than the patches of the student \(2, 36, 16\) or the teacher "
                     r"\(2, 49, 16\); expected at most 36"),
    (0, ValueError, "num_matches must be >= 1, got 0"),
    (2.0, TypeError, "num_matches must be an int, got float"),
])
def test_patch_correspondence_loss_errors(num_matches, kind, match):
    student, teacher = make(2, 36, 49, 16, dtype=torch.float32)
    with pytest.raises(kind, match="PatchCorrespondenceLoss: " + match):
        lk.PatchCorrespondenceLoss(num_matches)(student, teacher)
    with pytest.raises(ValueError, match=r"PatchCorrespondenceLoss: student must have 3 dimensions \(B, Ns, C\)"):
        lk.PatchCorrespondenceLoss(4)(student[0], teacher)


# ---- NaN and infinities (SPEC.md section 6): a row with a non-finite entry has NaN cosines,
# and a NaN cosine wins as in torch.argmax (the first one).

# where: (tensor, bad entries, the rows of a (batch 1) that get similarity NaN, their index).
# Nb = 70: row 66 of b lies in the Triton kernel's second tile of 64.
_NON_FINITE_CASES = {
    "a": ("a", [(1, 2, 3)], [2], 0),
    "a-first-channel": ("a", [(1, 4, 0)], [4], 0),
    "b": ("b", [(1, 5, 7)], "all", 5),
    "b-second-tile": ("b", [(1, 66, 1)], "all", 66),
    "b-two-rows": ("b", [(1, 66, 1), (1, 9, 0)], "all", 9),
}


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend,device,where,value",
                         non_finite_params(BACKENDS, {where: (where,) for where in _NON_FINITE_CASES}))
def test_non_finite_rows_win_as_nan(where, value, backend, device):
    # float16 rows: the kernels read them as given, as the reference.
    a, b = make(2, 6, 70, 8, dtype=torch.float16 if where.startswith("b") else torch.float32, seed=2)
    clean_index, clean_similarity = lk.patch_matching(a, b, backend="torch")
    name, entries, rows, nan_index = _NON_FINITE_CASES[where]
    for entry in entries:
        {"a": a, "b": b}[name][entry] = value
    index, similarity = (t.cpu() for t in lk.patch_matching(a.to(device), b.to(device), backend=backend))
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[1, rows if rows != "all" else slice(None)] = True
    assert torch.equal(similarity.isnan(), expected)
    assert torch.all(index[expected] == nan_index)
    # Batch element 0 and the other rows: as without the bad entries.
    assert torch.equal(index[~expected], clean_index[~expected])
    assert_close(similarity[~expected], clean_similarity[~expected], torch.float32)
    ref_index, ref_similarity = lk.patch_matching(a, b, backend="torch")
    assert torch.equal(index, ref_index)
    assert torch.equal(similarity.isnan(), ref_similarity.isnan())
