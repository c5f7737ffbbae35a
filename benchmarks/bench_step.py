"""One training step end to end: forward, backward and update of each objective (loca, densecl,
gtsa, mmc) through loca_train's own networks, losses and batches, as its training loop runs it:
the objective's forward (bf16 autocast on a GPU, as --amp), backward, gradient clipping,
AdamW, and the EMA teacher's update, on one batch made on the device beforehand (the batch's
images and every view parameter; the views themselves are rendered inside the step, as in
training). Each implementation gets a fresh student and teacher from the same seed.

Presets: on the CPU, small batches to keep the run short: the tiny preset at a batch of 4 and
vit_s16 at a batch of 2 (--full; the quick default runs the tiny preset alone); on a GPU,
vit_s16 and vit_b16 at the official per-GPU batch of 64 (the recipe's 1024 = 16 processes x 64,
config.py). extra_info records images per second (batch / median step time) and, as
peak_memory_bytes, the memory one step adds at its peak (allocated device memory on a GPU; the
resident set's growth on the CPU).
"""
import dataclasses
from contextlib import nullcontext

import pytest
import torch

from conftest import DEVICE, ON_GPU, measure_peak_memory, run_benchmark, sizes
from loca_train import batches, images, networks, objectives, preset, schedules

OBJECTIVES = ("loca", "densecl", "gtsa", "mmc")
# (preset, batch); None: the preset's own batch (vit_s16 and vit_b16: 64 per GPU).
PRESETS = ([("vit_s16", None), ("vit_b16", None)] if ON_GPU
           else sizes(quick=[("tiny", 4)], full=[("tiny", 4), ("vit_s16", 2)]))
PEERS = {
    "torch": "the same step with backend=\"torch\": every loca_kernels op on its pure-PyTorch "
             "reference (what the objective costs without the library's kernels)",
    "compiled": "the torch step with the objective's forward (networks and loss) under torch.compile, "
                "backward through the compiled graphs, AdamW and the EMA update eager (compilation not "
                "timed)",
}
IMPLS = ("kernels",) + tuple(PEERS)


class Step:
    """The training loop's step for one objective, preset and implementation."""

    def __init__(self, objective_name: str, preset_name: str, batch_size, impl: str):
        overrides = dict(objective=objective_name, backend="torch" if impl != "kernels" else None)
        if batch_size is not None:
            overrides["batch_size"] = batch_size
        self.cfg = cfg = preset(preset_name, **overrides)
        objective = objectives.objective_of(cfg)
        torch.manual_seed(cfg.seed)
        self.student = objective.build_student(cfg).to(DEVICE).train()
        self.teacher = networks.ema_teacher(self.student, cfg, objective.teacher_parts)
        self.criterion = objective.make_criterion(cfg, None, 1).to(DEVICE)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        source = images.open_images(None, max(cfg.batch_size, 1), cfg.source_size, cfg.seed)
        self.batch = batches.StepBatches(source, dataclasses.replace(cfg, steps=1))[0].to(DEVICE)
        forward, teacher_fn = objective.forward, getattr(self.teacher, objective.teacher_method)
        if impl == "compiled":
            forward = torch.compile(forward)
        self.loss = lambda: forward(self.student, teacher_fn, self.criterion, self.batch, cfg, 0, None)[0]
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ON_GPU and cfg.amp else nullcontext())

    def __call__(self):
        cfg = self.cfg
        with self.autocast:
            loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        self.optimizer.step()
        schedules.update_teacher(self.teacher, self.student, cfg.teacher_momentum)   # step 0's momentum
        return loss.detach()


@pytest.mark.parametrize("preset_batch", PRESETS, ids=[name for name, _ in PRESETS])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("impl", IMPLS)
def test_step(benchmark, impl, objective, preset_batch):
    preset_name, batch_size = preset_batch
    step = Step(objective, preset_name, batch_size, impl)
    batch = step.cfg.batch_size
    benchmark.group = f"step {objective} {preset_name} B={batch}"
    if impl == "compiled":
        try:
            step()                      # compiles (run_benchmark's warm-up is not timed either)
        except Exception as error:  # noqa: BLE001  (record why torch.compile cannot run here)
            pytest.skip(f"torch.compile failed: {type(error).__name__}: {error}")
    peak = measure_peak_memory(step)    # also the warm-up
    run_benchmark(benchmark, step, warmed_up=True, impl=impl, objective=objective, preset=preset_name, batch=batch,
                  embed_dim=step.cfg.embed_dim, depth=step.cfg.depth, peak_memory_bytes=peak)
    benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
