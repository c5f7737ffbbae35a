"""relative_position_targets, gather_at_targets and the view geometry against hand-worked
examples and the SPEC's definition."""
import numpy as np
import pytest
import torch

import loca_kernels as lk
from helpers import backend_params, compile_for_gpu
from loca_kernels._backends import TRITON_AVAILABLE
from loca_kernels import geometry

OP = "relative_position_targets"
# (backend, device) pairs: every backend on the device it runs on, the reference included.
ON_DEVICES = backend_params(OP) + [pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]
FUSED = backend_params(OP, reference=False)


@pytest.fixture(params=[pytest.param(p.values, marks=p.marks, id=p.id) for p in ON_DEVICES])
def backend(request):
    """(name, device) of one backend."""
    return request.param


def one(query_box, ref_box, query_grid=(2, 2), ref_grid=(4, 4), backend=("torch", "cpu"), **kw):
    name, device = backend
    kw = {key: t.to(device) if isinstance(t, torch.Tensor) else t for key, t in kw.items()}
    return lk.relative_position_targets(torch.tensor([[query_box]], dtype=torch.float32, device=device),
                                        torch.tensor([ref_box], dtype=torch.float32, device=device),
                                        query_grid, ref_grid, backend=name, **kw)[0, 0].tolist()


def test_hand_worked_example(backend):
    # Query crop (0, 0, 4, 4) on a 2x2 grid: centres (1, 1), (3, 1), (1, 3), (3, 3).
    # Reference crop (0, 0, 8, 8) on a 4x4 grid: patches of 2 px, so the centres fall in
    # columns 0, 1 of rows 0, 1: targets 0, 1, 4, 5.
    assert one((0, 0, 4, 4), backend=backend, ref_box=(0, 0, 8, 8)) == [0, 1, 4, 5]
    flag = torch.tensor([[True]])
    # Query flipped left-right: its columns swap.
    assert one((0, 0, 4, 4), backend=backend, ref_box=(0, 0, 8, 8), query_flip=flag) == [1, 0, 5, 4]
    # Reference flipped: column c becomes 3 - c.
    assert one((0, 0, 4, 4), backend=backend, ref_box=(0, 0, 8, 8), ref_flip=flag[0]) == [3, 2, 7, 6]
    # Query turned by rot90(k=1): [[0, 1], [4, 5]] -> [[1, 5], [0, 4]].
    assert one((0, 0, 4, 4), backend=backend, ref_box=(0, 0, 8, 8), query_rot90=torch.tensor([[1]])) == [1, 5, 0, 4]
    # Non-square grid, turned once: the crop's height is split into 3 rows before turning.
    # Crop (0, 0, 4, 6), un-turned grid 3x2: centres x in (1, 3), y in (1, 3, 5); reference
    # (0, 0, 8, 8) 4x4: [[0, 1], [4, 5], [8, 9]] turned -> [[1, 5, 9], [0, 4, 8]].
    assert one((0, 0, 4, 6), backend=backend, ref_box=(0, 0, 8, 8), query_grid=(2, 3),
               query_rot90=torch.tensor([[1]])) == [1, 5, 9, 0, 4, 8]
    # Turned three times, the first row of the result is the first column read upwards:
    # [[0, 1], [4, 5], [8, 9]] -> [[8, 4, 0], [9, 5, 1]].
    assert one((0, 0, 4, 6), backend=backend, ref_box=(0, 0, 8, 8), query_grid=(2, 3),
               query_rot90=torch.tensor([[3]])) == [8, 4, 0, 9, 5, 1]
    # Half a turn: [[0, 1], [4, 5]] -> [[5, 4], [1, 0]].
    assert one((0, 0, 4, 4), backend=backend, ref_box=(0, 0, 8, 8), query_rot90=torch.tensor([[2]])) == [5, 4, 1, 0]
    # Flip first, then turn once: [[1, 0], [5, 4]] -> [[0, 4], [1, 5]]; with the reference
    # flipped too, every column c becomes 3 - c: [[3, 7], [2, 6]].
    assert one((0, 0, 4, 4), backend=backend, ref_box=(0, 0, 8, 8), query_flip=flag,
               query_rot90=torch.tensor([[1]])) == [0, 4, 1, 5]
    assert one((0, 0, 4, 4), backend=backend, ref_box=(0, 0, 8, 8), query_flip=flag, ref_flip=flag[0],
               query_rot90=torch.tensor([[1]])) == [3, 7, 2, 6]


def test_half_open_boxes_and_patch_edges(backend):
    # Centre x = 1 on the reference's left edge: inside; x = 3 on a patch edge: the right patch.
    assert one((0, 0, 4, 4), backend=backend, ref_box=(1, 1, 9, 9)) == [0, 1, 4, 5]
    # Reference (0, 0, 3, 3) in 1 px patches: centre (1, 1) is patch (1, 1) = 4; centres with
    # x = 3 or y = 3 lie on its right/bottom edge: outside.
    assert one((0, 0, 4, 4), backend=backend, ref_box=(0, 0, 3, 3), ref_grid=(3, 3)) == [4, -1, -1, -1]
    # No overlap at all, with another ignore_index.
    assert one((0, 0, 4, 4), backend=backend, ref_box=(10, 10, 20, 20), ignore_index=-100) == [-100] * 4


def explicit_targets(qb, rb, qg, rg, qf, rf, qr, ignore_index=-1):
    """The SPEC's first definition, one patch at a time in float64 (independent of the reference)."""
    hq, wq = qg
    hr, wr = rg
    out = []
    for b in range(qb.shape[0]):
        for v in range(qb.shape[1]):
            k = int(qr[b, v])
            gh, gw = (hq, wq) if k % 2 == 0 else (wq, hq)
            x0, y0, x1, y1 = qb[b, v].double().tolist()
            cx = torch.tensor([[x0 + (c + 0.5) * ((x1 - x0) / gw) for c in range(gw)]] * gh, dtype=torch.float64)
            cy = torch.tensor([[y0 + (r + 0.5) * ((y1 - y0) / gh)] * gw for r in range(gh)], dtype=torch.float64)
            if qf[b, v]:
                cx, cy = cx.flip(1), cy.flip(1)
            cx, cy = cx.rot90(k, (0, 1)).flatten().tolist(), cy.rot90(k, (0, 1)).flatten().tolist()
            rx0, ry0, rx1, ry1 = rb[b].double().tolist()
            row_targets = []
            for x, y in zip(cx, cy):
                if rx0 <= x < rx1 and ry0 <= y < ry1:
                    col = min(int((x - rx0) * (wr / (rx1 - rx0))), wr - 1)
                    row = min(int((y - ry0) * (hr / (ry1 - ry0))), hr - 1)
                    col = wr - 1 - col if rf[b] else col
                    row_targets.append(row * wr + col)
                else:
                    row_targets.append(ignore_index)
            out.append(row_targets)
    return torch.tensor(out).reshape(qb.shape[0], qb.shape[1], -1)


@pytest.mark.parametrize("query_grid,ref_grid", [((6, 6), (14, 14)), ((2, 3), (5, 4)), ((1, 1), (1, 7))])
def test_random_boxes_flips_and_turns(query_grid, ref_grid, backend):
    gen = torch.Generator().manual_seed(1)
    b, v = 4, 6
    qb = geometry.sample_boxes(b, v, (97, 131), (0.001, 1.0), generator=gen) * 0.37  # tiny to huge
    rb = geometry.sample_boxes(b, 1, (97, 131), (0.2, 1.0), generator=gen)[:, 0] * 0.37
    qf, rf = geometry.sample_flips(b, v, generator=gen), geometry.sample_flips(b, 1, generator=gen)[:, 0]
    qr = torch.randint(0, 4, (b, v), generator=gen)
    name, device = backend
    got = lk.relative_position_targets(qb.to(device), rb.to(device), query_grid, ref_grid, query_flip=qf.to(device),
                                       ref_flip=rf.to(device), query_rot90=qr.to(device), backend=name).cpu()
    assert got.dtype == torch.int64 and got.shape == (b, v, query_grid[0] * query_grid[1])
    assert torch.equal(got, explicit_targets(qb, rb, query_grid, ref_grid, qf, rf, qr))
    assert (got != -1).any() and (got == -1).any()  # both cases were exercised


@pytest.mark.parametrize("backend,device", ON_DEVICES)
def test_centres_on_the_edges_of_reference_patches_of_any_width(backend, device):
    # Reference boxes of odd widths (patch sizes that are not dyadic fractions); each query box
    # is cut so that its 15 x 15 patch centres are the 15 x 15 patch corners of a 14 x 14
    # reference: the first on the box's left/top edge (inside), the last on its right/bottom
    # edge (outside), the others on patch edges, where one rounding more or less (a reciprocal
    # instead of a division, an FMA) changes the target.
    gen = torch.Generator().manual_seed(5)
    b, v = 6, 4
    corner = torch.rand(b, 2, generator=gen, dtype=torch.float64) * 50
    size = torch.randint(20, 400, (b, 2), generator=gen).double() / torch.tensor([7.0, 11.0])
    rb = torch.cat([corner, corner + size], dim=-1)
    patch = (size / 14)[:, None].expand(b, v, 2)
    start = corner[:, None] - patch / 2
    qb = torch.cat([start, start + 15 * patch], dim=-1)
    qf = torch.rand(b, v, generator=gen) < 0.5
    rf = torch.rand(b, generator=gen) < 0.5
    qr = torch.arange(b * v).reshape(b, v) % 4
    got = lk.relative_position_targets(*(t.to(device) for t in (qb, rb)), (15, 15), (14, 14),
                                       query_flip=qf.to(device), ref_flip=rf.to(device), query_rot90=qr.to(device),
                                       backend=backend)
    assert torch.equal(got.cpu(), explicit_targets(qb, rb, (15, 15), (14, 14), qf, rf, qr))
    assert (got == -1).float().mean() > 0.05 and (got != -1).float().mean() > 0.5


@pytest.mark.parametrize("query_size", [None, [16, 12]], ids=["centre", "scenic"])
@pytest.mark.parametrize("backend,device", FUSED)
def test_opcheck_fused_operators(backend, device, query_size):
    gen = torch.Generator().manual_seed(2)
    sampler = "rrc" if query_size is None else "tf"
    qb = geometry.sample_boxes(3, 2, (50, 60), (0.05, 0.5), generator=gen, sampler=sampler)
    rb = geometry.sample_boxes(3, 1, (50, 60), (0.3, 1.0), generator=gen, sampler=sampler)[:, 0]
    args = (qb, rb, [3, 2], [5, 4], torch.tensor([[True, False]] * 3), torch.tensor([False, True, False]),
            torch.tensor([[0, 1], [2, 3], [1, 0]]), -1, query_size)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    name = "relative_position_targets" + ("_triton" if backend == "triton" else "")
    torch.library.opcheck(getattr(torch.ops.loca_kernels, name).default, args)


@pytest.mark.parametrize("backend,device", [p for p in FUSED if p.values[0] == "cpu"])
def test_cpu_operator_checks_query_size(backend, device):
    boxes, ref = torch.zeros(1, 1, 4), torch.zeros(1, 4)
    flags = (torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"query_size must be None or \(rows, cols\) of positive pixels, got \[0, 4\]"):
        torch.ops.loca_kernels.relative_position_targets(boxes, ref, [2, 2], [2, 2], *flags, -1, [0, 4])


def test_cpu_backend_by_name_refuses_other_devices():
    boxes = torch.zeros(1, 1, 4, device="meta")
    with pytest.raises((RuntimeError, ValueError)):
        lk.relative_position_targets(boxes, torch.zeros(1, 4, device="meta"), (2, 2), (2, 2), backend="cpu")


@pytest.mark.parametrize("bad,kind,match", [
    (dict(query_grid=(0, 6)), ValueError, "query_grid must have positive sides"),
    (dict(ref_grid=(14,)), TypeError, "ref_grid must be a pair"),
    (dict(query_boxes=torch.tensor([[[4.0, 0, 4, 4]]])), ValueError, "x1 > x0"),
    (dict(ref_boxes=torch.tensor([[0.0, 5, 8, 5]])), ValueError, "x1 > x0 and y1 > y0"),
    # NaN and infinite boxes (SPEC.md "Errors"): an int64 target cannot be NaN.
    (dict(query_boxes=torch.tensor([[[0.0, float("nan"), 4, 4]]])), ValueError,
     "relative_position_targets: every coordinate of query_boxes must be finite"),
    (dict(query_boxes=torch.tensor([[[0.0, 0, float("inf"), 4]]])), ValueError, "query_boxes must be finite"),
    (dict(ref_boxes=torch.tensor([[float("-inf"), 0, 8, 8]])), ValueError, "ref_boxes must be finite"),
    (dict(ref_boxes=torch.tensor([[0.0, 0, 8, float("nan")]])), ValueError, "ref_boxes must be finite"),
    (dict(query_boxes=torch.zeros(1, 4)), ValueError, "query_boxes must have 3 dimensions"),
    (dict(ref_boxes=torch.tensor([[0.0, 0, 8, 8]] * 2)), ValueError, "B=1 rows"),
    (dict(query_boxes=torch.tensor([[[0, 0, 4, 4]]])), TypeError, "floating"),
    (dict(query_rot90=torch.tensor([[4]])), ValueError, "values must be in 0..3"),
    (dict(query_flip=torch.tensor([[1]])), TypeError, "query_flip must be a bool tensor"),
    (dict(ref_flip=torch.tensor([True, False])), ValueError, r"ref_flip must have shape \(1,\)"),
    (dict(ref_boxes=torch.tensor([[0.0, 0, 8, 8]], device="meta")), ValueError, "on meta"),
    (dict(ignore_index=-1.0), TypeError, "ignore_index must be an int"),
    (dict(rule="center"), ValueError, "rule must be one of 'centre', 'scenic', got 'center'"),
    (dict(rule="scenic"), ValueError, "rule='scenic' needs query_size"),
    (dict(query_size=(96, 96)), ValueError, "query_size is only used by rule='scenic'"),
    (dict(rule="scenic", query_size=(0, 96)), ValueError, "query_size must have positive sides"),
    (dict(rule="scenic", query_size=96), TypeError, r"query_size must be a pair of ints \(rows, cols\)"),
    (dict(rule="scenic", query_size=(96, 96), query_boxes=torch.tensor([[[0.0, 0, 4.5, 4]]])), ValueError,
     "needs integer boxes .* query_boxes has fractional"),
    (dict(rule="scenic", query_size=(96, 96), ref_boxes=torch.tensor([[0.0, 0.25, 8, 8]])), ValueError,
     "ref_boxes has fractional"),
])
def test_errors(bad, kind, match):
    args = dict(query_boxes=torch.tensor([[[0.0, 0, 4, 4]]]), ref_boxes=torch.tensor([[0.0, 0, 8, 8]]),
                query_grid=(2, 2), ref_grid=(4, 4))
    args.update(bad)
    with pytest.raises(kind, match=match):
        lk.relative_position_targets(args.pop("query_boxes"), args.pop("ref_boxes"), args.pop("query_grid"),
                                     args.pop("ref_grid"), **args)


def test_gather_at_targets_2d_and_3d_with_fill_and_gradient():
    values = torch.randn(2, 5, 3, requires_grad=True)
    targets = torch.tensor([[[0, 4, -1]], [[-1, 2, 2]]])
    got = lk.gather_at_targets(values, targets, fill=7.0)
    assert got.shape == (2, 1, 3, 3)
    assert torch.equal(got[0, 0, 1], values[0, 4]) and torch.equal(got[1, 0, 2], values[1, 2])
    assert (got[0, 0, 2] == 7).all() and (got[1, 0, 0] == 7).all()
    got.sum().backward()
    assert values.grad[1, 2].eq(2).all() and values.grad[0, 1].eq(0).all()
    assert values.grad[1, 0].eq(0).all()  # only ignored entries point there after masking
    flat = lk.gather_at_targets(values[..., 0], targets[:, 0])
    assert flat.shape == (2, 3) and flat[0, 2] == 0 and flat[1, 1] == values[1, 2, 0]
    # Another ignore_index, per-view targets (B, V, Nq) of 2-D values: [[0, 4, 0]], [[0, 2, 2]].
    per_view = lk.gather_at_targets(values[..., 0], targets.clamp(min=0), ignore_index=2, fill=-1.0)
    assert per_view.shape == (2, 1, 3) and per_view[1, 0, 1:].eq(-1).all()
    assert torch.equal(per_view[0, 0], values[0, [0, 4, 0], 0]) and per_view[1, 0, 0] == values[1, 0, 0]


def test_gather_at_targets_never_reads_values_on_the_host():
    # On the meta device any value-dependent host decision (a sync on a GPU) would fail.
    got = lk.gather_at_targets(torch.empty(64, 196, 4096, device="meta"),
                               torch.empty(64, 10, 36, dtype=torch.int64, device="meta"))
    assert got.shape == (64, 10, 36, 4096) and got.device.type == "meta"


@pytest.mark.parametrize("values,targets,kind,match", [
    (torch.zeros(2, 5, 3, 1), torch.zeros(2, 3, dtype=torch.int64), ValueError, "values must be"),
    (torch.zeros(2, 5), torch.zeros(3, 4, dtype=torch.int64), ValueError, "B=2"),
    (torch.zeros(2, 5), torch.zeros(2, 4), TypeError, "integer"),
])
def test_gather_at_targets_errors(values, targets, kind, match):
    with pytest.raises(kind, match=match):
        lk.gather_at_targets(values, targets)


def test_geometry_is_seeded_and_within_ranges():
    def draw():
        return geometry.sample_boxes(64, 9, (120, 160), (0.05, 0.32), generator=torch.Generator().manual_seed(3))
    boxes = draw()
    assert torch.equal(boxes, draw())
    x0, y0, x1, y1 = boxes.double().unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 160 + 1e-3).all() and (y1 <= 120 + 1e-3).all()
    area = (x1 - x0) * (y1 - y0) / (120 * 160)
    ratio = (x1 - x0) / (y1 - y0)
    assert area.min() >= 0.05 - 1e-4 and area.max() <= 0.32 + 1e-4
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    flips = geometry.sample_flips(1000, 2, generator=torch.Generator().manual_seed(0))
    assert 0.4 < flips.float().mean() < 0.6


def test_geometry_falls_back_to_a_central_crop():
    # A 1:10 image cannot hold a crop of 90% of its area with aspect ratio in [3/4, 4/3]:
    # the central crop of full height and the widest allowed ratio.
    boxes = geometry.sample_boxes(2, 1, (10, 100), (0.9, 1.0), generator=torch.Generator().manual_seed(0))
    x0, y0, x1, y1 = boxes[0, 0].tolist()
    assert (y0, y1) == (0.0, 10.0) and abs((x1 - x0) - 10 * 4 / 3) < 1e-4 and abs((x0 + x1) / 2 - 50) < 1e-4


def test_geometry_per_image_sizes():
    sizes = torch.tensor([[10, 100], [100, 10], [64, 48]])
    boxes = geometry.sample_boxes(3, 50, sizes, (0.3, 1.0), generator=torch.Generator().manual_seed(1)).double()
    x0, y0, x1, y1 = boxes.unbind(-1)
    height, width = sizes.double().unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x1 <= width[:, None]).all() and (y1 <= height[:, None]).all()
    # The 1:10 and 10:1 images only fit the central fallback crop; the 64x48 one samples.
    assert torch.allclose(boxes[1, 0], torch.tensor([0.0, 100 / 2 - 10 / 0.75 / 2, 10, 50 + 10 / 0.75 / 2]).double())
    assert (boxes[0] == boxes[0, :1]).all() and (boxes[2] != boxes[2, :1]).any()
    area = (x1 - x0)[2] * (y1 - y0)[2] / (64 * 48)
    assert area.min() >= 0.3 - 1e-4 and area.max() <= 1 + 1e-4
    with pytest.raises(ValueError, match="image_size"):
        geometry.sample_boxes(2, 1, sizes, (0.3, 1.0))
    with pytest.raises(ValueError, match="area_range"):
        geometry.sample_boxes(2, 1, (10, 10), (0.0, 1.0))


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_kernel_equals_reference_on_many_views_with_edge_hits(backend, device):
    # Integer boxes on a lattice make many centres land exactly on patch and box edges.
    gen = torch.Generator().manual_seed(4)
    b, v = (16 if backend == "triton" and device == "cpu" else 64), 10    # the interpreter is slow: 160 views
    corner = torch.randint(0, 40, (b, v, 2), generator=gen)
    size = torch.randint(1, 60, (b, v, 2), generator=gen)
    qb = torch.cat([corner, corner + size], dim=-1).double()
    rb = torch.tensor([[6.0, 12.0, 34.0, 40.0]]).repeat(b, 1)
    qf, rf = torch.rand(b, v, generator=gen) < 0.5, torch.rand(b, generator=gen) < 0.5
    qr = torch.randint(0, 4, (b, v), generator=gen)
    args = (qb, rb, (6, 6), (14, 14))
    kw = dict(query_flip=qf, ref_flip=rf, query_rot90=qr)
    expected = lk.relative_position_targets(*args, **kw, backend="torch")
    moved = {name: t.to(device) for name, t in kw.items()}
    got = lk.relative_position_targets(qb.to(device), rb.to(device), (6, 6), (14, 14), **moved, backend=backend)
    assert torch.equal(got.cpu(), expected)
    got = lk.relative_position_targets(qb.float().to(device), rb.float().to(device), (6, 6), (14, 14), **moved,
                                       backend=backend)
    assert torch.equal(got.cpu(), lk.relative_position_targets(qb.float(), rb.float(), (6, 6), (14, 14), **kw,
                                                               backend="torch"))


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed")
def test_triton_kernel_compiles_for_gpus_without_fused_multiply_add():
    # Compiled to PTX here, no GPU needed. Every integer argument equal to 1 (a grid side of
    # 1, V = 1) is given the type the launcher would give it: a constexpr unless the kernel
    # opts out of specialisation.
    compile_for_gpu("""
        import re
        from loca_kernels.targets import triton as targets_triton

        kernel = targets_triton._targets_kernel
        types = dict(query_boxes="*fp64", ref_boxes="*fp64", query_flip="*i8", ref_flip="*i8", query_rot90="*i32",
                     out="*i64")
        constexprs = {"BLOCK": 64}
        for param in kernel.params:
            if param.name in types:
                continue
            if param.is_constexpr or not param.do_not_specialize:
                constexprs.setdefault(param.name, 1)
            else:
                types[param.name] = "i32"
        # Rule "centre" on both architectures; "scenic" rounds its float64 results to float32.
        for capability, scenic in ((80, False), (90, False), (90, True)):
            ptx = compile_triton_kernel(kernel, types, dict(constexprs, SCENIC=scenic), capability=capability,
                                        options=targets_triton.COMPILE_OPTIONS)
            assert "div.rn.f64" in ptx and not re.search(r"\\bfma\\.|\\brcp\\.", ptx), capability
            assert ("cvt.rn.f32.f64" in ptx) == scenic, capability
    """)


# Rule "scenic" against the official pipeline (scenic/projects/loca, ops.py), one view at a time
# on whole label maps with numpy: no code shared with the library.
def tf_resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """tf.image.resize(labels, (height, width), "nearest") of an (H, W, C) map: half-pixel
    centres, input index min(floor((o + 0.5) * (in / out)), in - 1), every operation in float32."""
    def index(out, size):
        scale = np.float32(size) / np.float32(out)
        return np.minimum(np.floor((np.arange(out, dtype=np.float32) + np.float32(0.5)) * scale).astype(np.int64),
                          size - 1)
    return labels[np.ix_(index(height, labels.shape[0]), index(width, labels.shape[1]))]


def official_labels(image_size, ref_box, ref_flip, query_boxes, query_flips, query_turns, query_grid, query_size,
                    ref_grid):
    """One image: init_patch_matching_tracker's index grid, cropflip_generatemask (grid flipped
    with the reference, resized to the crop, padded with -1 to the image), then per query view
    inception_crop_with_mask (slice, resize to the view's pixels, then to its patch grid) and
    flip_with_mask; then torch.rot90's quarter turns. Two more channels of the map, each
    pixel's x and y, follow the same steps. Returns (V, patches, 3): label, x, y."""
    grid = np.arange(ref_grid[0] * ref_grid[1]).reshape(*ref_grid, 1)
    if ref_flip:
        grid = grid[:, ::-1]
    rx0, ry0, rx1, ry1 = ref_box
    height, width = image_size
    full = np.full((height, width, 3), -1, dtype=np.int64)
    full[ry0:ry1, rx0:rx1, :1] = tf_resize_nearest(grid, ry1 - ry0, rx1 - rx0)
    full[..., 1], full[..., 2] = np.arange(width), np.arange(height)[:, None]
    out = []
    for (x0, y0, x1, y1), flip, turns in zip(query_boxes, query_flips, query_turns):
        (gh, gw), (ph, pw) = (query_grid, query_size) if turns % 2 == 0 else (query_grid[::-1], query_size[::-1])
        view = tf_resize_nearest(full[y0:y1, x0:x1], ph, pw)
        labels = tf_resize_nearest(view, gh, gw)
        if flip:
            labels = labels[:, ::-1]
        out.append(np.rot90(labels, turns).reshape(-1, 3))
    return np.stack(out)


def official_batch(seed, batch, views, query_grid, query_size, area, ref_grid=(14, 14), turns=False):
    """Random images (sides 240..400), tf-sampler integer boxes, flips (and quarter turns): the
    op's inputs, the official labels and the source pixels (x, y) each patch reads."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(240, 401, (batch, 2), generator=gen)
    rb = geometry.sample_boxes(batch, 1, sizes, (0.32, 1.0), (0.75, 1.33), generator=gen, sampler="tf")[:, 0]
    qb = geometry.sample_boxes(batch, views, sizes, area, (0.75, 1.33), generator=gen, sampler="tf")
    qf, rf = torch.rand(batch, views, generator=gen) < 0.5, torch.rand(batch, generator=gen) < 0.5
    qr = torch.randint(0, 4 if turns else 1, (batch, views), generator=gen)
    maps = torch.from_numpy(np.stack([
        official_labels(sizes[b].tolist(), rb[b].long().tolist(), bool(rf[b]), qb[b].long().tolist(),
                        qf[b].tolist(), qr[b].tolist(), query_grid, query_size, ref_grid) for b in range(batch)]))
    inputs = (qb, rb, query_grid, ref_grid, dict(query_flip=qf, ref_flip=rf, query_rot90=qr, rule="scenic",
                                                   query_size=query_size))
    return inputs, *maps.unbind(-1)


# The official views: 1,000 images with a 224-pixel first query (14 x 14) and nine 96-pixel
# focal queries (6 x 6): 10,000 views.
SCENIC_VIEWS = {"query0": dict(views=1, query_grid=(14, 14), query_size=(224, 224), area=(0.32, 1.0)),
                "focal": dict(views=9, query_grid=(6, 6), query_size=(96, 96), area=(0.05, 0.32))}


@pytest.fixture(scope="module")
def official():
    return {name: official_batch(7 + i, 1000, **kind) for i, (name, kind) in enumerate(SCENIC_VIEWS.items())}


def _run(backend, inputs, batch=None):
    name, device = backend
    qb, rb, query_grid, ref_grid, kw = inputs
    cut = slice(None, batch)
    kw = {key: t[cut].to(device) if isinstance(t, torch.Tensor) else t for key, t in kw.items()}
    return lk.relative_position_targets(qb[cut].to(device), rb[cut].to(device), query_grid, ref_grid, backend=name,
                                        **kw).cpu()


def _batch_for(backend):
    """Every view, except for Triton under its (slow) interpreter."""
    return 8 if backend[0] == "triton" and not torch.cuda.is_available() else None


@pytest.mark.parametrize("kind", SCENIC_VIEWS)
def test_scenic_rule_is_the_official_pipeline(kind, official, backend):
    inputs, expected, _, _ = official[kind]
    batch = _batch_for(backend)
    got = _run(backend, inputs, batch)
    assert torch.equal(got, expected[:batch])
    assert (got == -1).any() and (got >= 0).float().mean() > 0.3
    assert (inputs[-1]["query_flip"][:batch].any()) and (inputs[-1]["ref_flip"][:batch].any())


def test_scenic_rule_reads_one_source_pixel_off_the_centre(official):
    """The pixel a patch reads lies about half a view pixel right of and below its centre: the
    issue measured +0.58 (first query) and +0.75 (focal) source pixels on 320-pixel images, ~5%
    of the labels moving, each to a neighbouring reference patch; these TF-sampled boxes on
    240..400-pixel images give +0.52 and +0.66, 5.9% and 7.4%."""
    offsets, moved = {}, {}
    for kind, (inputs, expected, xs, ys) in official.items():
        qb, rb, query_grid, ref_grid, kw = inputs
        flip = kw["query_flip"]
        x0, y0, x1, y1 = (t[..., None].double() for t in qb.unbind(-1))
        (gh, gw) = query_grid
        col = torch.arange(gh * gw) % gw
        col = torch.where(flip[..., None], gw - 1 - col, col)        # column in the crop as cut
        row = torch.arange(gh * gw) // gw
        dx = xs + 0.5 - (x0 + (col + 0.5) * (x1 - x0) / gw)
        dy = ys + 0.5 - (y0 + (row + 0.5) * (y1 - y0) / gh)
        offsets[kind] = (float(dx.mean()), float(dy.mean()))
        centre = lk.relative_position_targets(qb, rb, query_grid, ref_grid, query_flip=flip,
                                              ref_flip=kw["ref_flip"], backend="torch")
        both = (centre >= 0) & (expected >= 0)
        differ = both & (centre != expected)
        moved[kind] = float(differ.sum() / both.sum())
        step_row = (centre[differ] // 14 - expected[differ] // 14).abs()
        step_col = (centre[differ] % 14 - expected[differ] % 14).abs()
        assert int(step_row.max()) <= 1 and int(step_col.max()) <= 1, kind    # neighbours only
        assert float(((centre >= 0) != (expected >= 0)).float().mean()) < 0.02, kind
    assert all(0.4 < o < 0.7 for o in offsets["query0"]), offsets
    assert all(0.5 < o < 0.9 for o in offsets["focal"]), offsets
    assert all(0.02 < m < 0.12 for m in moved.values()), moved


@pytest.mark.parametrize("query_grid,query_size,ref_grid", [((3, 5), (40, 56), (5, 7)), ((2, 2), (7, 9), (3, 3))])
def test_scenic_rule_with_turns_and_rectangular_grids(query_grid, query_size, ref_grid, backend):
    inputs, expected, _, _ = official_batch(11, 8, 4, query_grid, query_size, (0.02, 0.5), ref_grid, turns=True)
    got = _run(backend, inputs)
    assert torch.equal(got, expected)
    assert set(inputs[-1]["query_rot90"].unique().tolist()) == {0, 1, 2, 3} and (got == -1).any()
