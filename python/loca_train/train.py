"""The training loop: setup (devices, processes, model, optimiser), resume, steps, checkpoints,
logging, and a clean stop on SIGINT/SIGTERM."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import loca_kernels
from loca_kernels.losses import LocaLoss

from . import checkpoint
from .batches import batch_loader
from .config import Config
from .images import open_images
from .model import LocaNet
from .monitor import KernelTimer, ProgressBar, StepLog, summary
from .objective import loca_forward
from .schedules import lr_factor, teacher_momentum, update_teacher

# Fields of a step record that measure time: they differ between runs, nothing else may.
TIMING_FIELDS = ("images_per_s", "time_data", "time_forward_backward", "time_step", "time_kernels")


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a request to checkpoint and stop after the current
    step; a second signal acts as usual (the default handler is restored)."""

    def __init__(self):
        self.signal = 0
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _setup_processes(cfg: Config):
    """(rank, world_size, device, group) from torchrun's environment (one process otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.device == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device_type = torch.device(cfg.device).type
    if world_size == 1:
        return 0, 1, torch.device(cfg.device if cfg.device != "auto" else device_type), None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), world_size, device, dist.group.WORLD


def _optimizer(model: torch.nn.Module, cfg: Config, world_size: int) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, ...), as LOCA."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    lr = cfg.lr * (cfg.batch_size * world_size / cfg.lr_reference_batch if cfg.lr_reference_batch else 1)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def _gather_rng_states(world_size: int) -> list:
    state = checkpoint.rng_state()
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def output_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir or os.path.join("runs", cfg.preset))


def train(cfg: Config) -> dict:
    """Run (or resume) the training `cfg` describes. Returns the summary (also written to
    <output_dir>/summary.json by rank 0); summary["interrupted"] is the signal that stopped
    the run, or 0."""
    rank, world_size, device, group = _setup_processes(cfg)
    out = output_dir(cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)                     # the same initial model on every rank
    student = LocaNet(cfg).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    optimizer = _optimizer(student, cfg, world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
    loss_fn = LocaLoss(student_temperature=cfg.student_temperature, group=group)
    torch.manual_seed(cfg.seed + 1 + rank)          # each rank its own stochastic-depth draws

    start_step = 0
    state = checkpoint.load(out / checkpoint.CHECKPOINT_NAME) if cfg.resume else None
    if state is not None:
        if state["world_size"] != world_size:
            raise ValueError(f"loca_train: the checkpoint was written by {state['world_size']} "
                             f"processes, this run has {world_size}; the data order would differ")
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"][rank])
        start_step = state["step"]
    if rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    forward_model = student
    if world_size > 1:
        forward_model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    teacher_reference = teacher.reference
    if cfg.compile:
        forward_model = torch.compile(forward_model)
        teacher_reference = torch.compile(teacher_reference)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp
                else nullcontext())

    def save(next_step: int) -> None:
        rng = _gather_rng_states(world_size)
        if rank == 0:
            checkpoint.save(out / checkpoint.CHECKPOINT_NAME, student=student.state_dict(),
                            teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), rng=rng, step=next_step,
                            world_size=world_size, config=dataclasses.asdict(cfg))

    images = open_images(cfg.data, cfg.num_images, cfg.source_size, cfg.seed)
    loader = batch_loader(images, cfg, start_step, rank, world_size)
    log = StepLog(out / "log.jsonl", start_step) if rank == 0 else None
    bar = ProgressBar(cfg.steps, start_step, cfg.log_every, cfg.progress and rank == 0)
    records, first_loss, stopped, step = [], None, 0, start_step
    if rank == 0:
        print(f"loca_train: preset {cfg.preset}, {world_size} process(es) on {device}, steps "
              f"{start_step}..{cfg.steps}, output {out}, kernels {loca_kernels.backends()}", flush=True)

    with StopRequest() as stop_request:
        t_ready = time.perf_counter()
        for step, batch in zip(range(start_step, cfg.steps), loader):
            batch = batch.to(device)
            t_data = time.perf_counter()
            # Kernel time is measured on one step in log_every (not under torch.compile, whose
            # graphs a dispatch mode would break).
            timed = cfg.log_every > 0 and (step + 1) % cfg.log_every == 0 and not cfg.compile
            timer = KernelTimer() if timed else nullcontext()
            student.train()
            with timer:
                with autocast:
                    loss, metrics = loca_forward(forward_model, teacher_reference, loss_fn, batch, cfg, group)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    student.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                momentum = teacher_momentum(cfg, step)
                update_teacher(teacher, student, momentum)
            metrics = {"loss": loss.detach(), **metrics, "grad_norm": grad_norm.detach()}
            values = torch.stack([v.float() for v in metrics.values()] +
                                 [torch.tensor(float(stop_request.signal), device=device)])
            if world_size > 1:
                dist.all_reduce(values)   # averages the metrics, and tells every rank about a stop
                values[:-1] /= world_size
            values = values.tolist()
            t_done = time.perf_counter()
            record = {"step": step, **dict(zip(metrics, values[:-1])), "lr": lr,
                      "teacher_momentum": momentum,
                      "images_per_s": cfg.batch_size * world_size / (t_done - t_ready),
                      "time_data": t_data - t_ready, "time_forward_backward": t_done - t_data,
                      "time_step": t_done - t_ready}
            if timed:
                record["time_kernels"] = timer.seconds()
            first_loss = record["loss"] if first_loss is None else first_loss
            records.append(record)
            if log is not None:
                log.write(record)
            bar.update(step, record)
            stopped = int(values[-1])
            if stopped or (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                save(step + 1)
            if stopped:
                break
            t_ready = time.perf_counter()

    result = {**summary(records, first_loss), "interrupted": stopped, "world_size": world_size}
    if rank == 0:
        log.close()
        (out / "summary.json").write_text(json.dumps(result, indent=1))
        if stopped:
            print(f"\nloca_train: stopped by signal {stopped} after step {step}; checkpoint saved, "
                  f"continue with --resume --output-dir {out}", flush=True)
    return result

