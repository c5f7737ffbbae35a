"""The training loop: setup (devices, processes, model, optimiser), resume, steps, checkpoints,
logging, and a clean stop on SIGINT/SIGTERM."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from loca_kernels.distributed import objects_of_ranks

from . import checkpoint, run_folder
from .batches import batch_loader
from .config import Config, UsageError, resume_changes
from .evaluation.data import monitoring_split
from .evaluation.runner import training_metrics
from .images import ImageFolder, entries_in_words, open_images
from .monitor import KernelTimer, ProgressBar, format_duration, kernels_in_words, summary, versions
from .networks import ema_teacher
from .objectives import Objective, objective_of
from .photos import PhotoScenes
from .schedules import lr_factor, teacher_momentum, update_teacher

# Fields of a step record that measure time: they differ between runs, nothing else may.
TIMING_FIELDS = ("images_per_s", "time_data", "time_forward_backward", "time_step", "time_kernels", "time_eval")
LOG_NAME = run_folder.LOG_NAME


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


def _device_type(cfg: Config) -> str:
    """The device type ("cuda", "cpu", ...) of cfg.device; UsageError when it cannot be used here."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise UsageError(f"--device {cfg.device}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {cfg.device}: CUDA is not available here (torch {torch.__version__})")
    return device.type


def check_run(cfg: Config, world_size: int):
    """Every check of the user's input that needs no work (no process group, no model): the
    device, the output folder, the data. Raises UsageError; returns the image set."""
    _device_type(cfg)
    run_folder.check_folder(cfg.resume, cfg.overwrite, output_dir(cfg))
    images = open_images(cfg.data, cfg.num_images, cfg.source_size, cfg.seed, cfg.skip_bad_images, cfg.scenes)
    if len(images) < cfg.batch_size * world_size:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        source = cfg.data or ("photo scenes" if cfg.scenes == "photos" else "procedural set")
        raise UsageError(f"{len(images)} images ({source}) are fewer than one "
                         f"batch ({cfg.batch_size}{processes})")
    return images


def _setup_processes(cfg: Config):
    """(rank, world_size, device, group) from torchrun's environment (one process otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device_type = _device_type(cfg)
    if world_size == 1:
        return 0, 1, torch.device(cfg.device if cfg.device != "auto" else device_type), None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # Every rank has checked the output folder (check_run) before rank 0 writes to it.
    dist.barrier()
    return dist.get_rank(), world_size, device, dist.group.WORLD


def _optimizer(model: torch.nn.Module, cfg: Config, world_size: int) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, ...), as LOCA."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    lr = cfg.lr * (cfg.batch_size * world_size / cfg.lr_reference_batch if cfg.lr_reference_batch else 1)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def output_dir(cfg: Config) -> Path:
    """cfg.output_dir, else runs/<preset> (LOCA) or runs/<preset>-<objective>."""
    default = cfg.preset if cfg.objective == "loca" else f"{cfg.preset}-{cfg.objective}"
    return Path(cfg.output_dir or os.path.join("runs", default))


def _banner(cfg: Config, world_size: int, device: torch.device, images, out: Path, start_step: int) -> str:
    if isinstance(images, ImageFolder):
        data = f"{len(images)} images from {cfg.data}"
    elif isinstance(images, PhotoScenes):
        data = f"{len(images)} photo scenes (built in, their train split, {images.size} px)"
    else:
        data = f"{len(images)} procedural images (built in, {cfg.source_size} px)"
    run = f"resuming at step {start_step} of {cfg.steps}" if start_step else f"{cfg.steps} steps"
    return (f"loca_train: {cfg.objective}, preset {cfg.preset}, {run}\n"
            f"  processes  {world_size} on {device}"
            f"{', bf16 autocast' if device.type == 'cuda' and cfg.amp else ''}\n"
            f"  kernels    {kernels_in_words(device, cfg.backend)}\n"
            f"  data       {data}, batch {cfg.batch_size} per process\n"
            f"  output     {out}")


@dataclasses.dataclass
class Run:
    """What one training run holds: where it runs, its networks, optimiser and loss, and where
    it stands (the step it starts from, the images skipped so far)."""

    cfg: Config
    images: object
    rank: int
    world_size: int
    device: torch.device
    group: object
    out: Path
    objective: Objective
    student: torch.nn.Module
    teacher: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    criterion: torch.nn.Module
    start_step: int = 0
    skipped: set = dataclasses.field(default_factory=set)   # files of images that could not be decoded
    resolved: dict = dataclasses.field(default_factory=dict)


def train(cfg: Config) -> dict:
    """Run (or resume) the training `cfg` describes. Returns the summary (also written to
    <output_dir>/summary.json by rank 0); summary["interrupted"] is the signal that stopped
    the run, or 0. Input the user has to fix raises UsageError before any work starts (a
    corrupt image when it is met, unless cfg.skip_bad_images). Rank 0 holds the output
    folder's lock until it returns."""
    with run_folder.RunLock(output_dir(cfg)) as lock:
        return _train(cfg, lock)


def _train(cfg: Config, lock: run_folder.RunLock) -> dict:
    t_start = time.perf_counter()
    images = check_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    run = _build(cfg, images, lock)
    if cfg.resume:
        _resume(run)
    _write_config(run)
    if run.rank == 0:
        print(_banner(cfg, run.world_size, run.device, images, run.out, run.start_step), flush=True)
        if images.bad_entries:
            print(f"loca_train: --skip-bad-images: skipping {entries_in_words(images.bad_entries)}",
                  file=sys.stderr, flush=True)
    records, stopped, step = _steps(run, lock)
    return _finish(run, records, stopped, step, time.perf_counter() - t_start)


def _build(cfg: Config, images, lock: run_folder.RunLock) -> Run:
    """Processes, the output folder (rank 0 locks it), and the objective's networks, optimiser
    and loss."""
    rank, world_size, device, group = _setup_processes(cfg)
    out = output_dir(cfg)
    if rank == 0:
        lock.acquire()
        run_folder.check_folder(cfg.resume, cfg.overwrite, out)     # again, now that no other trainer can change it
        run_folder.remove_temporary_files(out)
        if cfg.overwrite:   # an interrupted new run must not leave the old run's checkpoints
            for name in (checkpoint.CHECKPOINT_NAME, checkpoint.PREVIOUS_NAME, run_folder.SUMMARY_NAME):
                (out / name).unlink(missing_ok=True)
    objective = objective_of(cfg)
    torch.manual_seed(cfg.seed)                     # the same initial model (and queues) on every rank
    student = objective.build_student(cfg).to(device)
    teacher = ema_teacher(student, cfg, objective.teacher_parts)
    optimizer = _optimizer(student, cfg, world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
    criterion = objective.make_criterion(cfg, group, world_size).to(device)
    torch.manual_seed(cfg.seed + 1 + rank)          # each rank its own stochastic-depth draws
    # The settings as they took effect: where the output went, the device, the real image count.
    resolved = dataclasses.asdict(dataclasses.replace(
        cfg, output_dir=str(out.resolve()), device=str(device), num_images=len(images),
        data=os.path.abspath(cfg.data) if cfg.data else None))
    # skipped: files of images that could not be decoded, and entries that could not be read
    return Run(cfg, images, rank, world_size, device, group, out, objective, student, teacher, optimizer, scheduler,
               criterion, skipped=set(images.bad_entries), resolved=resolved)


def _resume(run: Run) -> None:
    """Every state of the checkpoint in the output folder, checked to belong to this run."""
    cfg, out = run.cfg, run.out
    state = run_folder.load_for_resume(out, move_unreadable=run.rank == 0)
    if state is None:
        return
    if state["world_size"] != run.world_size:
        raise UsageError(f"the checkpoint in {out} was written by {state['world_size']} processes, "
                         f"this run has {run.world_size}; the data order would differ")
    written_by = state["config"].get("objective", "loca")
    if written_by != cfg.objective:
        raise UsageError(f"--objective {cfg.objective}: the checkpoint in {out} is a {written_by} run")
    run_folder.check_resume(run.resolved, state["config"], out, resume_changes(cfg))
    run.student.load_state_dict(state["student"])
    run.teacher.load_state_dict(state["teacher"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.criterion.load_state_dict(state.get("criterion", {}))   # LOCA checkpoints of before: no state
    checkpoint.set_rng_state(state["rng"][run.rank])
    run.start_step = state["step"]
    run.skipped |= set(state.get("skipped_images", ()))


def _write_config(run: Run) -> None:
    """config.json: the settings as they took effect (run.resolved), the process count and the
    versions."""
    if run.rank == 0:
        checkpoint.write_text(run.out / run_folder.CONFIG_NAME, json.dumps(
            {**run.resolved, "world_size": run.world_size, "versions": versions()}, indent=1))


def _all_skipped(run: Run) -> list:
    """The files skipped by every rank so far, sorted."""
    return sorted(set().union(*objects_of_ranks(run.skipped, run.group)))


def _save(run: Run, next_step: int, log) -> None:
    """The checkpoint (rank 0 writes it; every rank's RNG state is in it)."""
    rng, skipped_images = objects_of_ranks(checkpoint.rng_state(), run.group), _all_skipped(run)
    if run.rank == 0:
        log.sync()      # the log holds at least the steps the checkpoint counts
        checkpoint.save(run.out / checkpoint.CHECKPOINT_NAME, student=run.student.state_dict(),
                        teacher=run.teacher.state_dict(), criterion=run.criterion.state_dict(),
                        optimizer=run.optimizer.state_dict(),
                        scheduler=run.scheduler.state_dict(), rng=rng, step=next_step,
                        world_size=run.world_size, config=run.resolved, skipped_images=skipped_images)


class _Forward(NamedTuple):
    """How a step calls the networks: the (DDP, compiled) student, the teacher's method, autocast."""

    student: Callable
    teacher: Callable
    autocast: object


def _forward_functions(run: Run) -> _Forward:
    cfg, device = run.cfg, run.device
    student = run.student
    if run.world_size > 1:
        student = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    teacher = getattr(run.teacher, run.objective.teacher_method)
    if cfg.compile:
        student, teacher = torch.compile(student), torch.compile(teacher)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp
                else nullcontext())
    return _Forward(student, teacher, autocast)


def _note_bad_images(run: Run, batch) -> None:
    """Raise on an image that could not be decoded, or (cfg.skip_bad_images) note it once."""
    for index in batch.bad_images.tolist():
        if not run.cfg.skip_bad_images:
            raise run.images.decode_error(index)
        name = run.images.files[index]
        if name not in run.skipped:
            run.skipped.add(name)
            print(f"loca_train: skipped {name} (cannot be decoded)", file=sys.stderr)


def _steps(run: Run, lock: run_folder.RunLock):
    """The training loop from run.start_step; returns (records, the stopping signal or 0, last step)."""
    cfg = run.cfg
    forward = _forward_functions(run)
    loader = batch_loader(run.images, cfg, run.start_step, run.rank, run.world_size)
    log = lock.closes(run_folder.StepLog(run.out / LOG_NAME, run.start_step)) if run.rank == 0 else None
    bar = ProgressBar(cfg.steps, run.start_step, cfg.log_every, cfg.progress and run.rank == 0)
    # --eval-every reads training and validation scenes only, never the test scenes.
    eval_split = monitoring_split(cfg, cfg.eval_images) if cfg.eval_every else None
    records, stopped, step = [], 0, run.start_step
    with StopRequest() as stop_request:
        t_ready = time.perf_counter()
        for step, batch in zip(range(run.start_step, cfg.steps), loader):
            _note_bad_images(run, batch)
            record, stopped = _step(run, forward, batch.to(run.device), step, stop_request.signal, t_ready)
            if eval_split is not None and run.rank == 0 and _eval_due(cfg, step):
                _evaluate(run, record, step, eval_split)
            records.append(record)
            if log is not None:
                log.write(record)
            bar.update(step, record)
            if stopped or (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                _save(run, step + 1, log)
            if stopped:
                break
            t_ready = time.perf_counter()
    if log is not None:
        log.close()
    return records, stopped, step


def _step(run: Run, forward: _Forward, batch, step: int, signal_seen: int, t_ready: float):
    """One optimisation step and the EMA update; returns (its log record, the signal that asks
    every rank to stop, or 0)."""
    cfg, t_data = run.cfg, time.perf_counter()
    # Kernel time is measured on one step in log_every (not under torch.compile, whose graphs a
    # dispatch mode would break).
    timed = cfg.log_every > 0 and (step + 1) % cfg.log_every == 0 and not cfg.compile
    timer = KernelTimer() if timed else nullcontext()
    run.student.train()
    with timer:
        with forward.autocast:
            loss, metrics = run.objective.forward(forward.student, forward.teacher, run.criterion, batch, cfg, step,
                                                  run.group)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            run.student.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.step()
        run.scheduler.step()
        momentum = teacher_momentum(cfg, step)
        update_teacher(run.teacher, run.student, momentum)
    metrics = {"loss": loss.detach(), **metrics, "grad_norm": grad_norm.detach()}
    values = torch.stack([v.float() for v in metrics.values()] +
                         [torch.tensor(float(signal_seen), device=run.device)])
    if run.world_size > 1:
        dist.all_reduce(values)   # averages the metrics, and tells every rank about a stop
        values[:-1] /= run.world_size
    values = values.tolist()
    t_done = time.perf_counter()
    record = {"step": step, **dict(zip(metrics, values[:-1])), "lr": lr, "teacher_momentum": momentum,
              "images_per_s": cfg.batch_size * run.world_size / (t_done - t_ready),
              "time_data": t_data - t_ready, "time_forward_backward": t_done - t_data, "time_step": t_done - t_ready}
    if timed:
        record["time_kernels"] = timer.seconds()
    return record, int(values[-1])


def _eval_due(cfg: Config, step: int) -> bool:
    return (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps


def _evaluate(run: Run, record: dict, step: int, eval_split) -> None:
    """--eval-every: the teacher encoder's headline metrics added to the step's record."""
    t_eval = time.perf_counter()
    split, eval_cfg = eval_split
    record.update(training_metrics(run.teacher.encoder, eval_cfg, run.device, split))
    record["time_eval"] = time.perf_counter() - t_eval
    if run.cfg.progress:
        print(f"loca_train: eval at step {step + 1}: " + ", ".join(
            f"{key[5:]} {value:.3f}" for key, value in record.items() if key.startswith("eval_")),
            file=sys.stderr, flush=True)


def _finish(run: Run, records: list, stopped: int, step: int, wall: float) -> dict:
    """The summary (summary.json from rank 0) and the closing line."""
    skipped_images, out = _all_skipped(run), run.out
    first_loss = records[0]["loss"] if records else None
    result = {**summary(records, first_loss), "interrupted": stopped, "world_size": run.world_size,
              "wall_time_s": wall, "skipped_images": len(skipped_images),
              "skipped_image_files": skipped_images}
    if run.rank != 0:
        return result
    result = run_folder.write_summary(out, result, ran_steps=bool(records))
    if stopped:
        print(f"\nloca_train: stopped by signal {stopped} after step {step} ({format_duration(wall)}); "
              f"checkpoint saved, continue with --resume --output-dir {out}", flush=True)
    else:
        written = [name for name in ("summary.json", LOG_NAME, checkpoint.CHECKPOINT_NAME, "config.json")
                   if (out / name).exists()]
        print(f"loca_train: done in {format_duration(wall)}: results in {out}/ ({', '.join(written)})", flush=True)
    return result
