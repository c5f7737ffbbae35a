"""crop_features (SPEC.md section 7): roi_align semantics on hand-worked maps, GTSA's
roi_align-then-rotate pipeline, every backend against the reference, and the operators."""
import importlib.util
import math

import pytest
import torch

import loca_kernels as lk
from helpers import IGNORE_NUMPY_NAN_WARNINGS, assert_close, backend_params, compile_for_gpu, non_finite_params
from loca_kernels._backends import extension_has_kernel
from loca_kernels import geometry

ALL = backend_params("crop_features")
FUSED = backend_params("crop_features", reference=False)
HAS_CPU_KERNEL = extension_has_kernel("crop_features", "CPU")
TURNS = [(flip, k) for flip in (False, True) for k in range(4)]


def turned_params(triton_turns):
    """(backend, device, flip, k) of every backend and flip/turn; the Triton interpreter, which is
    slow, only takes `triton_turns` (test_matches_reference runs all eight there)."""
    return [pytest.param(*p.values, flip, k, marks=p.marks, id=f"{p.id}-{flip}-{k}") for p in ALL
            for flip, k in TURNS if p.id != "triton-cpu" or (flip, k) in triton_turns]


def crop(features, view_box, regions, out_size, backend="torch", flip=False, k=0, **kw):
    """crop_features of one view (M = 1) with the given flip and turn."""
    name, device = backend if isinstance(backend, tuple) else (backend, "cpu")
    return lk.crop_features(features[None].to(device), torch.tensor([view_box], device=device),
                            torch.tensor([regions], dtype=torch.float32, device=device), out_size,
                            view_flip=torch.tensor([flip], device=device), view_rot90=torch.tensor([k], device=device),
                            backend=name, **kw)[0].cpu()


def seen(u: torch.Tensor, flip: bool, k: int) -> torch.Tensor:
    """The map the network sees of a crop whose map in its own orientation is u: flip, then turn."""
    return torch.rot90(u.flip(-1) if flip else u, k, dims=(-2, -1))


@pytest.mark.parametrize("backend,device,flip,k", turned_params([(True, 1)]))
def test_hand_worked_roi_align(backend, device, flip, k):
    # u = [[1, 2], [3, 4]]; the view box (0, 0, 2, 2) makes source and pixel coordinates equal.
    u = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    f = seen(u, flip, k)
    one = lambda region, size=(1, 1), **kw: crop(f, (0.0, 0.0, 2.0, 2.0), [region], size, (backend, device),  # noqa: E731
                                                 flip, k, **kw)[0, 0].tolist()
    # Aligned: the box (0, 0, 2, 2) spans pixel centres -0.5 .. 1.5; one bin, 2 x 2 samples on the
    # pixel centres: the mean 2.5.
    assert one((0, 0, 2, 2)) == [[2.5]]
    # One-pixel boxes sample one pixel centre; the last row and column stand for y, x >= 1.
    assert one((0, 0, 1, 1)) == [[1.0]]
    assert one((1, 1, 2, 2)) == [[4.0]]
    # Halfway between the four centres.
    assert one((0.5, 0.5, 1.5, 1.5)) == [[2.5]]
    # Sticking out on the right: x = 1 and 2 read the last column (x <= W is still inside),
    # x = 3 is outside the map: 0.
    assert one((1, 0, 3, 1), (1, 2)) == [[2.0, 2.0]]
    assert one((2, 0, 4, 1), (1, 2)) == [[2.0, 0.0]]
    # Sticking out on the left: x = -1 is clamped to 0; x = -1.5 lies outside.
    assert one((-1, 0, 0, 1)) == [[1.0]]
    assert one((-1.5, 1, -0.5, 2)) == [[0.0]]
    # Fixed sampling: 2 x 2 samples at 0.25 and 0.75 of the pixel (0, 0)-(1, 1) box.
    assert one((0.5, 0.5, 1.5, 1.5), sampling_ratio=2) == [[2.5]]
    # A zero-size region has no adaptive sample: 0; a negative one too.
    assert one((1, 1, 1, 1)) == [[0.0]]
    assert one((1.5, 1.5, 0.5, 0.5)) == [[0.0]]
    # Rows run down and columns right as in the source whatever the flip and turn.
    assert one((0, 0, 2, 2), (2, 2)) == [[1.0, 2.0], [3.0, 4.0]]


def test_view_box_scales_into_pixels():
    # View (10, 20, 14, 24) on a 2 x 2 map: a pixel is 2 source units.
    u = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert crop(u, (10.0, 20.0, 14.0, 24.0), [(10, 20, 12, 22)], (1, 1))[0, 0].item() == 1.0
    assert crop(u, (10.0, 20.0, 14.0, 24.0), [(11, 21, 13, 23)], (1, 1))[0, 0].item() == 2.5


def roi_align_literal(u, box, out_size, sampling_ratio=-1):
    """torchvision's roi_align (aligned=True, spatial_scale=1) of u (C, H, W), one scalar at a
    time in Python floats (float64): independent of the reference's code."""
    c, height, width = u.shape
    oh, ow = out_size
    x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
    bh, bw = (y1 - y0) / oh, (x1 - x0) / ow
    gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil((y1 - y0) / oh), 0)
    gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil((x1 - x0) / ow), 0)
    out = torch.zeros(c, oh, ow, dtype=torch.float64)
    for ph in range(oh):
        for pw in range(ow):
            total = torch.zeros(c, dtype=torch.float64)
            for iy in range(gh):
                y = y0 + ph * bh + (iy + 0.5) * bh / gh
                for ix in range(gw):
                    x = x0 + pw * bw + (ix + 0.5) * bw / gw
                    if y < -1 or y > height or x < -1 or x > width:
                        continue
                    yy, xx = max(y, 0.0), max(x, 0.0)
                    yl, xl = int(yy), int(xx)
                    yh, xh = yl + 1, xl + 1
                    if yl >= height - 1:
                        yl = yh = height - 1
                        yy = float(yl)
                    if xl >= width - 1:
                        xl = xh = width - 1
                        xx = float(xl)
                    ly, lx = yy - yl, xx - xl
                    total += ((1 - ly) * (1 - lx) * u[:, yl, xl] + (1 - ly) * lx * u[:, yl, xh]
                              + ly * (1 - lx) * u[:, yh, xl] + ly * lx * u[:, yh, xh])
            out[:, ph, pw] = total / max(gh * gw, 1)
    return out


def rotate_box(box, k, size):
    """GTSA's rotate_bbox: a box in a (size x size) crop after rotating the crop by 90 * k
    degrees counter-clockwise (torchvision's F.rotate, which is torch.rot90(k))."""
    x0, y0, x1, y1 = box
    for _ in range(k):
        x0, y0, x1, y1 = y0, size - x1, y1, size - x0
    return x0, y0, x1, y1


def test_gtsa_roi_align_then_rotate():
    # GTSA pools the turned view over the turned intersection box, then rotates the pooled map
    # back: for quarter turns this equals pooling the unturned crop, as crop_features does.
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(2, 6, 6, generator=gen, dtype=torch.float64)
    view_box = (4.0, 8.0, 16.0, 20.0)                         # 12 source units = 6 pixels
    regions = [(5.3, 9.1, 13.7, 15.2), (3.0, 12.5, 9.5, 22.0)]  # the second sticks out
    for k in range(4):
        f = seen(u, False, k)
        ours = crop(f, view_box, regions, (4, 4), "torch", False, k)
        for r, region in enumerate(regions):
            pixels = [(v - o) / 2 for v, o in zip(region, view_box[:2] * 2)]
            gtsa = torch.rot90(roi_align_literal(f, rotate_box(pixels, k, 6), (4, 4)), -k, dims=(-2, -1))
            # float32 tolerance: crop_features places its samples in float32, the transcription in float64.
            assert_close(ours[r], gtsa, torch.float32, name=f"k={k} region {r}")


def test_reference_matches_literal_roi_align():
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    view_box = (0.0, 0.0, 7.0, 5.0)
    regions = [(1.3, 0.4, 5.9, 3.3), (-2.2, 3.1, 2.4, 7.9), (6.5, -3.0, 12.0, 1.0), (0.2, 0.3, 0.5, 0.45)]
    for sampling_ratio in (-1, 3):
        ours = crop(u, view_box, regions, (3, 2), sampling_ratio=sampling_ratio)
        for r, region in enumerate(regions):
            assert_close(ours[r], roi_align_literal(u, region, (3, 2), sampling_ratio), torch.float32)


def test_reference_matches_torchvision():
    tv = pytest.importorskip("torchvision", reason="torchvision does not import beside the CPU torch 2.13 build")
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(3, 6, 9, generator=gen)
    regions = torch.tensor([[1.3, 0.4, 5.9, 3.3], [-2.2, 3.1, 2.4, 7.9], [6.5, -3.0, 12.0, 1.0]])
    for sampling_ratio in (-1, 2):
        ours = crop(u, (0.0, 0.0, 9.0, 6.0), regions.tolist(), (4, 3), sampling_ratio=sampling_ratio)
        theirs = tv.ops.roi_align(u[None], [regions], (4, 3), 1.0, sampling_ratio, aligned=True)
        assert_close(ours, theirs, torch.float32)


def random_case(m, r, c, h, w, gen, dtype=torch.float32):
    """Features of m views covering the 8 flip/turn combinations, regions inside, partly or wholly
    outside, tiny (< 1 px) and huge (10 x the view)."""
    features = torch.randn(m, c, h, w, generator=gen).to(dtype)
    x0, y0 = torch.rand(m, generator=gen) * 50, torch.rand(m, generator=gen) * 50
    size = 10 + torch.rand(m, 2, generator=gen) * 40
    views = torch.stack([x0, y0, x0 + size[:, 0], y0 + size[:, 1]], dim=1)
    # Region corners relative to the view: from 1.5 view sizes before it to 2.5 after.
    start = torch.rand(m, r, 2, generator=gen) * 2.5 - 1.0
    extent = torch.rand(m, r, 2, generator=gen) * 1.5
    extent[:, 0] = 0.01                              # tiny: a fraction of a pixel
    if r > 1:
        start[:, 1], extent[:, 1] = -4.5, 10.0       # huge: covers the view and far beyond
    lo = views[:, None, :2] + start * size[:, None]
    regions = torch.cat([lo, lo + extent * size[:, None]], dim=-1)
    flip = torch.arange(m) % 2 == 1
    turns = (torch.arange(m) // 2) % 4
    return features, views, regions, flip, turns


def run(backend, device, features, views, regions, flip, turns, out_size, grad=None, **kw):
    x = features.to(device).requires_grad_()
    out = lk.crop_features(x, views.to(device), regions.to(device), out_size, view_flip=flip.to(device),
                           view_rot90=turns.to(device), backend=backend, **kw)
    if grad is None:
        return out.cpu(), None
    out.backward(grad.to(device=device, dtype=out.dtype))
    return out.detach().cpu(), x.grad.cpu()


CASES = [  # (M, R, C, h, w, out_size): every flip and turn, non-square maps, out sizes 1x1 to 10x10
    (8, 3, 3, 5, 7, (3, 4)),
    (8, 1, 1, 6, 4, (1, 1)),
    (2, 2, 1, 14, 14, (10, 10)),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The Triton interpreter is slow: fewer views in the first case, one dtype in the first and last.
SLOW = {"triton-cpu": {0: 2}}


@pytest.mark.parametrize("backend,device,dtype,case", [
    pytest.param(*p.values, dtype, case, marks=p.marks, id=f"{p.id}-{str(dtype)[6:]}-{case}")
    for p in FUSED for dtype in DTYPES for case in range(len(CASES))
    if not (p.id == "triton-cpu" and case != 1 and dtype != torch.float32)])
def test_matches_reference(backend, device, dtype, case):
    m, r, c, h, w, out_size = CASES[case]
    m = SLOW.get(f"{backend}-{device}", {}).get(case, m)
    gen = torch.Generator().manual_seed(10 + case)
    inputs = random_case(m, r, c, h, w, gen, dtype)
    grad = torch.randn(m, r, c, *out_size, generator=gen)
    expected, expected_grad = run("torch", "cpu", inputs[0].double(), *inputs[1:], out_size, grad.double())
    out, grad_features = run(backend, device, *inputs, out_size, grad)
    assert out.dtype == dtype and grad_features.dtype == dtype
    assert_close(out, expected, dtype)
    # The gradient sums many products: compare it at the tolerance of its size.
    assert_close(grad_features, expected_grad, dtype, name="grad features")


@pytest.mark.parametrize("backend,device,c", [pytest.param(*p.values, 384, marks=p.marks, id=p.id) for p in FUSED]
                         + [pytest.param(*FUSED[0].values, 768, marks=FUSED[0].marks, id="cpu-cpu-768")])
def test_many_channels(backend, device, c):
    gen = torch.Generator().manual_seed(7)
    m, r, side = (2, 2, 6) if backend == "cpu" else (1, 1, 3)  # the Triton interpreter is slow
    inputs = random_case(m, r, c, side, side, gen)
    grad = torch.randn(m, r, c, 4, 4, generator=gen)
    expected, expected_grad = run("torch", "cpu", inputs[0].double(), *inputs[1:], (4, 4), grad.double())
    out, grad_features = run(backend, device, *inputs, (4, 4), grad)
    assert_close(out, expected, torch.float32)
    assert_close(grad_features, expected_grad, torch.float32, name="grad features")


@pytest.mark.parametrize("backend,device,flip,k", turned_params([(False, 2), (True, 3)]))
def test_turned_view_gives_the_same_crop(backend, device, flip, k):
    # The key property: a crop seen flipped and turned pools exactly like the crop seen plainly.
    gen = torch.Generator().manual_seed(8)
    u = torch.randn(3, 6, 9, generator=gen)
    view_box = (2.0, 1.0, 20.0, 13.0)
    regions = [(3.1, 2.2, 11.7, 9.9), (-4.0, 5.0, 8.0, 20.0), (19.0, 12.5, 19.3, 12.8)]
    plain = crop(u, view_box, regions, (3, 5), (backend, device))
    turned = crop(seen(u, flip, k), view_box, regions, (3, 5), (backend, device), flip, k)
    if backend == "torch":  # the reference turns the map back: the very same samples and sums
        assert torch.equal(plain, turned)
    else:  # the kernels sum over the map's rows or columns first depending on the turn
        assert_close(turned, plain, torch.float32)


def test_gradcheck_reference():
    gen = torch.Generator().manual_seed(9)
    features, views, regions, flip, turns = random_case(8, 2, 2, 3, 4, gen, torch.float64)
    x = features.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: lk.crop_features(t, views, regions, (2, 3), view_flip=flip, view_rot90=turns, backend="torch"),
        (x,), fast_mode=True)


@pytest.mark.skipif(not lk.backends()["cpu_kernels"], reason="the extension has no CPU kernels")
def test_cpu_float64_and_gradcheck():
    gen = torch.Generator().manual_seed(11)
    features, views, regions, flip, turns = random_case(8, 2, 2, 3, 4, gen, torch.float64)
    grad = torch.randn(8, 2, 2, 2, 3, generator=gen, dtype=torch.float64)
    expected = run("torch", "cpu", features, views, regions, flip, turns, (2, 3), grad)
    actual = run("cpu", "cpu", features, views, regions, flip, turns, (2, 3), grad)
    assert_close(actual[0], expected[0], torch.float64)
    assert_close(actual[1], expected[1], torch.float64, name="grad features")
    assert torch.autograd.gradcheck(
        lambda t: lk.crop_features(t, views, regions, (2, 3), view_flip=flip, view_rot90=turns, backend="cpu"),
        (features.clone().requires_grad_(),), fast_mode=True)


@pytest.mark.skipif(not lk.backends()["cpu_kernels"], reason="the extension has no CPU kernels")
def test_cpu_thread_count_independent_and_deterministic():
    gen = torch.Generator().manual_seed(12)
    inputs = random_case(8, 3, 40, 7, 5, gen)
    grad = torch.randn(8, 3, 40, 3, 3, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpu", "cpu", *inputs, (3, 3), grad)
    finally:
        torch.set_num_threads(threads)
    for _ in range(2):
        many = run("cpu", "cpu", *inputs, (3, 3), grad)
        assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("backend,device", FUSED)
def test_backward_deterministic(backend, device):
    backward = getattr(torch.ops.loca_kernels, "crop_features_backward" + ("_triton" if backend == "triton" else ""))
    gen = torch.Generator().manual_seed(13)
    _, views, regions, flip, turns = (t.to(device) for t in random_case(1, 2, 5, 4, 6, gen))
    grad = torch.randn(1, 2, 5, 2, 2, generator=gen).to(device)
    first, second = (backward(grad, views, regions, [4, 6], flip, turns, -1) for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend,device", FUSED)
def test_empty_regions_and_views(backend, device):
    features = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    views = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 2, device=device)
    out = lk.crop_features(features, views, torch.zeros(2, 0, 4, device=device), (2, 2), backend=backend)
    assert out.shape == (2, 0, 3, 2, 2)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))
    none = lk.crop_features(features[:0], views[:0], torch.zeros(0, 1, 4, device=device), (2, 2), backend=backend)
    assert none.shape == (0, 1, 3, 2, 2)


@pytest.mark.parametrize("backend,device", FUSED)
def test_opcheck_fused_operators(backend, device):
    suffix = "_triton" if backend == "triton" else ""
    forward = getattr(torch.ops.loca_kernels, "crop_features" + suffix)
    backward = getattr(torch.ops.loca_kernels, "crop_features_backward" + suffix)
    gen = torch.Generator().manual_seed(14)
    features, views, regions, flip, turns = (t.to(device) for t in random_case(1, 1, 2, 3, 4, gen))
    args = (features.requires_grad_(), views, regions, [2, 3], flip, turns, -1)
    torch.library.opcheck(forward.default, args)
    grad = torch.randn(1, 1, 2, 2, 3, generator=gen).to(device)
    torch.library.opcheck(backward.default, (grad, views, regions, [3, 4], flip, turns, 2))


def test_backend_none_falls_back_and_named_backend_explains():
    u = torch.randn(1, 2, 3, 3)
    views, regions = torch.tensor([[0.0, 0.0, 3.0, 3.0]]), torch.tensor([[[0.5, 0.5, 2.0, 2.5]]])
    assert_close(lk.crop_features(u, views, regions, (2, 2)),
                 lk.crop_features(u.double(), views, regions, (2, 2), backend="torch"))
    # No CUDA-extension kernel: the fused CUDA backend is Triton.
    with pytest.raises(ValueError, match="backend 'cuda' is not implemented"):
        lk.crop_features(u, views, regions, (2, 2), backend="cuda")


ERRORS = [  # (change of the good arguments, exception, words the message must contain)
    (dict(features=torch.randn(2, 3, 4)), ValueError, "features must have 4 dimensions"),
    (dict(features=torch.randn(2, 0, 4, 4)), ValueError, "feature dim C >= 1"),
    (dict(features=torch.randn(2, 3, 0, 4)), ValueError, "positive h and w"),
    (dict(features=torch.randn(2, 3, 4, 4).long()), TypeError, "features must have dtype"),
    (dict(view_boxes=torch.zeros(2, 3)), ValueError, "view_boxes must end in 4"),
    (dict(view_boxes=torch.zeros(3, 4) + torch.tensor([0.0, 0.0, 1.0, 1.0])), ValueError, "view_boxes must have M=2"),
    (dict(view_boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.0, 0.0, 2.0, 4.0]])), ValueError, "x1 > x0"),
    (dict(view_boxes=torch.zeros(2, 4, dtype=torch.long)), TypeError, "view_boxes must be a floating"),
    (dict(regions=torch.zeros(2, 4)), ValueError, "regions must have 3 dimensions"),
    (dict(regions=torch.zeros(2, 1, 5)), ValueError, "regions must be (M, R, 4)"),
    (dict(regions=torch.zeros(1, 1, 4)), ValueError, "regions must have M=2"),
    (dict(regions=torch.zeros(2, 1, 4, dtype=torch.int32)), TypeError, "regions must be a floating"),
    (dict(out_size=(0, 2)), ValueError, "out_size must have positive sides"),
    (dict(out_size=3), TypeError, "out_size must be a pair"),
    (dict(view_flip=torch.tensor([0, 1])), TypeError, "view_flip must be a bool"),
    (dict(view_flip=torch.tensor([True])), ValueError, "view_flip must have shape (2,)"),
    (dict(view_rot90=torch.tensor([0, 4])), ValueError, "view_rot90 values must be in 0..3"),
    (dict(view_rot90=torch.tensor([0.0, 1.0])), TypeError, "view_rot90 must be an integer"),
    (dict(sampling_ratio=0), ValueError, "sampling_ratio must be -1"),
    (dict(sampling_ratio=-2), ValueError, "sampling_ratio must be -1"),
    (dict(sampling_ratio=1.5), TypeError, "sampling_ratio must be an int"),
    # Bounded work and finite view boxes (SPEC.md section 7).
    (dict(sampling_ratio=257), ValueError, "sampling_ratio must be -1 (adaptive) or in .1, 256., got 257"),
    (dict(sampling_ratio=10**12), ValueError, "sampling_ratio must be -1 (adaptive) or in .1, 256."),
    (dict(regions=torch.tensor([[[0.0, 0, 1, 1]], [[0.0, 0, 1e6, 2]]])), ValueError,
     "regions.1, 0. = .0.0, 0.0, 1000000.0, 2.0. is too large for its view with sampling_ratio=-1"),
    (dict(regions=torch.tensor([[[0.0, 0, 1, 1]], [[0.0, -1e12, 1, 1e12]]])), ValueError, "more than 256 samples"),
    (dict(regions=torch.tensor([[[0.0, 0, 1, 1e38]], [[0.0, 0, 1, 1]]])), ValueError, "regions.0, 0. = "),
    (dict(view_boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, float("nan"), 4.0, 4.0]])), ValueError,
     "every coordinate of view_boxes must be finite"),
    (dict(view_boxes=torch.tensor([[0.0, 0.0, float("inf"), 4.0], [0.0, 0, 4.0, 4.0]])), ValueError,
     "view_boxes must be finite"),
    (dict(backend="nope"), ValueError, "backend must be None or one of"),
]


@pytest.mark.parametrize("change,error,words", ERRORS, ids=[e[2] for e in ERRORS])
def test_errors(change, error, words):
    args = dict(features=torch.randn(2, 3, 4, 4), view_boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 2),
                regions=torch.zeros(2, 1, 4), out_size=(2, 2))
    args.update(change)
    with pytest.raises(error, match="crop_features: .*" + words.replace("(", r"\(").replace(")", r"\)")):
        lk.crop_features(**args)


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="extension built without the CPU kernel")
@pytest.mark.parametrize("operator,first,regions,size,kind,match", [
    ("crop_features", torch.zeros(2, 3, 4, 4, dtype=torch.int32), torch.zeros(2, 1, 4), [2, 2], TypeError,
     "features must be float32, float64, float16 or bfloat16, got Int"),
    ("crop_features", torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 5), [2, 2], ValueError,
     r"regions must be \(M, R, 4\) with M = 2, got \[2, 1, 5\]"),
    ("crop_features_backward", torch.zeros(2, 1, 3, 2, 2), torch.zeros(2, 3, 4), [4, 4], ValueError,
     "regions must have R = 1 regions like grad_out, got 3"),
])
def test_cpp_operator_errors(operator, first, regions, size, kind, match):
    # The C++ kernel's own checks, below the Python validation: a ValueError or TypeError naming
    # the operator and backend.
    views = torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 2)
    flip, turns = torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(kind, match=rf"loca_kernels\.{operator} \(cpu\): {match}"):
        getattr(torch.ops.loca_kernels, operator)(first, views, regions, size, flip, turns, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_errors_different_devices():
    with pytest.raises(ValueError, match="regions is on cpu"):
        lk.crop_features(torch.randn(1, 2, 3, 3, device="cuda"), torch.tensor([[0.0, 0.0, 1.0, 1.0]], device="cuda"),
                         torch.zeros(1, 1, 4), (1, 1))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_compile_for_sm90():
    compile_for_gpu("""
        import itertools
        from loca_kernels.crop import triton as crop_triton

        INTS = ("regions", "channels", "h", "w", "oh", "ow", "sampling_ratio")
        for kernel, (h, w, oh, ow), dtype in itertools.product(
                (crop_triton._forward_kernel, crop_triton._backward_kernel),
                ((14, 14, 10, 10),), ("fp16", "bf16", "fp32")):  # GTSA's 6 x 6 maps use the same tiles
            types = {"view_boxes": "*fp32", "regions_ptr": "*fp32", "view_flip": "*i8", "view_rot90": "*i32"}
            types.update({name: "i32" for name in INTS})
            types.update({name: "*" + dtype for name in ("features", "out", "grad_out", "grad")})
            compile_triton_kernel(kernel, types, crop_triton.block_sizes(h, w, oh, ow),
                                  options=crop_triton.COMPILE_OPTIONS)
    """)


# GTSA helpers: view geometry and the rotation head.

def test_intersection_boxes():
    a = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[2.0, 1.0, 6.0, 3.0], [2.0, 2.0, 3.0, 3.0], [2.0, 0.0, 3.0, 2.0]])
    boxes, overlaps = geometry.intersection_boxes(a, b)
    assert boxes.tolist() == [[2, 1, 4, 3], [2, 2, 1, 1], [2, 0, 2, 2]]
    assert overlaps.tolist() == [True, False, False]  # touching edges have no area
    boxes, overlaps = geometry.intersection_boxes(a[:, None], b[None])  # broadcast: all pairs
    assert boxes.shape == (3, 3, 4) and overlaps.diagonal().tolist() == [True, False, False]


def test_sample_boxes_with_min_overlap():
    gen = torch.Generator().manual_seed(0)
    size = (120, 160)
    globals_ = geometry.sample_boxes(256, 2, size, (0.25, 1.0), generator=gen)
    plain = geometry.sample_boxes(256, 8, size, (0.05, 0.25), generator=torch.Generator().manual_seed(1))
    local = geometry.sample_boxes(256, 8, size, (0.05, 0.25), generator=torch.Generator().manual_seed(1),
                                  overlap_with=globals_, min_overlap=0.01, tries=50)
    boxes, _ = geometry.intersection_boxes(local[:, :, None], globals_[:, None])
    area = (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)
    assert bool((area > 0.01 * 120 * 160).all())
    plain_boxes, _ = geometry.intersection_boxes(plain[:, :, None], globals_[:, None])
    plain_area = ((plain_boxes[..., 2] - plain_boxes[..., 0]).clamp_min(0) *
                  (plain_boxes[..., 3] - plain_boxes[..., 1]).clamp_min(0))
    assert not bool((plain_area > 0.01 * 120 * 160).all())  # the requirement is not met by chance
    # Sizes still in range; with an impossible requirement every view takes the central fallback.
    fraction = (local[..., 2] - local[..., 0]) * (local[..., 3] - local[..., 1]) / (120 * 160)
    assert bool((fraction >= 0.05 - 1e-6).all() and (fraction <= 0.25 + 1e-6).all())
    never = geometry.sample_boxes(2, 3, size, (0.05, 0.25), generator=gen, overlap_with=globals_[:2],
                                  min_overlap=1.0, tries=3)
    assert torch.equal(never, geometry.sample_boxes(2, 3, (120, 160), (0.05, 0.25), tries=0))
    with pytest.raises(ValueError, match="overlap_with must be"):
        geometry.sample_boxes(2, 3, size, (0.05, 0.25), overlap_with=torch.zeros(3, 4))


def test_sample_rotations_seeded_and_uniform():
    turns = geometry.sample_rotations(1000, 4, generator=torch.Generator().manual_seed(0))
    assert turns.dtype == torch.int64 and turns.shape == (1000, 4)
    assert torch.equal(turns, geometry.sample_rotations(1000, 4, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(turns.flatten(), minlength=4)
    assert counts.min() > 900 and counts.max() < 1100


def test_rotation_predictor_is_gtsas_head():
    torch.manual_seed(0)
    head = lk.RotationPredictor(24, hidden_dim=32, bottleneck_dim=8)
    # GTSA's rot_predictor layout, layer for layer, so its state_dict loads as is.
    gtsa = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                               torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.GELU(),
                               torch.nn.Linear(32, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    for p in gtsa.parameters():
        torch.nn.init.normal_(p)
    head.load_state_dict(gtsa.state_dict())
    tokens = torch.randn(5, 7, 24)
    logits = head(tokens)
    assert logits.shape == (5, 4)
    assert_close(logits, gtsa(tokens.mean(dim=1)), torch.float32)
    assert_close(head(tokens[:, torch.randperm(7)]), logits, torch.float32)  # a mean over the tokens


# ---- NaN and infinities (SPEC.md section 7): a non-finite feature value makes NaN exactly the
# bins that give its pixel a nonzero weight; a non-finite region coordinate its whole result.



def _non_finite_problem():
    """Two 6 x 6 views, the second flipped and turned once. Region (1, 1, 3, 3) of view 0 puts
    its samples on pixels (x = 1, 2): their other corner (2, 3) has weight 0."""
    g = torch.Generator().manual_seed(7)
    features = torch.randn(2, 3, 6, 6, generator=g)
    args = dict(view_boxes=torch.tensor([[0.0, 0.0, 6.0, 6.0], [1.0, 1.0, 7.0, 7.0]]),
                regions=torch.tensor([[[1.0, 1.0, 3.0, 3.0], [2.2, 0.5, 5.1, 4.7]],
                                      [[1.5, 1.5, 5.0, 6.0], [3.0, 2.0, 6.5, 4.0]]]),
                out_size=(2, 2), view_flip=torch.tensor([False, True]), view_rot90=torch.tensor([0, 1]))
    return features, args


def _run(features, args, backend, device, **kw):
    moved = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    return lk.crop_features(features.to(device), **moved, backend=backend, **kw).cpu()


# (pixel (m, c, i, j) of features, sampling_ratio)
_FEATURE_CASES = {
    "zero-weight-corner": ((0, 1, 1, 3), -1),
    "inside": ((0, 1, 2, 2), -1),
    "inside-2-samples": ((0, 1, 2, 2), 2),
    "outside-every-region": ((0, 0, 5, 0), -1),
    "turned-view": ((1, 2, 2, 4), -1),
    "turned-view-2-samples": ((1, 2, 2, 4), 2),
    "turned-corner": ((1, 0, 0, 0), -1),
}


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend,device,pixel,sampling_ratio,value", non_finite_params(ALL, _FEATURE_CASES))
def test_non_finite_features_give_nan_where_weighted(pixel, value, sampling_ratio, backend, device):
    features, args = _non_finite_problem()
    clean = _run(features, args, "torch", "cpu", sampling_ratio=sampling_ratio)
    # The SPEC's pattern: the bins where a map that is 1 at the pixel (0 elsewhere) pools to nonzero.
    probe = torch.zeros_like(features)
    probe[pixel] = 1.0
    m, c = pixel[:2]
    expected = torch.zeros(clean.shape, dtype=torch.bool)
    expected[m, :, c] = _run(probe, args, "torch", "cpu", sampling_ratio=sampling_ratio)[m, :, c] != 0
    bad = features.clone()
    bad[pixel] = value
    got = _run(bad, args, backend, device, sampling_ratio=sampling_ratio)
    assert torch.equal(got.isnan(), expected), f"{int(got.isnan().sum())} NaN, expected {int(expected.sum())}"
    assert not got.isinf().any()
    assert_close(got[~expected], clean[~expected], torch.float32)
    reference = _run(bad, args, "torch", "cpu", sampling_ratio=sampling_ratio)
    assert torch.equal(reference.isnan(), expected)


def test_non_finite_feature_cases_cover_weighted_and_unweighted_pixels():
    # The zero-weight corner of region 0 and the pixel outside every region make nothing NaN in
    # view 0's first region; the pixel inside does (what the test above relies on).
    features, args = _non_finite_problem()
    nonzero = {}
    for pixel in [(0, 1, 1, 3), (0, 1, 2, 2), (0, 0, 5, 0)]:
        probe = torch.zeros_like(features)
        probe[pixel] = 1.0
        nonzero[pixel] = (_run(probe, args, "torch", "cpu") != 0).sum(dim=(2, 3, 4)).tolist()
    assert nonzero[(0, 1, 1, 3)][0][0] == 0 and nonzero[(0, 1, 2, 2)][0][0] > 0
    assert nonzero[(0, 0, 5, 0)] == [[0, 0], [0, 0]]


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend,device,coordinate,sampling_ratio,value", non_finite_params(ALL, {
    "x1": ((1, 0, 2), -1), "x1-2-samples": ((1, 0, 2), 2), "x0": ((0, 1, 0), -1), "y0-2-samples": ((0, 1, 1), 2)}))
def test_non_finite_region_gives_nan(coordinate, value, sampling_ratio, backend, device):
    features, args = _non_finite_problem()
    clean = _run(features, args, "torch", "cpu", sampling_ratio=sampling_ratio)
    args["regions"][coordinate] = value
    got = _run(features, args, backend, device, sampling_ratio=sampling_ratio)
    expected = torch.zeros(got.shape, dtype=torch.bool)
    expected[coordinate[:2]] = True
    assert torch.equal(got.isnan(), expected)
    assert_close(got[~expected], clean[~expected], torch.float32)
    assert torch.equal(_run(features, args, "torch", "cpu", sampling_ratio=sampling_ratio).isnan(), expected)


@IGNORE_NUMPY_NAN_WARNINGS
@pytest.mark.parametrize("backend,device", ALL)
def test_huge_region_with_a_fixed_sampling_ratio_is_quick(backend, device):
    # Fixed samples per bin: the work does not grow with the region (its samples lie outside: 0).
    features, args = _non_finite_problem()
    args["regions"][0, 1] = torch.tensor([0.0, 0.0, 1e12, 1e12])
    got = _run(features, args, backend, device, sampling_ratio=2)
    assert torch.isfinite(got).all()
    assert torch.all(got[0, 1] == 0)
