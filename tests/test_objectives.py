"""The dense objectives of `python -m loca_train --objective densecl|gtsa|mmc` (LOCA's own run is
tests/test_train.py): each trains with a finite, moving loss, resumes exactly (its queues and
centre included), runs on two gloo processes, and python -m loca_train.evaluate reads its runs."""
import dataclasses
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from loca_train import UsageError, parse_args, preset, train
from loca_train.config import FLAG_GROUPS, Config
from loca_train import evaluate as ev
from loca_train.batches import StepBatches
from loca_train.images import ProceduralImages
from loca_train.objectives import objective_of
from loca_train.objectives.mmc import masked_count, patch_pixels
from test_train import MICRO, _free_port, _records, _without_timing

# Micro settings of each objective beside test_train's MICRO (16-pixel globals: 4 x 4 patches,
# 8-pixel locals: 2 x 2).
SETTINGS = {
    "densecl": dict(queue_size=64, projection_dim=16),
    "gtsa": dict(projection_dim=16, num_matches_global=8, num_matches_local=2, pool_global=3, pool_local=2),
    "mmc": dict(queue_size=64, projection_dim=16),
}
TERMS = {"densecl": ("loss_global", "loss_dense"),
         "gtsa": ("loss_crop", "loss_correspondence", "loss_rotation", "rotation_acc"),
         "mmc": ("loss_mim", "loss_distill", "loss_contrast")}
STEPS = 6
# The module (the package's `train` is the function).
train_module = importlib.import_module("loca_train.train")


def _cfg(objective, **extra):
    return preset("tiny", **{**MICRO, **SETTINGS[objective], "objective": objective, **extra})


@pytest.fixture(autouse=True)
def one_thread_and_own_rngs():
    """In-process runs: one thread (two cores are shared), and every RNG a resume sets restored."""
    threads, python_state, numpy_state = torch.get_num_threads(), random.getstate(), np.random.get_state()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class _StopAfter:
    """Stands in for train.StopRequest: asks the loop to stop once `steps` steps have run, as a
    SIGTERM would (the loop reads `signal` once per step)."""

    def __init__(self, steps):
        self.steps, self.reads = steps, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    @property
    def signal(self):
        self.reads += 1
        return signal.SIGTERM if self.reads >= self.steps else 0


@pytest.mark.parametrize("objective", sorted(SETTINGS))
def test_objective_trains_resumes_exactly_and_evaluates(objective, tmp_path, monkeypatch, capsys):
    settings = dict(steps=STEPS, checkpoint_every=1000, stochastic_depth=0.2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_cfg(objective, **settings, output_dir=str(straight)))
    records = _records(straight / "log.jsonl")
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(np.isfinite(losses)) and len(set(losses)) == STEPS, losses
    assert all(np.isfinite([r[term] for r in records]).all() for term in TERMS[objective])
    assert json.loads((straight / "config.json").read_text())["objective"] == objective

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "StopRequest", lambda: _StopAfter(3))
        assert train(_cfg(objective, **settings, output_dir=str(resumed)))["interrupted"] == signal.SIGTERM
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["step"] == 3
    train(_cfg(objective, **settings, output_dir=str(resumed), resume=True))
    assert _without_timing(_records(resumed / "log.jsonl")) == _without_timing(records)
    final = [torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, resumed)]
    assert final[0]["config"]["objective"] == objective
    for name in ("student", "teacher", "criterion"):
        assert final[0][name].keys() == final[1][name].keys()
        for key, value in final[0][name].items():
            assert torch.equal(value, final[1][name][key]), (name, key)
    # The teacher holds the objective's EMA parts, under the student's keys: all of DenseCL's
    # network, GTSA's encoder and projector, MMC's encoder and heads (not the predictor, rotation
    # head, decoder or mask token).
    teacher_keys, student_keys = set(final[0]["teacher"]), set(final[0]["student"])
    assert teacher_keys <= student_keys and (teacher_keys == student_keys) == (objective == "densecl")
    assert not torch.equal(final[0]["teacher"]["encoder.norm.weight"], final[0]["student"]["encoder.norm.weight"])

    out = tmp_path / "eval"
    assert ev.main(["--run-dir", str(straight), "--probe-images", "4", "--test-images", "2", "--examples", "0",
                    "--no-progress", "--output-dir", str(out)]) == 0
    assert "teacher" in json.loads((out / "eval.json").read_text())["scores"]
    capsys.readouterr()

    other = "mmc" if objective != "mmc" else "gtsa"
    with pytest.raises(UsageError, match=f"--objective {other}: the checkpoint .* is a {objective} run"):
        train(_cfg(other, **settings, output_dir=str(straight), resume=True))


@pytest.mark.parametrize("objective", ("loca",) + tuple(sorted(SETTINGS)))
def test_every_objective_trains_on_the_photo_scenes(objective, tmp_path):
    # --scenes photos once failed before its first step (its scenes lacked bad_entries).
    cfg = preset("tiny", **{**MICRO, **SETTINGS.get(objective, {}), "objective": objective, "scenes": "photos",
                            "steps": 2, "output_dir": str(tmp_path)})
    train_module.train(cfg)
    records = _records(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_queues_and_centre_are_checkpointed_state(tmp_path):
    # DenseCL enqueues one key per image and step, MMC two (both global views).
    for objective, keys, names in (("densecl", 4, ("queue_global", "queue_dense", "queue_ptr")),
                                   ("mmc", 8, ("center", "queue", "queue_ptr"))):
        train(_cfg(objective, steps=3, output_dir=str(tmp_path / objective)))
        state = torch.load(tmp_path / objective / "checkpoint.pt", weights_only=True)["criterion"]
        assert set(state) == set(names)
        assert int(state["queue_ptr"]) == 3 * keys
    assert state["center"].abs().sum() > 0


def test_gtsa_correspondence_term_is_off_during_the_warm_up(tmp_path):
    train(_cfg("gtsa", steps=4, warmup_steps=2, output_dir=str(tmp_path)))
    for r in _records(tmp_path / "log.jsonl"):
        weight = 0.5 if r["step"] >= 2 else 0.0
        expected = r["loss_crop"] + weight * r["loss_correspondence"] + 0.5 * r["loss_rotation"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), r


def test_objective_presets_and_errors(tmp_path):
    gtsa = parse_args(["--objective", "gtsa"])
    assert (gtsa.objective, gtsa.num_focal, gtsa.focal_size, gtsa.min_overlap) == ("gtsa", 4, 16, 0.01)
    assert parse_args(["--objective", "gtsa", "--num-focal", "2"]).num_focal == 2        # flags still win
    assert parse_args([]).num_focal == 9                                                 # loca's tiny as before
    densecl = parse_args(["--preset", "vit_s16", "--objective", "densecl"])
    assert (densecl.queue_size, densecl.teacher_momentum, densecl.teacher_momentum_schedule,
            densecl.reference_area, densecl.image_size) == (65536, 0.999, "constant", (0.2, 1.0), 224)
    official = parse_args(["--preset", "vit_b16", "--objective", "gtsa"])
    assert (official.num_matches_global, official.num_matches_local, official.pool_global, official.num_focal,
            official.embed_dim) == (98, 18, 10, 8, 768)
    assert str(train_module.output_dir(_cfg("mmc"))) == os.path.join("runs", "tiny-mmc")
    assert str(train_module.output_dir(preset("tiny"))) == os.path.join("runs", "tiny")
    with pytest.raises(UsageError, match=r"num_matches_local must be in \[1, 4\]"):
        _cfg("gtsa", num_matches_local=5)
    with pytest.raises(UsageError, match="unknown objective 'byol', expected one of loca, densecl"):
        preset("tiny", objective="byol")
    with pytest.raises(UsageError, match="queue_size=62 must be a multiple of the global batch 4"):
        train(_cfg("densecl", queue_size=62, output_dir=str(tmp_path / "densecl")))
    with pytest.raises(UsageError, match="queue_size=68 must be a multiple of the keys of a step, 8"):
        train(_cfg("mmc", queue_size=68, output_dir=str(tmp_path / "mmc")))


def test_two_process_gloo_run_of_each_objective(tmp_path):
    # One pair of processes trains the three objectives one after the other (one start-up).
    script = textwrap.dedent(f"""
        import json, torch.distributed as dist
        from loca_train import preset, train
        for objective, extra in json.loads({json.dumps(json.dumps(SETTINGS))}).items():
            settings = dict(json.loads({json.dumps(json.dumps(MICRO))}), **extra)
            out = {str(tmp_path)!r} + "/" + objective
            train(preset("tiny", **settings, objective=objective, steps=3, output_dir=out))
        dist.destroy_process_group()
    """)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "--no-python", sys.executable, "-c", script],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    for objective in SETTINGS:
        records = _records(tmp_path / objective / "log.jsonl")
        assert [r["step"] for r in records] == [0, 1, 2]
        assert all(np.isfinite(r["loss"]) for r in records)
        state = torch.load(tmp_path / objective / "checkpoint.pt", weights_only=True)
        assert state["world_size"] == 2 and state["config"]["objective"] == objective
        if "queue_ptr" in state["criterion"]:   # every rank's keys were enqueued: 2 ranks x 4 images
            assert int(state["criterion"]["queue_ptr"]) == 3 * 8 * (2 if objective == "mmc" else 1) % 64


class _PixelMaps(torch.nn.Module):
    """A GTSA student and teacher whose feature maps are the rendered views themselves: every
    pair's pooled maps then agree exactly where the crop term aligns them in the source image."""

    def forward(self, global_views, local_views):
        return global_views, local_views, torch.zeros(global_views.shape[0] + local_views.shape[0], 4)

    def target_maps(self, global_views):
        return global_views


def test_gtsa_crop_term_aligns_turned_views():
    cfg = _cfg("gtsa", batch_size=8, color_jitter=0.0, grayscale=0.0, num_matches_global=1, num_matches_local=1)
    batch = StepBatches(ProceduralImages(cfg.num_images, cfg.source_size), cfg)[0]
    assert batch.turns.unique().numel() > 1
    objective, maps = objective_of(cfg), _PixelMaps()
    criterion = objective.make_criterion(cfg, None, 1)
    _, metrics = objective.forward(maps, maps.target_maps, criterion, batch, cfg, 0)
    assert metrics["loss_crop"] < -0.99
    # A teacher map turned once more than its view no longer lines up.
    turned = lambda views: torch.rot90(views, 1, dims=(-2, -1))   # noqa: E731
    _, metrics = objective.forward(maps, turned, criterion, batch, cfg, 0)
    assert metrics["loss_crop"] > -0.9


def test_mmc_masks_and_pixel_targets_follow_the_token_order():
    cfg = _cfg("mmc")
    batch = StepBatches(ProceduralImages(cfg.num_images, cfg.source_size), cfg)[0]
    grid = cfg.image_size // cfg.patch_size
    assert (batch.masks.sum(-1) == masked_count(cfg)).all() and masked_count(cfg) == round(0.6 * grid ** 2)
    # Patch k of a view whose patches are constant k: its target pixels are all k.
    views = torch.arange(grid * grid, dtype=torch.float32).view(1, 1, grid, grid)
    views = views.repeat_interleave(cfg.patch_size, 2).repeat_interleave(cfg.patch_size, 3).expand(2, 3, -1, -1)
    targets = patch_pixels(views, cfg.patch_size)
    assert targets.shape == (2, grid * grid, 3 * cfg.patch_size ** 2)
    assert torch.equal(targets, torch.arange(grid * grid, dtype=torch.float32)[None, :, None].expand_as(targets))
    # The student's encoder sees the mask token at the masked patches and nothing of them.
    student = objective_of(cfg).build_student(cfg).eval()
    images, mask = torch.randn(1, 3, cfg.image_size, cfg.image_size), batch.masks[0, :1]
    other = images.clone()
    patches = other.view(1, 3, grid, cfg.patch_size, grid, cfg.patch_size).permute(0, 1, 2, 4, 3, 5)  # a view
    patches[:, :, mask[0].view(grid, grid)] = 5.0    # change the pixels of the masked patches only
    with torch.no_grad():
        encode = lambda x, m: student.encoder(x, mask=m, mask_token=student.mask_token)   # noqa: E731
        assert torch.equal(encode(images, mask), encode(other, mask))
        assert not torch.equal(encode(images, None), encode(other, None))


def test_every_flag_is_in_one_help_group_and_objective_flags_are_checked(capsys):
    grouped = [name for _, _, names in FLAG_GROUPS for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(Config) if f.name != "preset")
    assert parse_args(["--objective", "gtsa", "--global-area", "0.4", "1", "--num-local", "2"]) == \
        parse_args(["--objective", "gtsa", "--reference-area", "0.4", "1", "--num-focal", "2"])
    for argv, message in ((["--objective", "densecl", "--local-size", "8"],
                           "--local-size is a setting of --objective loca, gtsa, mmc, not of densecl"),
                          (["--objective", "gtsa", "--sharpening", "0.1"],
                           "--sharpening is a setting of --objective loca, not of gtsa")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert capsys.readouterr().err == f"loca_train: error: {message}\n"
