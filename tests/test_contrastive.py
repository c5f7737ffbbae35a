"""queue_contrastive_loss against MoCo's / DenseCL's head in float64 on every backend: losses and
both gradients in every dtype and reduction, a transposed queue read in place, large logits,
thread-count independence, opcheck, errors, and the Triton kernel compiled for a GPU."""
import pytest
import torch
import torch.nn.functional as F

import loca_kernels as lk
from helpers import (IGNORE_NUMPY_NAN_WARNINGS, NON_FINITE, TOLERANCES, assert_close, backend_params, compile_for_gpu,
                     non_finite_params)
from loca_kernels._backends import TRITON_AVAILABLE, extension_has_kernel
from loca_kernels.contrastive.operators import OPERATORS

OPERATOR = "queue_contrastive_forward"
BACKENDS = backend_params(OPERATOR)
FUSED = backend_params(OPERATOR, reference=False)
REDUCTIONS = ("mean", "sum", "none")
HAS_CPU_KERNEL = extension_has_kernel(OPERATOR, "CPU")


def _dtypes(backend, device):
    dtypes = [torch.float32, torch.float16]
    # bf16 tl.dot is wrong under Triton's interpreter (operands multiplied as integers): checked on a GPU only.
    if not (backend == "triton" and device == "cpu"):
        dtypes.append(torch.bfloat16)
    return dtypes


def make(n, k, d, seed=0, transposed=True):
    """Unit vectors in float64: query, a positive near it, and a queue (K, D), by default a view
    of a (D, K) buffer as DenseCL keeps it."""
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    positive = F.normalize(query + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    buffer = F.normalize(torch.randn(d, k, generator=g, dtype=torch.float64), dim=0)
    return query, positive, buffer.t() if transposed else buffer.t().contiguous()


def explicit(query, positive, queue, temperature):
    """Per row, the SPEC's formula with torch.logsumexp (independent of the reference's code)."""
    losses = []
    for i in range(query.shape[0]):
        logits = torch.cat([(query[i] @ positive[i]).reshape(1), queue @ query[i]]).double() / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses)


def loss_and_grads(backend, query, positive, queue, reduction, temperature=0.2, weights=None):
    """The loss and d(loss . weights)/d(query, positive)."""
    query, positive = query.detach().requires_grad_(), positive.detach().requires_grad_()
    loss = lk.queue_contrastive_loss(query, positive, queue, temperature=temperature, reduction=reduction,
                                     backend=backend)
    upstream = loss if weights is None else loss * weights.to(loss)
    grad_query, grad_positive = torch.autograd.grad(upstream.sum(), (query, positive))
    return loss, grad_query, grad_positive


def check(backend, device, n, k, d, reductions=REDUCTIONS, dtypes=None, temperature=0.2, seed=0):
    query64, positive64, queue64 = make(n, k, d, seed)
    weights = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for dtype in dtypes or _dtypes(backend, device):
        # The oracle sees the same rounded inputs, in float64.
        query, positive, queue = (t.to(dtype) for t in (query64, positive64, queue64))
        for reduction in reductions:
            w = weights if reduction == "none" else None
            expected = loss_and_grads("torch", query.double(), positive.double(), queue.double(), reduction,
                                      temperature, w)
            got = loss_and_grads(backend, query.to(device), positive.to(device), queue.to(device), reduction,
                                 temperature, w)
            case = f"{dtype}, {reduction}, N={n}, K={k}, D={d}"
            assert got[0].dtype == torch.float32 and got[0].shape == ((n,) if reduction == "none" else ())
            assert_close(got[0], expected[0], torch.float32, f"loss ({case})")
            assert got[1].dtype == dtype and got[2].dtype == dtype
            assert_close(got[1], expected[1], dtype, f"grad query ({case})")
            assert_close(got[2], expected[2], dtype, f"grad positive ({case})")


def test_reference_matches_the_explicit_formula():
    query, positive, queue = make(5, 40, 16)
    loss = lk.queue_contrastive_loss(query, positive, queue, temperature=0.1, reduction="none", backend="torch")
    assert_close(loss, explicit(query, positive, queue, 0.1), torch.float64)
    empty = queue[:0]
    assert torch.equal(lk.queue_contrastive_loss(query, positive, empty, reduction="none", backend="torch"),
                       torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("n,k,d", [(1, 0, 16), (1, 1, 16), (7, 1, 128), (7, 200, 256), (7, 2000 + 3, 16)])
@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_backend_matches_reference(backend, device, n, k, d):
    reductions = ("none",) if k > 1000 else REDUCTIONS
    check(backend, device, n, k, d, reductions)


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


@pytest.mark.parametrize("backend,device", FUSED)
def test_large_queue(backend, device):
    # DenseCL's K = 65536 (+ 3: a partial last tile).
    if _interpreted(backend, device):
        pytest.skip("too slow under the interpreter; K = 2003 covers a partial last tile there")
    check(backend, device, 33, 65536 + 3, 128, ("mean",), dtypes=[torch.float32, torch.bfloat16])


@pytest.mark.parametrize("backend,device", FUSED)
def test_many_rows(backend, device):
    # N past several row blocks, not a multiple of any block size (small under the interpreter).
    if _interpreted(backend, device):
        check(backend, device, 1569, 70, 16, ("mean",), dtypes=[torch.float32])
    else:
        check(backend, device, 1569, 300, 128, ("mean",))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="extension built without the CPU kernel")
@pytest.mark.parametrize("n,k,d", [(1569, 2049, 256), (5, 1500, 40), (3, 7, 300)])
def test_cpu_kernel_many_rows_and_any_dim(n, k, d):
    check("cpu", "cpu", n, k, d, ("mean",), dtypes=[torch.float32, torch.bfloat16])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_queue_gives_zero_loss_and_gradients(backend, device):
    query, positive, queue = (t.float().to(device) for t in make(4, 0, 16))
    loss, grad_query, grad_positive = loss_and_grads(backend, query, positive, queue, "none")
    assert torch.equal(loss.cpu(), torch.zeros(4))
    assert not grad_query.any() and not grad_positive.any()


@pytest.mark.parametrize("backend,device", FUSED)
def test_transposed_queue_is_read_in_place(backend, device):
    n, k, d = 9, 3000, 16
    query, positive, buffer_t = (t.float().to(device) for t in make(n, k, d))
    assert buffer_t.stride() == (1, k)
    contiguous = buffer_t.contiguous()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        got = lk.queue_contrastive_loss(query, positive, buffer_t, reduction="none", backend=backend)
    # No op copies the whole queue: copies (of a tile at most) never see a (K, D) or (D, K) input.
    copying = ("aten::contiguous", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::to")
    whole = ([k, d], [d, k])
    copies = [e.name for e in prof.events() if e.name in copying and any(s in whole for s in e.input_shapes)]
    assert not copies, f"the queue was copied: {copies}"
    expected = lk.queue_contrastive_loss(query, positive, contiguous, reduction="none", backend=backend)
    assert_close(got, expected.double(), torch.float32)


@pytest.mark.parametrize("backend,device", FUSED)
def test_other_strides(backend, device):
    # Every input a strided view: rows with a stride, and query with stride 2 along D.
    n, k, d = 6, 70, 16
    query, positive, queue = make(n, k, d)
    wide_query = torch.zeros(n, 2 * d, dtype=torch.float64)
    wide_query[:, ::2] = query
    positive_rows = torch.cat([positive, positive], 1)[:, d:]
    queue_rows = torch.stack([queue, queue], 1).reshape(2 * k, d)[::2]
    for args in ((wide_query[:, ::2], positive_rows, queue_rows), (query, positive, queue)):
        got = lk.queue_contrastive_loss(*(t.float().to(device) for t in args), reduction="none", backend=backend)
        assert_close(got, explicit(query, positive, queue, 0.2), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stable_at_temperature_0_005(backend, device):
    # Unit vectors, positives and every 7th negative close to their query: logits up to 200,
    # where exp overflows float32 (and float16) and the textbook softmax fails.
    n, k, d, t = 40, 3000, 16 if _interpreted(backend, device) else 128, 0.005
    query, _, queue = make(n, k, d, seed=3)
    g = torch.Generator().manual_seed(4)
    positive = F.normalize(query + 0.02 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    queue = queue.contiguous()
    queue[::7] = F.normalize(query.repeat(k // n + 1, 1)[:k:7] + 0.02 * queue[::7], dim=1)
    assert torch.exp(torch.tensor(float((query * positive).sum(1).max()) / t, dtype=torch.float32)).isinf()
    for dtype in _dtypes(backend, device):
        q, p, negatives = (x.to(dtype) for x in (query, positive, queue))
        expected = explicit(q.double(), p.double(), negatives.double(), t)
        assert expected.min() > 1  # the near negatives compete with the positive: no trivial zero loss
        got, grad_query, grad_positive = loss_and_grads(backend, q.to(device), p.to(device), negatives.to(device),
                                                        "none", t)
        assert torch.isfinite(got).all() and torch.isfinite(grad_query).all() and torch.isfinite(grad_positive).all()
        # A logit of 200 carries float32 rounding of about 200 * 6e-8 per dot product.
        assert (got.cpu().double() - expected).abs().max() < 1e-3, dtype
        ref_query, ref_positive = loss_and_grads("torch", q.double(), p.double(), negatives.double(), "none", t)[1:]
        # Gradients scale with 1 / T = 200.
        atol, rtol = TOLERANCES[dtype]
        for got_grad, ref in ((grad_query, ref_query), (grad_positive, ref_positive)):
            assert ((got_grad.cpu().double() - ref).abs() <= 200 * atol + rtol * ref.abs()).all(), dtype


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_queue_gets_no_gradient_and_inputs_are_not_written(backend, device):
    query, positive, queue = (t.float().to(device).requires_grad_() for t in make(5, 30, 16))
    before = [t.detach().clone() for t in (query, positive, queue)]
    lk.queue_contrastive_loss(query, positive, queue, backend=backend).backward()
    assert queue.grad is None and query.grad is not None and positive.grad is not None
    for t, old in zip((query, positive, queue), before):
        assert torch.equal(t.detach(), old)


@pytest.mark.parametrize("backend,device", FUSED)
def test_without_gradient_the_same_loss(backend, device):
    query, positive, queue = (t.float().to(device) for t in make(7, 100, 16))
    with torch.no_grad():
        plain = OPERATORS[backend](query, positive, queue, 5.0, False)
    loss, weighted = OPERATORS[backend](query, positive, queue, 5.0, True)
    assert plain[1].shape == (0, 16) and weighted.shape == (7, 16)
    assert torch.equal(plain[0], loss)
    # weighted is the softmax-weighted sum of the queue rows, p_0 left out.
    logits = torch.cat([(query * positive).sum(1, keepdim=True), query @ queue.t()], 1).double() * 5.0
    assert_close(weighted, logits.softmax(1)[:, 1:] @ queue.double(), torch.float32)


def test_float64_gradcheck_of_the_reference():
    query, positive, queue = (t.requires_grad_() for t in make(3, 5, 4))
    for reduction in REDUCTIONS:
        torch.autograd.gradcheck(lambda q, p: lk.queue_contrastive_loss(q, p, queue, temperature=0.3,
                                                                        reduction=reduction, backend="torch"),
                                 (query, positive))


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("backend,device", FUSED)
def test_opcheck(backend, device, with_grad):
    query, positive, queue = (t.float().to(device) for t in make(10, 70, 16))
    query, positive = query.requires_grad_(with_grad), positive.requires_grad_(with_grad)
    torch.library.opcheck(OPERATORS[backend].default, (query, positive, queue, 5.0, with_grad))


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="extension built without the CPU kernel")
def test_cpu_result_does_not_depend_on_the_thread_count():
    query, positive, queue = (t.float() for t in make(300, 2500, 64, seed=4))
    weights = torch.rand(300, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(loss_and_grads("cpu", query, positive, queue, "none", weights=weights))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_default_backend_on_cpu_tensors():
    query, positive, queue = (t.float() for t in make(3, 8, 16))
    expected = lk.queue_contrastive_loss(query, positive, queue, backend="torch")
    assert_close(lk.queue_contrastive_loss(query, positive, queue), expected.double(), torch.float32)
    # float64 runs on the reference only: None falls back to it, a named kernel refuses.
    lk.queue_contrastive_loss(query.double(), positive.double(), queue.double())
    if HAS_CPU_KERNEL:
        with pytest.raises(RuntimeError, match="dtype torch.float64 runs on the 'torch' backend only"):
            lk.queue_contrastive_loss(query.double(), positive.double(), queue.double(), backend="cpu")


def _args(**changes):
    args = dict(query=torch.zeros(4, 8), positive=torch.zeros(4, 8), queue=torch.zeros(10, 8))
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,kind,match", [
    (dict(query=torch.zeros(4)), ValueError, r"query must have 2 dimensions \(N, D\), got shape \(4\)"),
    (dict(positive=torch.zeros(4, 8, 1)), ValueError, r"positive must have 2 dimensions"),
    (dict(queue=torch.zeros(10)), ValueError, r"queue must have 2 dimensions \(K, D\)"),
    (dict(positive=torch.zeros(5, 8)), ValueError, r"positive must have the shape of query \(4, 8\), got \(5, 8\)"),
    (dict(positive=torch.zeros(4, 7)), ValueError, r"positive must have the shape of query"),
    (dict(queue=torch.zeros(10, 7)), ValueError, r"queue must be \(K, D=8\) like query, got \(10, 7\)"),
    (dict(query=torch.zeros(0, 8), positive=torch.zeros(0, 8)), ValueError, "N of zero rows"),
    (dict(query=torch.zeros(4, 0), positive=torch.zeros(4, 0), queue=torch.zeros(10, 0)), ValueError,
     "feature dim D of zero"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-0.2), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=True), ValueError, "temperature"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(positive=torch.zeros(4, 8, dtype=torch.float16)), TypeError, "share one dtype"),
    (dict(queue=torch.zeros(10, 8, dtype=torch.bfloat16)), TypeError, "share one dtype"),
    (dict(query=torch.zeros(4, 8, dtype=torch.int64)), TypeError, r"query must have dtype in"),
    (dict(query=[[0.0]]), TypeError, "query must be a torch.Tensor"),
    (dict(queue=torch.zeros(10, 8, device="meta")), ValueError, "queue is on meta but query is on cpu"),
    (dict(backend="gpu"), ValueError, "backend must be None or one of"),
    (dict(backend="cuda"), ValueError, "backend 'cuda' is not implemented|cannot run"),
])
def test_errors(changes, kind, match):
    args = _args(**changes)
    with pytest.raises((kind, RuntimeError) if "backend" in changes else kind, match=match):
        lk.queue_contrastive_loss(args.pop("query"), args.pop("positive"), args.pop("queue"), **args)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="extension built without the CPU kernel")
@pytest.mark.parametrize("args,kind,match", [
    ((torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(10, 7)), ValueError, r"queue must be \(K, D\) with D = 8"),
    ((torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.float16), torch.zeros(10, 8)), TypeError,
     "query, positive and queue must share one dtype"),
    ((torch.zeros(4, 8, dtype=torch.float64),) * 3, TypeError, "query must be float32, float16 or bfloat16"),
])
def test_cpp_operator_errors(args, kind, match):
    # The C++ kernel's own checks, below the Python validation: a ValueError or TypeError naming
    # the operator and backend.
    with pytest.raises(kind, match=rf"loca_kernels\.{OPERATOR} \(cpu\): {match}"):
        getattr(torch.ops.loca_kernels, OPERATOR)(*args, 10.0, False)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")
def test_triton_kernel_compiles_for_a_gpu():
    # The interpreter runs Python (and multiplies in fp32), not Triton's compiler: every variant
    # the host launches is also compiled for sm_90 (no GPU needed).
    compile_for_gpu("""
        import itertools
        from loca_kernels.contrastive.triton import BLOCK_K, BLOCK_N, _forward_kernel as kernel

        # Every dtype at DenseCL's D = 128 with and without the gradient's accumulator; the
        # smallest and largest D blocks in bf16 (each compile takes tens of seconds).
        variants = list(itertools.product(("fp32", "fp16", "bf16"), (128,), (True, False)))
        for dtype, block_d, with_grad in variants + [("bf16", 16, True), ("bf16", 256, True)]:
            types = {param.name: "i32" for param in kernel.params if not param.is_constexpr}
            types.update(query="*" + dtype, positive="*" + dtype, queue="*" + dtype, loss="*fp32",
                         weighted="*fp32", inv_temperature="fp32")
            constexprs = dict(BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=block_d, WITH_GRAD=with_grad, DOT_FP32=False)
            compile_triton_kernel(kernel, types, constexprs, options={"enable_fp_fusion": True})
    """)


# ---- NaN and infinities (SPEC.md section 5): a non-finite logit of a row (a -inf one
# included) makes its loss NaN; one in the queue makes every loss NaN.

# where: (tensor, index of the bad entry, rows whose loss is NaN). K = 70: entry 65 lies in
# the Triton kernel's second queue tile; row 5 past the first 4.
_NON_FINITE_CASES = {
    "query": ("query", (2, 3), [2]),
    "positive": ("positive", (5, 0), [5]),
    "queue-first-tile": ("queue", (3, 9), "all"),
    "queue-second-tile": ("queue", (65, 4), "all"),
}


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend,device,where,value",
                         non_finite_params(BACKENDS, {where: (where,) for where in _NON_FINITE_CASES}))
def test_non_finite_inputs_give_nan_losses(where, value, backend, device):
    query, positive, queue = (t.float() for t in make(7, 70, 16, seed=3, transposed=False))
    clean = lk.queue_contrastive_loss(query, positive, queue, reduction="none", backend="torch")
    name, index, rows = _NON_FINITE_CASES[where]
    {"query": query, "positive": positive, "queue": queue}[name][index] = value
    expected = torch.zeros(7, dtype=torch.bool)
    expected[rows if rows != "all" else slice(None)] = True
    inputs = [t.to(device) for t in (query, positive, queue)]
    got = lk.queue_contrastive_loss(*inputs, reduction="none", backend=backend).cpu()
    assert torch.equal(got.isnan(), expected), f"{got}"
    assert torch.isfinite(got[~expected]).all()
    assert_close(got[~expected], clean[~expected], torch.float32)
    assert_close(got, lk.queue_contrastive_loss(query, positive, queue, reduction="none", backend="torch"),
                 torch.float32)
    for reduction in ("mean", "sum"):
        assert lk.queue_contrastive_loss(*inputs, reduction=reduction, backend=backend).isnan()


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_finite_inputs_with_an_empty_queue_or_half_precision(value, backend, device):
    query, positive, queue = (t.float() for t in make(4, 20, 16, seed=4))
    query[1, 0] = value
    got = lk.queue_contrastive_loss(query.to(device), positive.to(device), queue[:0].to(device), reduction="none",
                                    backend=backend).cpu()
    assert torch.equal(got.isnan(), torch.tensor([False, True, False, False]))
    assert torch.all(got[~got.isnan()] == 0)
    got = lk.queue_contrastive_loss(query.half().to(device), positive.half().to(device), queue.half().to(device),
                                    reduction="none", backend=backend).cpu()
    assert torch.equal(got.isnan(), torch.tensor([False, True, False, False]))
