"""relative_position_targets, gather_at_targets and the view geometry against hand-worked
examples and the SPEC's definition."""
import pytest
import torch

import loca_kernels as lk
from loca_kernels._backends import extension_has_kernel, triton_can_run
from loca_kernels.targets import geometry

OP = "relative_position_targets"
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(not extension_has_kernel(OP, "CPU"),
                                                 reason="extension built without the CPU targets kernel")),
    pytest.param("triton", marks=pytest.mark.skipif(not triton_can_run(torch.device("cpu")),
                                                    reason="Triton needs TRITON_INTERPRET=1 for CPU tensors")),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def one(query_box, ref_box, query_grid=(2, 2), ref_grid=(4, 4), backend="torch", **kw):
    return lk.relative_position_targets(torch.tensor([[query_box]], dtype=torch.float32),
                                        torch.tensor([ref_box], dtype=torch.float32),
                                        query_grid, ref_grid, backend=backend, **kw)[0, 0].tolist()


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
    got = lk.relative_position_targets(qb, rb, query_grid, ref_grid, query_flip=qf, ref_flip=rf, query_rot90=qr,
                                       backend=backend)
    assert got.dtype == torch.int64 and got.shape == (b, v, query_grid[0] * query_grid[1])
    assert torch.equal(got, explicit_targets(qb, rb, query_grid, ref_grid, qf, rf, qr))
    assert (got != -1).any() and (got == -1).any()  # both cases were exercised


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_opcheck_fused_operators(backend):
    gen = torch.Generator().manual_seed(2)
    qb = geometry.sample_boxes(3, 2, (50, 60), (0.05, 0.5), generator=gen)
    rb = geometry.sample_boxes(3, 1, (50, 60), (0.3, 1.0), generator=gen)[:, 0]
    args = (qb, rb, [3, 2], [5, 4], torch.tensor([[True, False]] * 3), torch.tensor([False, True, False]),
            torch.tensor([[0, 1], [2, 3], [1, 0]]), -1)
    name = "relative_position_targets" + ("_triton" if backend == "triton" else "")
    torch.library.opcheck(getattr(torch.ops.loca_kernels, name).default, args)


def test_cpu_backend_by_name_refuses_other_devices():
    boxes = torch.zeros(1, 1, 4, device="meta")
    with pytest.raises((RuntimeError, ValueError)):
        lk.relative_position_targets(boxes, torch.zeros(1, 4, device="meta"), (2, 2), (2, 2), backend="cpu")


@pytest.mark.parametrize("bad,kind,match", [
    (dict(query_grid=(0, 6)), ValueError, "query_grid must have positive sides"),
    (dict(ref_grid=(14,)), TypeError, "ref_grid must be a pair"),
    (dict(query_boxes=torch.tensor([[[4.0, 0, 4, 4]]])), ValueError, "x1 > x0"),
    (dict(ref_boxes=torch.tensor([[0.0, 5, 8, 5]])), ValueError, "x1 > x0 and y1 > y0"),
    (dict(query_boxes=torch.zeros(1, 4)), ValueError, "query_boxes must have 3 dimensions"),
    (dict(ref_boxes=torch.tensor([[0.0, 0, 8, 8]] * 2)), ValueError, "B=1 rows"),
    (dict(query_boxes=torch.tensor([[[0, 0, 4, 4]]])), TypeError, "floating"),
    (dict(query_rot90=torch.tensor([[4]])), ValueError, "values must be in 0..3"),
    (dict(query_flip=torch.tensor([[1]])), TypeError, "query_flip must be a bool tensor"),
    (dict(ref_flip=torch.tensor([True, False])), ValueError, r"ref_flip must have shape \(1,\)"),
    (dict(ref_boxes=torch.tensor([[0.0, 0, 8, 8]], device="meta")), ValueError, "on meta"),
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
    flat = lk.gather_at_targets(values[..., 0], targets[:, 0])
    assert flat.shape == (2, 3) and flat[0, 2] == 0 and flat[1, 1] == values[1, 2, 0]


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


def test_drop_tokens_keeps_a_sorted_subset_with_its_targets():
    targets = torch.arange(20).reshape(2, 10) * 3
    kept, kept_targets = geometry.drop_tokens(targets, 4, generator=torch.Generator().manual_seed(0))
    assert kept.shape == (2, 4) and (kept.diff(dim=1) > 0).all()
    assert torch.equal(kept_targets, targets.gather(1, kept))
    with pytest.raises(ValueError, match="num_keep"):
        geometry.drop_tokens(targets, 11)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.mark.parametrize("backend", BACKENDS[1:] + [CUDA])
def test_fused_kernel_equals_reference_on_many_views_with_edge_hits(backend):
    # Integer boxes on a lattice make many centres land exactly on patch and box edges.
    gen = torch.Generator().manual_seed(4)
    b, v = 64, 10
    corner = torch.randint(0, 40, (b, v, 2), generator=gen)
    size = torch.randint(1, 60, (b, v, 2), generator=gen)
    qb = torch.cat([corner, corner + size], dim=-1).double()
    rb = torch.tensor([[6.0, 12.0, 34.0, 40.0]]).repeat(b, 1)
    qf, rf = torch.rand(b, v, generator=gen) < 0.5, torch.rand(b, generator=gen) < 0.5
    qr = torch.randint(0, 4, (b, v), generator=gen)
    args = (qb, rb, (6, 6), (14, 14))
    kw = dict(query_flip=qf, ref_flip=rf, query_rot90=qr)
    expected = lk.relative_position_targets(*args, **kw, backend="torch")
    device = "cuda" if backend == "cuda" else "cpu"
    moved = {name: t.to(device) for name, t in kw.items()}
    got = lk.relative_position_targets(qb.to(device), rb.to(device), (6, 6), (14, 14), **moved, backend=backend)
    assert torch.equal(got.cpu(), expected)
    got = lk.relative_position_targets(qb.float().to(device), rb.float().to(device), (6, 6), (14, 14), **moved,
                                       backend=backend)
    assert torch.equal(got.cpu(), lk.relative_position_targets(qb.float(), rb.float(), (6, 6), (14, 14), **kw,
                                                               backend="torch"))
