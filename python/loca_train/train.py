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

import torch
import torch.distributed as dist

from . import checkpoint
from .batches import batch_loader
from .config import Config, UsageError
from .images import ImageFolder, open_images
from .model import ema_teacher
from .monitor import KernelTimer, ProgressBar, StepLog, format_duration, kernels_in_words, summary, versions
from .objectives import objective_of
from .schedules import lr_factor, teacher_momentum, update_teacher

# Fields of a step record that measure time: they differ between runs, nothing else may.
TIMING_FIELDS = ("images_per_s", "time_data", "time_forward_backward", "time_step", "time_kernels", "time_eval")
LOG_NAME = "log.jsonl"


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
    out = output_dir(cfg)
    if cfg.resume and not (out / checkpoint.CHECKPOINT_NAME).exists():
        raise UsageError(f"--resume: no checkpoint ({checkpoint.CHECKPOINT_NAME}) in {out}")
    existing = [name for name in (LOG_NAME, checkpoint.CHECKPOINT_NAME) if (out / name).exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"{out} already holds a run ({', '.join(existing)}); continue it with --resume "
                         f"or replace it with --overwrite")
    images = open_images(cfg.data, cfg.num_images, cfg.source_size, cfg.seed, cfg.scenes)
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


def _gather(value, world_size: int) -> list:
    """`value` of every rank, in rank order."""
    if world_size == 1:
        return [value]
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def output_dir(cfg: Config) -> Path:
    """cfg.output_dir, else runs/<preset> (LOCA) or runs/<preset>-<objective>."""
    default = cfg.preset if cfg.objective == "loca" else f"{cfg.preset}-{cfg.objective}"
    return Path(cfg.output_dir or os.path.join("runs", default))


def _banner(cfg: Config, world_size: int, device: torch.device, images, out: Path, start_step: int) -> str:
    if isinstance(images, ImageFolder):
        data = f"{len(images)} images from {cfg.data}"
    else:
        data = f"{len(images)} procedural images (built in, {cfg.source_size} px)"
    run = f"resuming at step {start_step} of {cfg.steps}" if start_step else f"{cfg.steps} steps"
    return (f"loca_train: {cfg.objective}, preset {cfg.preset}, {run}\n"
            f"  processes  {world_size} on {device}"
            f"{', bf16 autocast' if device.type == 'cuda' and cfg.amp else ''}\n"
            f"  kernels    {kernels_in_words(device, cfg.backend)}\n"
            f"  data       {data}, batch {cfg.batch_size} per process\n"
            f"  output     {out}")


def train(cfg: Config) -> dict:
    """Run (or resume) the training `cfg` describes. Returns the summary (also written to
    <output_dir>/summary.json by rank 0); summary["interrupted"] is the signal that stopped
    the run, or 0. Input the user has to fix raises UsageError before any work starts (a
    corrupt image when it is met, unless cfg.skip_bad_images)."""
    t_start = time.perf_counter()
    images = check_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    rank, world_size, device, group = _setup_processes(cfg)
    out = output_dir(cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:   # an interrupted new run must not leave the old run's checkpoint
            for name in (checkpoint.CHECKPOINT_NAME, "summary.json"):
                (out / name).unlink(missing_ok=True)
    objective = objective_of(cfg)
    torch.manual_seed(cfg.seed)                     # the same initial model (and queues) on every rank
    student = objective.build_student(cfg).to(device)
    teacher = ema_teacher(student, cfg, objective.teacher_parts)
    optimizer = _optimizer(student, cfg, world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
    criterion = objective.make_criterion(cfg, group, world_size).to(device)
    torch.manual_seed(cfg.seed + 1 + rank)          # each rank its own stochastic-depth draws

    start_step, skipped = 0, set()                  # skipped: files of images that could not be decoded
    state = checkpoint.load(out / checkpoint.CHECKPOINT_NAME) if cfg.resume else None
    if state is not None:
        if state["world_size"] != world_size:
            raise UsageError(f"the checkpoint in {out} was written by {state['world_size']} processes, "
                             f"this run has {world_size}; the data order would differ")
        written_by = state["config"].get("objective", "loca")
        if written_by != cfg.objective:
            raise UsageError(f"--objective {cfg.objective}: the checkpoint in {out} is a {written_by} run")
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        criterion.load_state_dict(state.get("criterion", {}))   # LOCA checkpoints of before: no state
        checkpoint.set_rng_state(state["rng"][rank])
        start_step, skipped = state["step"], set(state.get("skipped_images", ()))
    # The settings as they took effect: where the output went, the device, the real image count.
    resolved = dataclasses.asdict(dataclasses.replace(
        cfg, output_dir=str(out.resolve()), device=str(device), num_images=len(images),
        data=os.path.abspath(cfg.data) if cfg.data else None))
    if rank == 0:
        (out / "config.json").write_text(json.dumps(
            {**resolved, "world_size": world_size, "versions": versions()}, indent=1))

    forward_model = student
    if world_size > 1:
        forward_model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    teacher_fn = getattr(teacher, objective.teacher_method)
    if cfg.compile:
        forward_model = torch.compile(forward_model)
        teacher_fn = torch.compile(teacher_fn)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp
                else nullcontext())

    def all_skipped() -> list:
        return sorted(set().union(*_gather(skipped, world_size)))

    def save(next_step: int) -> None:
        rng, skipped_images = _gather(checkpoint.rng_state(), world_size), all_skipped()
        if rank == 0:
            checkpoint.save(out / checkpoint.CHECKPOINT_NAME, student=student.state_dict(),
                            teacher=teacher.state_dict(), criterion=criterion.state_dict(),
                            optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), rng=rng, step=next_step,
                            world_size=world_size, config=resolved, skipped_images=skipped_images)

    loader = batch_loader(images, cfg, start_step, rank, world_size)
    log = StepLog(out / LOG_NAME, start_step) if rank == 0 else None
    bar = ProgressBar(cfg.steps, start_step, cfg.log_every, cfg.progress and rank == 0)
    records, first_loss, stopped, step = [], None, 0, start_step
    eval_split = None
    if cfg.eval_every:
        # Imported here, not at the top: the package imports this module, and runpy warns when
        # `python -m loca_train.evaluate` finds itself imported already.
        from .evaluate import procedural_split, training_metrics
        eval_split = procedural_split(cfg, 2 * cfg.eval_images, cfg.eval_images)
    if rank == 0:
        print(_banner(cfg, world_size, device, images, out, start_step), flush=True)

    with StopRequest() as stop_request:
        t_ready = time.perf_counter()
        for step, batch in zip(range(start_step, cfg.steps), loader):
            for index in batch.bad_images.tolist():
                if not cfg.skip_bad_images:
                    raise images.decode_error(index)
                if images.files[index] not in skipped:
                    skipped.add(images.files[index])
                    print(f"loca_train: skipped {images.files[index]} (cannot be decoded)", file=sys.stderr)
            batch = batch.to(device)
            t_data = time.perf_counter()
            # Kernel time is measured on one step in log_every (not under torch.compile, whose
            # graphs a dispatch mode would break).
            timed = cfg.log_every > 0 and (step + 1) % cfg.log_every == 0 and not cfg.compile
            timer = KernelTimer() if timed else nullcontext()
            student.train()
            with timer:
                with autocast:
                    loss, metrics = objective.forward(forward_model, teacher_fn, criterion, batch, cfg, step, group)
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
            if rank == 0 and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                t_eval = time.perf_counter()
                record.update(training_metrics(teacher.encoder, cfg, device, eval_split))
                record["time_eval"] = time.perf_counter() - t_eval
                if cfg.progress:
                    print(f"loca_train: eval at step {step + 1}: " + ", ".join(
                        f"{key[5:]} {value:.3f}" for key, value in record.items() if key.startswith("eval_")),
                        file=sys.stderr, flush=True)
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

    skipped_images = all_skipped()
    wall = time.perf_counter() - t_start
    result = {**summary(records, first_loss), "interrupted": stopped, "world_size": world_size,
              "wall_time_s": wall, "skipped_images": len(skipped_images),
              "skipped_image_files": skipped_images}
    if rank == 0:
        log.close()
        (out / "summary.json").write_text(json.dumps(result, indent=1))
        if stopped:
            print(f"\nloca_train: stopped by signal {stopped} after step {step} ({format_duration(wall)}); "
                  f"checkpoint saved, continue with --resume --output-dir {out}", flush=True)
        else:
            written = [name for name in ("summary.json", LOG_NAME, checkpoint.CHECKPOINT_NAME, "config.json")
                       if (out / name).exists()]
            print(f"loca_train: done in {format_duration(wall)}: results in {out}/ ({', '.join(written)})",
                  flush=True)
    return result

