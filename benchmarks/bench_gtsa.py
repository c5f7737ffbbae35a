"""One GTSA step's pair work, forward + backward, against GTSA's eager pipeline as written.

GTSA (bok3948/GTSA, model_pretrain/gtsa.py) per batch of B images: 2 global views (14 x 14 maps)
and 8 local views (6 x 6) of C = 768 projector channels, each view turned by a random quarter
turn. For each of the 18 (teacher global t, student view v != t) pairs it
  - pools both maps over the two crops' intersection (roi_align, aligned=True; 10 x 10 when the
    student is global, 4 x 4 when local), turns the teacher's pooled map into the student's
    orientation, and adds minus their channel cosine, averaged (the crop term);
  - matches the student's and the teacher's patches by cosine both ways, keeps the M best
    matches per image (98 for a global student, 18 for a local one) with a per-image loop,
    torch.where and masked_select, and adds minus the kept pairs' cosine (the correspondence
    term).
Teacher maps are detached; the backward runs into the student maps.

ours: 4 crop_features calls for every crop term (bench_crop.ours_pooled: one out size per call,
  every map pooled in the source orientation, so nothing is turned) and PatchCorrespondenceLoss
  per teacher-student shape: one call for the 2 global pairs (concatenated along B) and one per
  local pair (16; a call per teacher would need the teacher's map copied 8 times).
"""
import pytest
import torch
import torch.nn.functional as F

import loca_kernels as lk
from bench_crop import (CHANNELS, GLOBALS, LOCALS, benchmark_step, ours_pooled, pixel_box, roi_align_grid_sample,
                        rotate_by)
from conftest import ON_GPU, sizes
from loca_kernels import geometry

BATCH = sizes(quick=4, full=64)
MATCHES = {14: 98, 6: 18}      # GTSA's num_matches by the student's map side
OURS = ("triton",) if ON_GPU else ("cpu",)
PEERS = {
    "eager": "GTSA's loop over the 18 pairs as written: roi_align (torchvision's where it imports, else "
             "bench_crop's grid_sample version; the JSON's `peer` says which ran) and rot90 for the crop term, "
             "the nearest-neighbour selection transcribed from GTSA's neirest_neighbores for the "
             "correspondence term",
}
try:
    from torchvision.ops import roi_align
    ROI_ALIGN = "torchvision.ops.roi_align"
except Exception:  # noqa: BLE001  (an import error or torchvision's missing operators)
    roi_align, ROI_ALIGN = None, "roi_align via grid_sample (2 x 2 samples per bin)"


def eager_roi_align(maps, boxes, size):
    if roi_align is None:
        return roi_align_grid_sample(maps, boxes, size)
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    return roi_align(maps, rois, size, aligned=True)


def eager_nearest(inputs, candidates, num_matches):
    """GTSA's neirest_neighbores_on_l2: the num_matches inputs with the nearest candidates."""
    batch, n = inputs.shape[:2]
    distance = -torch.bmm(F.normalize(inputs, dim=-1), F.normalize(candidates, dim=-1).transpose(1, 2))
    best, nearest = (t.squeeze(-1) for t in distance.topk(1, largest=False))
    rank = best.sort(dim=1).indices.sort(dim=1).indices
    keep = torch.stack([torch.where(rank[i] < num_matches, True, False) for i in range(batch)])
    chosen = nearest.masked_select(keep).reshape(batch, num_matches)
    rows = torch.arange(n, device=inputs.device).repeat(batch, 1).masked_select(keep).reshape(batch, num_matches)
    pick = lambda x, i: x.gather(1, i[..., None].expand(-1, -1, x.shape[2]))  # noqa: E731
    return pick(inputs, rows), pick(candidates, chosen)


def eager_step(teacher, students, boxes, turns):
    crop = correspondence = 0.0
    for t in range(GLOBALS):
        for v in range(GLOBALS + LOCALS):
            if v == t:
                continue
            region, _ = geometry.intersection_boxes(boxes[:, t], boxes[:, v])
            side = students[v].shape[-1]
            size = (10, 10) if side == 14 else (4, 4)
            pooled_t = eager_roi_align(teacher[t], pixel_box(region, boxes[:, t], 14, turns[:, t]), size)
            pooled_t = rotate_by(pooled_t, (turns[:, v] - turns[:, t]) % 4)
            pooled_s = eager_roi_align(students[v], pixel_box(region, boxes[:, v], side, turns[:, v]), size)
            crop = crop - F.cosine_similarity(pooled_s, pooled_t, dim=1).mean()
            s_feats, t_feats = students[v].flatten(2).transpose(1, 2), teacher[t].flatten(2).transpose(1, 2)
            m = MATCHES[side]
            one = F.cosine_similarity(*eager_nearest(s_feats, t_feats, m), dim=-1).mean()
            other = F.cosine_similarity(*eager_nearest(t_feats, s_feats, m), dim=-1).mean()
            correspondence = correspondence - 0.5 * (one + other)
    pairs = GLOBALS * (GLOBALS + LOCALS - 1)
    return crop / pairs + correspondence / pairs


def ours_step(teacher, students, boxes, turns, backend):
    b = boxes.shape[0]
    t_global, t_local, s_global, s_local = ours_pooled(teacher, students, boxes, turns, backend)
    # Pair (t, 1 - t): teacher t over the globals' intersection against student 1 - t over it.
    crop = -F.cosine_similarity(s_global.unflatten(0, (GLOBALS, b)).flip(0).flatten(0, 1), t_global, dim=2).sum() \
        / s_global[:, :, 0].numel()
    # Pairs (t, local v): teacher t over region v against local v over region t.
    t_local = t_local.unflatten(0, (GLOBALS, b))                              # (2, B, 8, C, 4, 4)
    s_local = s_local.unflatten(0, (LOCALS, b)).permute(2, 1, 0, 3, 4, 5)      # (2, B, 8, C, 4, 4)
    crop = crop * GLOBALS - F.cosine_similarity(s_local, t_local, dim=3).mean(dim=(1, 3, 4)).sum()
    # Token-major (B, N, C) copies, made once per map: every matching call reads rows of C.
    s_tokens = [x.flatten(2).transpose(1, 2).contiguous() for x in students]
    t_tokens = [x.flatten(2).transpose(1, 2).contiguous() for x in teacher]
    correspondence = lk.PatchCorrespondenceLoss(MATCHES[14], backend=backend)(
        torch.cat([s_tokens[1 - t] for t in range(GLOBALS)]), torch.cat(t_tokens)) * GLOBALS
    local_loss = lk.PatchCorrespondenceLoss(MATCHES[6], backend=backend)
    for t in range(GLOBALS):
        for v in range(GLOBALS, GLOBALS + LOCALS):
            correspondence = correspondence + local_loss(s_tokens[v], t_tokens[t])
    pairs = GLOBALS * (GLOBALS + LOCALS - 1)
    return crop / pairs + correspondence / pairs


@pytest.mark.parametrize("impl", tuple(PEERS) + OURS)
def test_gtsa_step(benchmark, impl):
    benchmark.group = f"GTSA step pair work B={BATCH} C={CHANNELS} (18 pairs)"
    benchmark_step(benchmark, impl, BATCH, eager_step, ours_step, peer=ROI_ALIGN)
