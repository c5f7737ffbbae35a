"""The LOCA pretraining application (python/loca_train): it learns, resumes exactly, runs on
two processes, and its main job (`python -m loca_train`) finishes on a CPU machine."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from loca_kernels.losses import LocaLoss
from loca_train import preset
from loca_train.batches import StepBatches
from loca_train.images import ProceduralImages
from loca_train.networks import LocaNet, ema_teacher
from loca_train.objectives.loca import loca_forward
from loca_train.train import TIMING_FIELDS

# A micro model on 16-pixel procedural images (drawn ten times faster than photo scenes at this
# size): a step takes milliseconds on one CPU core.
MICRO = dict(scenes="shapes", image_size=16, patch_size=4, focal_size=8, num_focal=2, query_tokens_kept=6,
             source_size=24, num_images=16, embed_dim=32, depth=1, num_heads=2, head_hidden_dim=32,
             head_bottleneck_dim=16, num_prototypes=32, batch_size=4, warmup_steps=2, num_workers=0,
             log_every=3, progress=False)


def _cli_args(**settings):
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def _run(args, timeout=300, **popen):
    return subprocess.run([sys.executable, "-m", "loca_train", *args], capture_output=True, text=True,
                          timeout=timeout, **popen)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def losses_on_a_fixed_batch(cfg, batch, steps):
    """The LOCA losses of `steps` AdamW steps on one batch (the teacher fixed at the student's
    initialisation), checking each loss and accuracy."""
    torch.manual_seed(0)
    student = LocaNet(cfg)
    teacher = ema_teacher(student, cfg)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    loss_fn = LocaLoss(student_temperature=cfg.student_temperature)
    losses = []
    for _ in range(steps):
        loss, metrics = loca_forward(student, teacher.reference, loss_fn, batch, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert torch.isfinite(loss)
        assert 0 <= metrics["loc_acc"] <= 1
    return losses


def test_few_steps_lower_the_loss_on_a_fixed_batch():
    cfg = preset("tiny", **MICRO)
    batch = StepBatches(ProceduralImages(cfg.num_images, cfg.source_size), cfg)[0]
    losses = losses_on_a_fixed_batch(cfg, batch, 12)
    assert losses[-1] < losses[0] - 0.3, losses


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path):
    # Stochastic depth and a loader worker: the RNG state and the data position must both resume.
    settings = dict(MICRO, steps=30, checkpoint_every=1000, stochastic_depth=0.2, num_workers=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = _run(_cli_args(**settings, output_dir=straight))
    assert done.returncode == 0, done.stderr

    process = subprocess.Popen([sys.executable, "-m", "loca_train",
                                *_cli_args(**settings, output_dir=resumed)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = resumed / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    stopped_at = torch.load(resumed / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= stopped_at < 30

    again = _run(_cli_args(**settings, output_dir=resumed, resume=True))
    assert again.returncode == 0, again.stderr
    expected = _without_timing(_records(straight / "log.jsonl"))
    assert [r["step"] for r in expected] == list(range(30))
    assert _without_timing(_records(log)) == expected
    final = [torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, resumed)]
    for name in ("student", "teacher"):
        for key, value in final[0][name].items():
            assert torch.equal(value, final[1][name][key]), (name, key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "loca_train",
         *_cli_args(**MICRO, steps=6, output_dir=out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "FutureWarning" not in result.stderr     # the loss's all-reduce is not a deprecated one
    records = _records(out / "log.jsonl")
    assert [r["step"] for r in records] == list(range(6))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 6
    # Each rank has its own random stream (saved for an exact resume) and its own images.
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    cfg = preset("tiny", **MICRO)
    images = ProceduralImages(cfg.num_images, cfg.source_size)
    ranks = [StepBatches(images, cfg, rank, 2)[0] for rank in (0, 1)]
    assert not torch.equal(ranks[0].images, ranks[1].images)
    assert not torch.equal(ranks[0].query_boxes, ranks[1].query_boxes)


@pytest.mark.skipif(os.environ.get("LOCA_TRAIN_MAIN_JOB") != "1",
                    reason="the README's main job takes minutes; set LOCA_TRAIN_MAIN_JOB=1 to run it")
def test_readme_main_job_runs_end_to_end(tmp_path):
    # The README's quick start: train, then evaluate beside the controls, in 10 minutes.
    start = time.monotonic()
    result = _run([], timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"]
    evaluated = subprocess.run([sys.executable, "-m", "loca_train.evaluate", "--run-dir", "runs/tiny"],
                               capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert time.monotonic() - start < 600
    scores = json.loads((tmp_path / "runs" / "tiny" / "eval.json").read_text())["scores"]
    assert {"teacher", "random_init", "noise", "position", "colour", "ideal"} <= set(scores)
