"""crop_features at GTSA's per-step shapes against an eager peer of GTSA's own pipeline.

One GTSA step (bok3948/GTSA, model_pretrain/gtsa.py) per batch of B images: 2 global views
(14 x 14 maps) and 8 local views (6 x 6), C = 768 projector channels, each view turned by a
random quarter turn. For the 18 (teacher global, student view) pairs both maps are pooled over
the pair's intersection, 10 x 10 when the student is global and 4 x 4 when it is local, and the
teacher's pooled map is turned into the student's orientation. Teacher maps are detached.

ours: four crop_features calls (one out size per call; padding out sizes would waste work):
  teacher maps (2B, C, 14, 14) over the other global view (R = 1, 10 x 10) and over the 8 local
  views (R = 8, 4 x 4); student global maps (2B, C, 14, 14) over the other global (R = 1,
  10 x 10); student local maps (8B, C, 6, 6) over both globals (R = 2, 4 x 4). Forward of all
  four, backward of the student ones.
"""
import pytest
import torch
import torch.nn.functional as F

import loca_kernels as lk
from conftest import DEVICE, ON_GPU, device_generator, run_benchmark, sizes
from loca_kernels import geometry

BATCHES = sizes(quick=(4,), full=(64,))
OURS = ("triton",) if ON_GPU else ("cpu",)
PEERS = {
    "eager": "GTSA's loop over the 18 pairs, roi_align written with grid_sample (torchvision does not import "
             "beside the CPU torch build here): 2 x 2 bilinear samples per bin (GTSA's adaptive count for these "
             "boxes is 1 to 2 per axis), zero padding, then torch.rot90 per group of equal turn offsets. Same "
             "outputs as ours up to roi_align's border rule and sample count",
}
CHANNELS, GLOBALS, LOCALS, IMAGE = 768, 2, 8, 224


def gtsa_views(batch: int):
    """Source boxes (B, 10, 4) (globals first, overlapping as GTSA requires) and turns (B, 10)."""
    gen = torch.Generator().manual_seed(0)
    first = geometry.sample_boxes(batch, 1, (IMAGE, IMAGE), (0.25, 1.0), generator=gen)
    second = geometry.sample_boxes(batch, 1, (IMAGE, IMAGE), (0.25, 1.0), generator=gen, overlap_with=first[:, 0],
                                   min_overlap=0.02, tries=50)
    globals_ = torch.cat([first, second], dim=1)
    locals_ = geometry.sample_boxes(batch, LOCALS, (IMAGE, IMAGE), (0.05, 0.25), generator=gen,
                                    overlap_with=globals_, min_overlap=0.01, tries=50)
    return torch.cat([globals_, locals_], dim=1), geometry.sample_rotations(batch, GLOBALS + LOCALS, generator=gen)


def pixel_box(region, view, side, turns):
    """GTSA's box: a source region in the pixels of the view's (side x side) map as turned."""
    x0, y0, x1, y1 = ((region[:, i] - view[:, i % 2]) / (view[:, 2 + i % 2] - view[:, i % 2]) * side
                      for i in range(4))
    for k in range(1, 4):  # GTSA's rotate_bbox, counter-clockwise quarter turns
        sel = turns >= k
        x0, y0, x1, y1 = (torch.where(sel, a, b) for a, b in ((y0, x0), (side - x1, y0), (y1, x1), (side - x0, y1)))
    return torch.stack([x0, y0, x1, y1], dim=1)


def roi_align_grid_sample(x, boxes, out_size, samples=2):
    """roi_align(aligned=True) with a fixed samples x samples grid per bin, through grid_sample."""
    (oh, ow), (height, width) = out_size, x.shape[-2:]
    steps = lambda n: (torch.arange(n * samples, device=x.device) + 0.5) / (n * samples)  # noqa: E731
    xs = boxes[:, 0:1] - 0.5 + steps(ow) * (boxes[:, 2:3] - boxes[:, 0:1])
    ys = boxes[:, 1:2] - 0.5 + steps(oh) * (boxes[:, 3:4] - boxes[:, 1:2])
    grid = torch.stack(torch.broadcast_tensors((2 * xs[:, None, :] + 1) / width - 1,
                                               (2 * ys[:, :, None] + 1) / height - 1), dim=-1)
    return F.avg_pool2d(F.grid_sample(x, grid, align_corners=False), samples)


def rotate_by(x, turns):
    """torch.rot90 of each sample by its own quarter-turn count."""
    out = torch.empty_like(x)
    for k in range(4):
        sel = turns == k
        out[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
    return out


def eager_step(teacher, students, boxes, turns):
    loss = 0.0
    for t in range(GLOBALS):
        for v in range(GLOBALS + LOCALS):
            if v == t:
                continue
            region, _ = geometry.intersection_boxes(boxes[:, t], boxes[:, v])
            size = (10, 10) if v < GLOBALS else (4, 4)
            side = 14 if v < GLOBALS else 6
            pooled_t = roi_align_grid_sample(teacher[t], pixel_box(region, boxes[:, t], 14, turns[:, t]), size)
            pooled_t = rotate_by(pooled_t, (turns[:, v] - turns[:, t]) % 4)
            pooled_s = roi_align_grid_sample(students[v], pixel_box(region, boxes[:, v], side, turns[:, v]), size)
            loss = loss - F.cosine_similarity(pooled_s, pooled_t, dim=1).mean()
    return loss


def ours_pooled(teacher, students, boxes, turns, backend):
    """The four crop_features calls, views concatenated view-major: the teacher globals over the
    other global (2B, 1, C, 10, 10) and over the locals (2B, 8, C, 4, 4), the student globals
    over the other global (2B, 1, C, 10, 10), the student locals over the globals (8B, 2, C, 4, 4)."""
    teacher_views = boxes[:, :GLOBALS].transpose(0, 1).reshape(-1, 4)
    teacher_turns = turns[:, :GLOBALS].t().reshape(-1)
    pair_regions = torch.stack([geometry.intersection_boxes(boxes[:, t, None], boxes)[0]
                                for t in range(GLOBALS)])                              # (2, B, 10, 4)
    other_global = torch.stack([pair_regions[1, :, 0], pair_regions[0, :, 1]])      # (2, B, 4)
    t_maps = torch.cat(teacher)
    t_global = lk.crop_features(t_maps, teacher_views, other_global.reshape(-1, 1, 4), (10, 10),
                                view_rot90=teacher_turns, backend=backend)
    t_local = lk.crop_features(t_maps, teacher_views, pair_regions[:, :, GLOBALS:].reshape(-1, LOCALS, 4), (4, 4),
                               view_rot90=teacher_turns, backend=backend)
    s_global = lk.crop_features(torch.cat(students[:GLOBALS]), teacher_views, other_global.reshape(-1, 1, 4),
                                (10, 10), view_rot90=teacher_turns, backend=backend)
    local_views = boxes[:, GLOBALS:].transpose(0, 1).reshape(-1, 4)
    local_regions = pair_regions[:, :, GLOBALS:].permute(2, 1, 0, 3).reshape(-1, GLOBALS, 4)
    s_local = lk.crop_features(torch.cat(students[GLOBALS:]), local_views, local_regions, (4, 4),
                               view_rot90=turns[:, GLOBALS:].t().reshape(-1), backend=backend)
    return t_global, t_local, s_global, s_local


def ours_step(teacher, students, boxes, turns, backend):
    return sum(o.float().mean() for o in ours_pooled(teacher, students, boxes, turns, backend))


def make_step(batch: int):
    """Teacher maps (2 x (B, C, 14, 14)), student maps (2 x (B, C, 14, 14), 8 x (B, C, 6, 6),
    requiring grad), view boxes and turns of one GTSA step."""
    boxes, turns = (t.to(DEVICE) for t in gtsa_views(batch))
    gen = device_generator(1)
    teacher = [torch.randn(batch, CHANNELS, 14, 14, generator=gen, device=DEVICE) for _ in range(GLOBALS)]
    students = [torch.randn(batch, CHANNELS, side, side, generator=gen, device=DEVICE).requires_grad_()
                for side in [14] * GLOBALS + [6] * LOCALS]
    return teacher, students, boxes, turns


def benchmark_step(benchmark, impl, batch, eager, ours, **info):
    """Time forward + backward into the student maps of `eager` or `ours` (teacher, students,
    boxes, turns[, backend]) -> loss at batch `batch`; skip a backend that cannot run here."""
    teacher, students, boxes, turns = make_step(batch)

    def call():
        for s in students:
            s.grad = None
        loss = eager(teacher, students, boxes, turns) if impl == "eager" else ours(teacher, students, boxes, turns,
                                                                                    impl)
        loss.backward()
        return loss

    try:
        call()
    except (RuntimeError, ValueError) as error:  # a backend this op lacks or cannot run here
        pytest.skip(str(error))
    run_benchmark(benchmark, call, impl=impl, batch=batch, channels=CHANNELS, global_maps=f"{GLOBALS} x 14x14",
                  local_maps=f"{LOCALS} x 6x6", pairs=GLOBALS * (GLOBALS + LOCALS - 1), **info)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", tuple(PEERS) + OURS)
def test_crop_features_gtsa_step(benchmark, impl, batch):
    benchmark.group = f"crop_features GTSA step B={batch} C={CHANNELS}"
    maps = batch * CHANNELS * (GLOBALS * 14 * 14 * 2 + LOCALS * 6 * 6)
    benchmark_step(benchmark, impl, batch, eager_step, ours_step, bytes_moved=maps * 4 * 2)
