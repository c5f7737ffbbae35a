"""loca_train follows the official LOCA recipe (scenic/projects/loca) in its vit_s16/vit_b16
presets: TF-style crops, colour jitter and solarisation, a training-mode EMA teacher, xavier
initialisation and full-resolution sources; each project choice stays behind a flag."""
import contextlib
import io
import math
import random

import pytest
import torch
import torch.nn.functional as F

from loca_kernels.losses import LocaLoss
from loca_kernels.geometry import sample_boxes
from loca_train import preset
from loca_train.batches import StepBatches, canvas_size
from loca_train.sampling import TF_ASPECT_RANGE
from loca_train.config import parse_args
from loca_train.images import ImageFolder
from loca_train.networks import LocaNet, ema_teacher
from loca_train.objectives.loca import loca_forward
from test_train import losses_on_a_fixed_batch
from loca_train.views import crop_views, hsv_to_rgb, make_views, rgb_to_hsv, solarize, tf_color_jitter

# The official recipe at micro scale: the presets' choices, small shapes.
MICRO = dict(image_size=16, patch_size=4, focal_size=8, num_focal=2, query_tokens_kept=6,
             embed_dim=32, depth=2, num_heads=2, head_hidden_dim=32, head_bottleneck_dim=16,
             num_prototypes=32, batch_size=256, num_workers=0, progress=False)
OFFICIAL = dict(crop_sampler="tf", label_rule="scenic", jitter_style="tf", solarize=0.2, teacher_mode="train",
                init="xavier", source_size=0, mean_entropy_over="all")


def test_presets_default_to_the_official_recipe_and_help_shows_them():
    for name in ("vit_s16", "vit_b16"):
        cfg = preset(name)
        assert {key: getattr(cfg, key) for key in OFFICIAL} == OFFICIAL
        assert cfg.stochastic_depth == 0.1 and cfg.color_jitter == 0.8 and cfg.grayscale == 0.2
    tiny = preset("tiny")
    assert (tiny.crop_sampler, tiny.label_rule, tiny.jitter_style, tiny.solarize, tiny.teacher_mode, tiny.init,
            tiny.mean_entropy_over) == ("rrc", "centre", "fixed", 0.0, "eval", "trunc_normal", "valid")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--preset", "vit_b16", "--help"])
    text = " ".join(out.getvalue().split())
    for shown in ("(vit_b16: tf)", "(vit_b16: scenic)", "(vit_b16: 0.2)", "(vit_b16: train)", "(vit_b16: xavier)",
                  "(vit_b16: all)", "(vit_b16: 0)", "(vit_b16: 768)"):
        assert shown in text
    assert parse_args(["--preset", "vit_b16", "--teacher-mode", "eval"]).teacher_mode == "eval"
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parse_args(["--jitter-style", "yiq"])


def _tf_crop(height, width, area_range, aspect_range, rng):
    """TF's GenerateRandomCrop + attempts loop, one box at a time (independent of the vectorised
    implementation; doubles, Python's round is half to even as lrintf)."""
    for _ in range(100):
        ratio = rng.random() * (aspect_range[1] - aspect_range[0]) + aspect_range[0]
        min_area, max_area = area_range[0] * width * height, area_range[1] * width * height
        h, max_h = round(math.sqrt(min_area / ratio)), round(math.sqrt(max_area / ratio))
        if round(max_h * ratio) > width:
            max_h = int((width + 0.5 - 1e-7) / ratio)
            max_h -= round(max_h * ratio) > width
        max_h = min(max_h, height)
        h = min(h, max_h)
        h += rng.randrange(max_h - h + 1)
        w = round(h * ratio)
        if w * h < min_area:
            h += 1
            w = round(h * ratio)
        if w * h > max_area:
            h -= 1
            w = round(h * ratio)
        if min_area <= w * h <= max_area and 0 < w <= width and 0 < h <= height:
            y = rng.randrange(height - h) if h < height else 0
            x = rng.randrange(width - w) if w < width else 0
            return x, y, x + w, y + h
    return 0, 0, width, height


@pytest.mark.parametrize("area_range, median", [((0.32, 1.0), 0.511), ((0.05, 0.32), 0.156)])
def test_tf_sampler_follows_sample_distorted_bounding_box(area_range, median):
    height, width, n = 375, 500, 8000
    boxes = sample_boxes(n // 8, 8, (height, width), area_range, TF_ASPECT_RANGE, sampler="tf",
                         generator=torch.Generator().manual_seed(0)).reshape(-1, 4).double()
    rng = random.Random(0)
    expected = torch.tensor([_tf_crop(height, width, area_range, TF_ASPECT_RANGE, rng) for _ in range(n)],
                            dtype=torch.float64)
    assert torch.equal(boxes, boxes.round())                                 # integer source pixels
    assert bool((boxes[:, :2] >= 0).all() & (boxes[:, 2] <= width).all() & (boxes[:, 3] <= height).all())

    def stats(b):
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        return w * h / (height * width), w / h, b

    area, ratio, _ = stats(boxes)
    ref_area, ref_ratio, _ = stats(expected)
    assert bool((area >= area_range[0]).all() & (area <= area_range[1]).all())
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):                                    # same distributions
        assert abs(area.quantile(q) - ref_area.quantile(q)) < 0.015
        assert abs(ratio.quantile(q) - ref_ratio.quantile(q)) < 0.015
    assert abs(float(area.median()) - median) < 0.01                         # the numbers
    # Aspect uniform (not log-uniform) in [0.75, 1.33], up to the rounding of the width.
    assert bool((ratio > 0.74).all() & (ratio < 1.34).all())
    below_mid = float((ratio < (0.75 + 1.33) / 2).double().mean())
    assert abs(below_mid - 0.5) < 0.03                                       # log-uniform: 0.57
    # Offsets uniform in [0, side - crop side): a smaller crop never touches the bottom edge.
    smaller = boxes[:, 3] - boxes[:, 1] < height
    assert bool((boxes[smaller, 3] < height).all())
    assert bool((boxes[smaller, 1] == 0).any())


def test_tf_sampler_fallback_is_the_whole_image():
    # No box of 90-100% of a 10 x 100 image has an aspect ratio in [0.75, 1.33].
    boxes = sample_boxes(3, 2, (10, 100), (0.9, 1.0), TF_ASPECT_RANGE, sampler="tf",
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(boxes, torch.tensor([0.0, 0.0, 100.0, 10.0]).expand(3, 2, 4))
    assert torch.equal(sample_boxes(2, 1, (40, 30), (0.1, 0.2), sampler="tf", tries=0),
                       torch.tensor([0.0, 0.0, 30.0, 40.0]).expand(2, 1, 4))
    # The rrc fallback stays the central crop; the overlap option still works with "tf".
    torch.testing.assert_close(sample_boxes(1, 1, (10, 100), (0.9, 1.0), tries=3),
                               torch.tensor([[[50 - 20 / 3, 0.0, 50 + 20 / 3, 10.0]]]))
    first = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    near = sample_boxes(1, 50, (100, 100), (0.05, 0.1), sampler="tf", overlap_with=first, min_overlap=0.001,
                        generator=torch.Generator().manual_seed(1))
    assert bool((near[..., 0] < 20).all() & (near[..., 1] < 20).all())
    with pytest.raises(ValueError, match="sampler"):
        sample_boxes(1, 1, (10, 10), (0.1, 1.0), sampler="torch")


def test_integer_crop_is_resized_after_cropping_as_tf():
    image = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    for box, size in (((5, 7, 45, 33), 16), ((10, 3, 19, 12), 24)):           # shrink and enlarge
        x0, y0, x1, y1 = box
        out = crop_views(image, torch.tensor([[box]], dtype=torch.float32), size)
        # TF's bilinear resize (half-pixel centres, edges clamped, no antialias) of the slice.
        expected = F.interpolate(image[..., y0:y1, x0:x1], size=(size, size), mode="bilinear",
                                 align_corners=False, antialias=False)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_full_resolution_sources(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.new("RGB", (123, 45), (10, 20, 30)).save(tmp_path / "a" / "x.png")
    assert ImageFolder(str(tmp_path), 0)[0].shape == (3, 45, 123)
    assert ImageFolder(str(tmp_path), 64)[0].shape == (3, 23, 64)
    images = [torch.zeros(3, 40, 70, dtype=torch.uint8), torch.zeros(3, 90, 20, dtype=torch.uint8)]
    assert canvas_size(images, 0) == (90, 70) and canvas_size(images, 64) == (64, 64)
    cfg = preset("vit_b16", **dict(MICRO, batch_size=2))
    batch = StepBatches(images, cfg)[0]
    assert batch.images.shape == (2, 3, 90, 70)
    sizes = torch.tensor([[70, 40], [20, 90]]).repeat(1, 2)
    assert bool((batch.ref_boxes <= sizes).all() & (batch.query_boxes <= sizes[:, None]).all())
    assert torch.equal(batch.query_boxes, batch.query_boxes.round())


def test_solarisation_on_query_zero_only():
    images = [torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(4)]
    cfg = preset("vit_b16", **dict(MICRO, crop_sampler="rrc", label_rule="centre"))
    drawn = torch.cat([StepBatches(images, cfg)[step].solarized for step in range(8)])    # 2048 draws
    assert abs(float(drawn.double().mean()) - 0.2) < 0.03
    x = torch.tensor([0.0, 0.3, 0.49, 0.5, 0.8, 1.0]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    out = solarize(x, torch.tensor([True, False]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.3, 0.49, 0.5, 0.2, 0.0]))
    assert torch.equal(out[1], x[1])
    # Through make_views: only the views flagged change (query 0 in objective.loca_forward).
    canvas = torch.full((2, 3, 8, 8), 230, dtype=torch.uint8)
    box = torch.tensor([0.0, 0.0, 8.0, 8.0]).expand(2, 1, 4)
    plain = torch.ones(1, 2, 4) * torch.tensor([0.0, 1.0, 1.0, 0.0])
    none = torch.full((1, 2, 4), -1)
    views = make_views(canvas, box, 4, None, plain, torch.zeros(1, 2, dtype=torch.bool), none,
                       torch.tensor([[True, False]]))
    assert views[0, 0, 0, 0] < views[1, 0, 0, 0]


def test_tf_jitter_draws():
    images = [torch.zeros(3, 30, 40, dtype=torch.uint8)] * 4
    cfg = preset("vit_b16", **dict(MICRO, crop_sampler="rrc", label_rule="centre"))
    batch = StepBatches(images, cfg)[0]
    order, params = batch.jitter_order.reshape(-1, 4), batch.jitter.reshape(-1, 4)
    applied = order[:, 0] >= 0
    assert abs(float(applied.double().mean()) - 0.8) < 0.04
    assert bool((order[~applied] == -1).all())
    assert torch.equal(params[~applied], torch.tensor([0.0, 1.0, 1.0, 0.0]).expand(int((~applied).sum()), 4))
    assert torch.equal(order[applied].sort(dim=-1).values, torch.arange(4).expand(int(applied.sum()), 4))
    # Random order: all 24 permutations, about equally often.
    codes = (order[applied] * torch.tensor([64, 16, 4, 1])).sum(-1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert len(counts) == 24 and counts.min() > 0.5 * counts.float().mean()
    low, high = params[applied].aminmax(dim=0)
    for i, (lo, hi) in enumerate([(-0.4, 0.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert lo <= low[i] < lo + 0.02 and hi - 0.02 < high[i] <= hi


def _jitter_one(x, params, order):
    return tf_color_jitter(x, torch.tensor([params]), torch.tensor([order]))


def test_tf_jitter_brightness_is_additive_and_contrast_per_channel():
    x = torch.stack([torch.full((4, 4), 0.3), torch.linspace(0.1, 0.5, 16).view(4, 4),
                     torch.linspace(0.2, 0.9, 16).view(4, 4)])[None]
    bright = _jitter_one(x, [0.1, 1.0, 1.0, 0.0], [0, 1, 2, 3])
    torch.testing.assert_close(bright, (x + 0.1).clamp(0, 1), atol=2e-6, rtol=0)     # one delta added
    assert torch.allclose(_jitter_one(x, [-0.4, 1.0, 1.0, 0.0], [3, 2, 1, 0]), (x - 0.4).clamp(0, 1), atol=2e-6)
    contrast = _jitter_one(x, [0.0, 0.5, 1.0, 0.0], [1, 0, 2, 3])
    mean = x.mean(dim=(2, 3), keepdim=True)                                     # each channel's own mean
    torch.testing.assert_close(contrast, (x - mean) * 0.5 + mean, atol=2e-6, rtol=0)
    torch.testing.assert_close(contrast.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=2e-6, rtol=0)


def test_tf_jitter_saturation_hue_in_hsv_and_order_matters():
    red = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1)
    torch.testing.assert_close(_jitter_one(red, [0.0, 1.0, 1.0, 1 / 3], [3, 0, 1, 2]),
                               torch.tensor([0.2, 0.8, 0.2]).view(1, 3, 1, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(_jitter_one(red, [0.0, 1.0, 0.5, 0.0], [2, 0, 1, 3]),   # s 0.75 -> 0.375
                               torch.tensor([0.8, 0.5, 0.5]).view(1, 3, 1, 1), atol=1e-6, rtol=0)
    x = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6, rtol=0)
    # Brightness then saturation differs from saturation then brightness; each is the sequence
    # of the single adjustments, clipped after each.
    params = [0.3, 1.0, 1.6, 0.0]
    first = _jitter_one(x[:1], params, [0, 2, 1, 3])
    second = _jitter_one(x[:1], params, [2, 0, 1, 3])
    assert (first - second).abs().max() > 0.05
    step = _jitter_one(x[:1], [0.3, 1.0, 1.0, 0.0], [0, 1, 2, 3])
    torch.testing.assert_close(first, _jitter_one(step, [0.0, 1.0, 1.6, 0.0], [0, 1, 2, 3]), atol=1e-6, rtol=0)
    # Views without jitter (order -1) are unchanged.
    assert torch.equal(tf_color_jitter(x, torch.tensor([params] * 5), torch.full((5, 4), -1)), x)


def test_train_mode_teacher_applies_stochastic_depth():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for mode, differ in (("train", True), ("eval", False)):
        cfg = preset("vit_s16", **dict(MICRO, stochastic_depth=0.5, teacher_mode=mode))
        torch.manual_seed(0)
        teacher = ema_teacher(LocaNet(cfg), cfg)
        assert teacher.training == differ and not any(p.requires_grad for p in teacher.parameters())
        with torch.no_grad():
            a, b = teacher.reference(images)[0], teacher.reference(images)[0]
        assert (not torch.equal(a, b)) == differ


def test_xavier_initialisation():
    cfg = preset("vit_b16", **dict(MICRO, embed_dim=96, num_heads=4, depth=3))
    torch.manual_seed(0)
    net = LocaNet(cfg).requires_grad_(False)
    dim, hidden = 96, 384
    for block in net.encoder.blocks:
        for w in block.qkv.weight.chunk(3) + (block.proj.weight,):               # one matrix per q, k, v
            bound = math.sqrt(6 / (dim + dim))
            assert w.abs().max() <= bound and abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound
        assert not block.qkv.bias.any() and not block.proj.bias.any()
        fc1, fc2 = block.mlp[0], block.mlp[2]
        for w in (fc1.weight, fc2.weight):
            bound = math.sqrt(6 / (dim + hidden))
            assert w.abs().max() <= bound and abs(float(w.std()) - bound / math.sqrt(3)) < 0.05 * bound
        for bias in (fc1.bias, fc2.bias):
            assert 0 < float(bias.std()) < 3e-6
    for w in net.cross_block.attn.kv.weight.chunk(2) + (net.cross_block.attn.q.weight,):
        assert w.abs().max() <= math.sqrt(3 / dim)
    # Other dense layers: lecun_normal (std 1 / sqrt(fan_in), truncated at 2 std), zero bias.
    head = net.position_head.linear
    assert abs(float(head.weight.std()) - dim ** -0.5) < 0.05 * dim ** -0.5
    assert head.weight.abs().max() <= 2 * dim ** -0.5 / 0.8796 and not head.bias.any()
    # The project's choice behind --init trunc_normal: N(0, 0.02) truncated, zero biases.
    torch.manual_seed(0)
    cfg = preset("vit_b16", **dict(MICRO, embed_dim=96, num_heads=4, init="trunc_normal"))
    net = LocaNet(cfg).requires_grad_(False)
    w = net.encoder.blocks[0].qkv.weight
    assert abs(float(w.std()) - 0.02) < 0.002 and not net.encoder.blocks[0].mlp[0].bias.any()


def test_official_recipe_learns_on_a_fixed_batch():
    """All the official options together (full-resolution procedural sources, tf crops, jitter and
    solarisation, training-mode teacher with stochastic depth, xavier init) train at micro scale."""
    cfg = preset("vit_b16", **dict(MICRO, batch_size=8, num_images=8, stochastic_depth=0.1, solarize=0.5))
    images = [torch.randint(0, 256, (3, 40 + 3 * i, 56 - 2 * i), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(i)) for i in range(8)]
    batch = StepBatches(images, cfg)[0]
    assert batch.solarized.any() and (batch.jitter_order >= 0).any()
    losses = losses_on_a_fixed_batch(cfg, batch, 8)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("argv, rule, sizes", [
    (["--preset", "vit_b16"], "scenic", [(16, 16), (8, 8)]),
    (["--preset", "vit_b16", "--label-rule", "centre"], "centre", [None, None]),
])
def test_label_rule_flag_reaches_the_op(argv, rule, sizes, monkeypatch):
    import loca_train.objectives.loca as objective

    chosen = parse_args(argv)
    cfg = preset(chosen.preset, **dict(MICRO, batch_size=2, crop_sampler=chosen.crop_sampler,
                                       label_rule=chosen.label_rule))
    calls, real = [], objective.relative_position_targets

    def spy(*args, **kwargs):
        calls.append((kwargs["rule"], kwargs["query_size"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(objective, "relative_position_targets", spy)
    images = [torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    batch = StepBatches(images, cfg)[0]
    assert torch.equal(batch.query_boxes, batch.query_boxes.round())        # tf boxes: integer pixels
    torch.manual_seed(0)
    student = LocaNet(cfg)
    loss, _ = loca_forward(student, ema_teacher(student, cfg).reference, LocaLoss(), batch, cfg)
    assert math.isfinite(loss.item())
    assert calls == [(rule, size) for size in sizes]                         # first query, then the focal ones


def test_scenic_labels_need_integer_boxes():
    with pytest.raises(ValueError, match="label_rule=scenic needs integer crop boxes .*crop_sampler=rrc"):
        preset("vit_b16", crop_sampler="rrc")
    with pytest.raises(ValueError, match="label_rule=scenic"):
        preset("tiny", label_rule="scenic")
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
        parse_args(["--label-rule", "scenic"])
    assert "crop_sampler=tf" in err.getvalue()
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
        parse_args(["--label-rule", "center"])
