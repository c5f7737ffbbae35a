"""Run folders that lose nothing under faults (issue 27, points 1, 4 and 5): SIGKILL at the file
operations of a checkpoint write and of a log write (and at random times), a full disk
(simulated ENOSPC at every operation, and a real small tmpfs when the tests run as root),
changed bytes, truncated, empty and foreign checkpoints, two trainers on one folder, resumes
with changed settings, a finished run's summary, and the one-line errors of evaluate and
export. Each asserts what is kept, not only that an error came. Faults are injected in forked
children (no interpreter start); the trainer runs the micro model for at most 3 steps."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from loca_train import __main__ as cli
from loca_train import checkpoint, export, run_folder
from loca_train import evaluate as ev
from loca_train.config import UsageError
from test_train import MICRO, _cli_args, _records
from test_train_cli import _assert_usage_error, _main

FILE_OPS = ("write", "fsync", "replace", "link", "ftruncate")
LATEST, PREVIOUS = checkpoint.CHECKPOINT_NAME, checkpoint.PREVIOUS_NAME


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """fsync is for power loss, which no test here makes; each costs ~10 ms (still counted as a
    file operation where faults are injected)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def _state(step: int) -> dict:
    """A checkpoint-shaped state whose every value follows from `step` (about 140 KB)."""
    g = torch.Generator().manual_seed(step)
    return dict(step=step, config={"seed": step, "area": (0.25, 1.0), "data": None},
                student={"encoder.w": torch.randn(64, 256, generator=g), "encoder.b": torch.randn(256, generator=g)},
                teacher={"encoder.w": torch.randn(64, 128, generator=g), "encoder.n": torch.arange(step + 3)},
                rng=[{"torch": torch.randint(0, 255, (500,), dtype=torch.uint8, generator=g)}])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _is_state(loaded: dict, step: int) -> bool:
    return _same({k: v for k, v in loaded.items() if k != "checksum"}, _state(step))


def _hooked_ops(kill_at: int = 0, fail_at: int = 0, calls=None) -> dict:
    """os.write/fsync/replace/link/ftruncate wrapped: the `kill_at`-th call SIGKILLs this
    process, the `fail_at`-th raises ENOSPC (a full disk), an os.write in both cases after
    writing half its bytes (a torn or short write); `calls` collects the names called."""
    calls = calls if calls is not None else []
    real = {name: getattr(os, name) for name in FILE_OPS}

    def wrap(name):
        def op(*args, **kwargs):
            calls.append(name)
            if len(calls) in (kill_at, fail_at):
                if name == "write" and len(args[1]) > 1:
                    real["write"](args[0], bytes(args[1][:len(args[1]) // 2]))
                if len(calls) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real[name](*args, **kwargs)
        return op

    return {name: wrap(name) for name in FILE_OPS}


def _in_child(fn) -> int:
    """Run fn() in a forked child; the signal that ended it (0 when it returned)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def _killed_at(k: int, fn) -> int:
    def child():
        for name, function in _hooked_ops(kill_at=k).items():
            setattr(os, name, function)
        fn()
    return _in_child(child)


def _operations(fn, monkeypatch) -> list:
    """The file operations fn() makes, in order (run here, then undone by the caller)."""
    calls = []
    with monkeypatch.context() as patch:
        for name, function in _hooked_ops(calls=calls).items():
            patch.setattr(os, name, function)
        fn()
    return calls


def _kill_points(calls: list, writes: int = 8) -> list:
    """Every operation that is not a write, and `writes` writes spread over the rest (1-based)."""
    write_at = [i + 1 for i, name in enumerate(calls) if name == "write"]
    spread = write_at[::max(1, len(write_at) // writes)] + write_at[-1:]
    return sorted({i + 1 for i, name in enumerate(calls) if name != "write"} | set(spread))


# ------------------------------------------------------------------ checkpoints under SIGKILL and a full disk

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two")
    checkpoint.save(folder / LATEST, **_state(1))
    checkpoint.save(folder / LATEST, **_state(2))
    return folder


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def _assert_kept_after_a_cut_save(folder: Path) -> int:
    """After a save of step 3 cut anywhere: the newest readable checkpoint is step 2 or 3, with
    its exact content, and a good one before it is kept; no temporary file once cleaned."""
    state, path = checkpoint.load_latest(folder)
    step = state["step"]
    assert path == folder / LATEST and step in (2, 3) and _is_state(state, step), (step, path)
    before = checkpoint.load(folder / PREVIOUS)
    assert _is_state(before, 2) if step == 3 else before["step"] in (1, 2) and _is_state(before, before["step"])
    run_folder.remove_temporary_files(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([LATEST, PREVIOUS])
    return step


def test_sigkill_at_the_file_operations_of_a_checkpoint_write(two_checkpoints, tmp_path, monkeypatch):
    save = lambda folder: checkpoint.save(folder / LATEST, **_state(3))  # noqa: E731
    calls = _operations(lambda: save(_copy(two_checkpoints, tmp_path / "count")), monkeypatch)
    points = _kill_points(calls)
    assert {"write", "fsync", "replace", "link"} <= set(calls) and len(points) >= 12
    steps = []
    for k in points:
        folder = _copy(two_checkpoints, tmp_path / f"kill{k}")
        assert _killed_at(k, lambda: save(folder)) == signal.SIGKILL
        steps.append(_assert_kept_after_a_cut_save(folder))
    assert steps[0] == 2 and steps[-1] == 3                # killed before anything, and after the new file is in


def test_sigkill_at_random_times_while_checkpointing(two_checkpoints, tmp_path):
    rng = random.Random(0)
    for case in range(8):
        folder = _copy(two_checkpoints, tmp_path / f"case{case}")
        pid = os.fork()
        if pid == 0:
            try:
                for step in range(3, 10_000):
                    checkpoint.save(folder / LATEST, **_state(step))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        state, _ = checkpoint.load_latest(folder)
        assert _is_state(state, state["step"])
        before = checkpoint.load(folder / PREVIOUS)
        assert before["step"] in (state["step"] - 1, state["step"]) and _is_state(before, before["step"])


def test_a_full_disk_at_each_file_operation_of_a_checkpoint_write(two_checkpoints, tmp_path, monkeypatch):
    calls = _operations(lambda: checkpoint.save(_copy(two_checkpoints, tmp_path / "count") / LATEST, **_state(3)),
                        monkeypatch)
    errors = 0
    for k in range(1, len(calls) + 1):
        folder = _copy(two_checkpoints, tmp_path / f"full{k}")
        with monkeypatch.context() as patch:
            for name, function in _hooked_ops(fail_at=k).items():
                patch.setattr(os, name, function)
            try:
                checkpoint.save(folder / LATEST, **_state(3))
                failed = None
            except UsageError as error:
                failed = str(error)
        state, _ = checkpoint.load_latest(folder)
        assert not list(folder.glob(".*.tmp"))             # no partial file left
        if failed is None:
            raise AssertionError(f"the ENOSPC of operation {k} ({calls[k - 1]}) was not reported")
        errors += 1
        assert "\n" not in failed and f"cannot write {folder / LATEST}: No space left on device" in failed, failed
        assert "--resume" in failed
        # Before the new file is in place nothing changed; after (the folder's fsync) it is the new one.
        assert _is_state(state, 2 if k < len(calls) else 3)
    assert errors == len(calls)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _unmount(path: Path) -> None:
    """Unmount; a file left open (a failure to report) must not leave the mount behind."""
    if subprocess.run(["umount", str(path)]).returncode:
        subprocess.run(["umount", "-l", str(path)], check=True)
        raise AssertionError(f"a file on {path} was still open")


def test_a_real_full_disk_keeps_the_last_checkpoint_and_the_log_whole(two_checkpoints, tmp_path):
    disk = tmp_path / "disk"
    size = (two_checkpoints / LATEST).stat().st_size
    if not _mount_tmpfs(disk, f"{5 * size // 2 // 1024}k"):     # room for two checkpoints, not three
        pytest.skip("needs root and tmpfs mounts (the simulated ENOSPC tests cover the code)")
    try:
        checkpoint.save(disk / LATEST, **_state(1))
        checkpoint.save(disk / LATEST, **_state(2))
        with pytest.raises(UsageError, match=f"cannot write {disk / LATEST}: No space left on device"):
            checkpoint.save(disk / LATEST, **_state(3))
        assert _is_state(checkpoint.load_latest(disk)[0], 2) and _is_state(checkpoint.load(disk / PREVIOUS), 1)
        assert sorted(p.name for p in disk.iterdir()) == [PREVIOUS, LATEST]
        log = run_folder.StepLog(disk / run_folder.LOG_NAME, 0)
        with pytest.raises(UsageError, match=f"cannot write {disk / run_folder.LOG_NAME}: No space left"):
            for step in range(100_000):
                log.write({"step": step, "loss": 1.0, "padding": "x" * 200})
        log.close()
        records, _ = run_folder.read_log(disk / run_folder.LOG_NAME)
        assert [r["step"] for r in records] == list(range(step))          # every line whole, no torn one
        assert (disk / run_folder.LOG_NAME).read_bytes().endswith(b"\n")
    finally:
        _unmount(disk)


# ------------------------------------------------------------------ changed, truncated, empty and foreign files

def test_changed_bytes_are_detected_or_harmless_never_loaded_wrong(two_checkpoints, tmp_path, capsys):
    original = (two_checkpoints / LATEST).read_bytes()
    rng = random.Random(1)
    positions = sorted(rng.sample(range(len(original)), 150))
    kinds = {"detected": 0, "harmless": 0}
    folder = _copy(two_checkpoints, tmp_path / "run")
    for position in positions:
        data = bytearray(original)
        data[position] ^= rng.randrange(1, 256)
        (folder / LATEST).write_bytes(bytes(data))
        state, path = checkpoint.load_latest(folder)
        if path == folder / LATEST:
            assert _is_state(state, 2), position              # a byte nothing reads (zip padding, a CRC)
            kinds["harmless"] += 1
        else:
            assert path == folder / PREVIOUS and _is_state(state, 1)
            kinds["detected"] += 1
    assert kinds["detected"] > 120, kinds
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == kinds["detected"] and all(f"using {folder / PREVIOUS} (step 1)" in w for w in warnings)


def _foreign_files(folder: Path) -> dict:
    """name -> what load must say, for files that are not a loca_train training checkpoint."""
    folder.mkdir()
    torch.save({"encoder.w": torch.zeros(2)}, folder / "state_dict.pt")       # e.g. an export
    torch.save([1, 2], folder / "list.pt")
    (folder / "text.pt").write_text("not a checkpoint\n")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "dir.pt").mkdir()
    return {"state_dict.pt": "is not a loca_train training checkpoint", "list.pt": "is not a loca_train training",
            "text.pt": "is corrupt", "empty.pt": "is empty", "dir.pt": "is a directory"}


def test_truncated_empty_and_foreign_files_are_one_line_errors(two_checkpoints, tmp_path):
    original = (two_checkpoints / LATEST).read_bytes()
    lengths = sorted(set(random.Random(2).sample(range(len(original)), 40)) | {0, 1, len(original) - 1})
    for length in lengths:
        path = tmp_path / f"cut{length}.pt"
        path.write_bytes(original[:length])
        with pytest.raises(checkpoint.UnreadableCheckpoint) as error:
            checkpoint.load(path)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    for name, message in _foreign_files(tmp_path / "foreign").items():
        with pytest.raises(checkpoint.UnreadableCheckpoint, match=message):
            checkpoint.load(tmp_path / "foreign" / name)
    # Neither readable: one line naming both files and what to do.
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / LATEST).write_bytes(original[:100])
    (folder / PREVIOUS).write_bytes(b"")
    with pytest.raises(checkpoint.UnreadableCheckpoint) as error:
        run_folder.load_for_resume(folder)
    assert f"{folder / LATEST} is truncated" in str(error.value) and f"{folder / PREVIOUS} is empty" in str(error.value)
    assert "--overwrite" in str(error.value) and sorted(p.name for p in folder.iterdir()) == [PREVIOUS, LATEST]


# ------------------------------------------------------------------ the log under SIGKILL and a full disk

def _line(step: int, session: int) -> dict:
    return {"step": step, "loss": step + session / 10, "session": session}


def _log_with(path: Path, steps: int) -> bytes:
    path.write_text("".join(json.dumps(_line(s, 0)) + "\n" for s in range(steps)))
    return path.read_bytes()


def test_sigkill_at_the_file_operations_of_a_log_resume(tmp_path, monkeypatch, capsys):
    """A resume at step 6 of a 10-line log, then steps 6..11: killed at each operation, the
    lines before step 6 stay byte for byte; what follows is whole lines (a torn last one is
    dropped with a warning), and a later resume gives the same 6 lines."""
    def resume_and_write(path):
        log = run_folder.StepLog(path, 6)
        for step in range(6, 12):
            log.write(_line(step, 1))

    original = _log_with(tmp_path / "count.jsonl", 10)
    calls = _operations(lambda: resume_and_write(tmp_path / "count.jsonl"), monkeypatch)
    assert calls.count("ftruncate") == 1 and calls.count("write") == 6
    kept = original[:sum(len(json.dumps(_line(s, 0))) + 1 for s in range(6))]
    torn = 0
    for k in range(1, len(calls) + 1):
        path = tmp_path / f"kill{k}.jsonl"
        _log_with(path, 10)
        assert _killed_at(k, lambda: resume_and_write(path)) == signal.SIGKILL
        data = path.read_bytes()
        assert data.startswith(kept)
        records, _ = run_folder.read_log(path)
        torn += not data.endswith(b"\n")
        assert records[:6] == [_line(s, 0) for s in range(6)]
        assert [r["step"] for r in records] == list(range(len(records)))
        run_folder.StepLog(path, 6).close()                # the next resume
        assert path.read_bytes() == kept
    assert torn == calls.count("write")                    # a kill in the middle of each write
    assert "are not a complete record" in capsys.readouterr().err


def test_sigkill_at_random_times_while_logging(tmp_path):
    rng = random.Random(3)
    for case in range(6):
        path = tmp_path / f"case{case}.jsonl"
        kept = _log_with(path, 3)
        pid = os.fork()
        if pid == 0:
            try:
                log = run_folder.StepLog(path, 3)
                for step in range(3, 10_000_000):
                    log.write(_line(step, 1))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert path.read_bytes().startswith(kept)
        records, _ = run_folder.read_log(path)
        assert [r["step"] for r in records] == list(range(len(records)))
        assert records[3:] == [_line(s, 1) for s in range(3, len(records))]


def test_a_full_disk_during_a_log_write_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    original = _log_with(path, 4)
    log = run_folder.StepLog(path, 4)
    with monkeypatch.context() as patch:
        for name, function in _hooked_ops(fail_at=1).items():
            patch.setattr(os, name, function)
        with pytest.raises(UsageError) as error:
            log.write(_line(4, 1))
    log.close()
    assert f"cannot write {path}: No space left on device" in str(error.value) and "\n" not in str(error.value)
    assert "holds the steps before step 4" in str(error.value) and path.read_bytes() == original


def test_a_torn_last_line_is_dropped_with_a_warning_by_a_resume_and_plot(tmp_path, capsys):
    from loca_train import plot

    path = tmp_path / "log.jsonl"
    original = _log_with(path, 5)
    with open(path, "ab") as f:
        f.write(b'{"step": 5, "lo')
    assert plot.read_log(tmp_path) == [_line(s, 0) for s in range(5)]
    run_folder.StepLog(path, 5).close()
    assert path.read_bytes() == original
    assert capsys.readouterr().err.count("the last 15 bytes (from line 6) are not a complete record") == 2


# ------------------------------------------------------------------ the trainer's folder

SETTINGS = dict(MICRO, steps=3, checkpoint_every=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 3-step run: checkpoint.pt at step 3, checkpoint.previous.pt at step 2."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(_cli_args(**SETTINGS, output_dir=out)) == 0
    return out


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_two_trainers_on_one_folder(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "run")
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:                            # the other trainer: holds the lock until killed
        try:
            run_folder.RunLock(out).acquire()
            os.write(ready_write, b"1")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_read, 1) == b"1"
        before = _files(out)
        for args in (["--resume"], ["--overwrite"], []):
            status, _, err = _main(capsys, *args, **SETTINGS, output_dir=out)
            if args:
                _assert_usage_error(status, err, f"{out} is in use by another trainer (pid {pid}", "trainer.lock")
            else:                           # refused before the lock is asked for
                _assert_usage_error(status, err, f"{out} already holds a run")
            assert _files(out) == before
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    # The lock file of the dead trainer is still there, with its pid: the lock is free again.
    assert (out / "trainer.lock").read_text() == f"{pid}\n"
    status, _, err = _main(capsys, "--resume", **{**SETTINGS, "steps": 4}, output_dir=out)
    assert status == 0, err
    assert [r["step"] for r in _records(out / "log.jsonl")] == [0, 1, 2, 3]
    assert (out / "trainer.lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("change, listed", [
    (dict(batch_size=2), "batch_size 2 (the run's: 4)"),
    (dict(seed=1), "seed 1 (the run's: 0)"),
    (dict(lr=1e-3), "lr 0.001 (the run's: 0.002)"),
    (dict(embed_dim=16, num_heads=2), "embed_dim 16 (the run's: 32)"),
    (dict(num_images=20), "num_images 20 (the run's: 16)"),
    (dict(preset="vit_s16"), "preset vit_s16 (the run's: tiny)"),
    (dict(amp=False), ("amp False (the run's: True)", "--resume-changes amp accepts this change")),
])
def test_resume_with_settings_that_change_the_run_is_refused(trained, tmp_path, capsys, change, listed):
    out = _copy(trained, tmp_path / "run")
    before = _files(out)
    args = ["--preset", change.pop("preset")] if "preset" in change else []
    status, _, err = _main(capsys, "--resume", *args, **{**SETTINGS, "steps": 4, **change}, output_dir=out)
    _assert_usage_error(status, err, f"--resume: settings differ from the run in {out}: ",
                        *(listed if isinstance(listed, tuple) else (listed,)))
    assert _files(out) == before


def test_resume_changes_and_free_settings_are_accepted(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "run")
    status, _, err = _main(capsys, "--resume", "--resume-changes", "amp", **{**SETTINGS, "steps": 4, "amp": False,
                                                                             "log_every": 1}, output_dir=out)
    assert status == 0, err
    assert json.loads((out / "config.json").read_text())["amp"] is False
    status, _, err = _main(capsys, "--resume", "--resume-changes", "lr", **SETTINGS, output_dir=out)
    _assert_usage_error(status, err, "--resume-changes: 'lr' cannot change in a resume")


def test_a_resume_of_a_finished_run_keeps_its_summary(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "run")
    before = _files(out)
    status, _, err = _main(capsys, "--resume", **SETTINGS, output_dir=out)
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.json").read_bytes() == before["summary.json"] and summary["final_loss"] > 0
    for name in ("log.jsonl", LATEST, PREVIOUS):
        assert (out / name).read_bytes() == before[name]
    # A resume that runs more steps keeps the earlier summary beside its own.
    assert _main(capsys, "--resume", **{**SETTINGS, "steps": 4}, output_dir=out)[0] == 0
    longer = json.loads((out / "summary.json").read_text())
    assert longer["steps"] == 4 and longer["earlier_sessions"] == [summary]


def test_a_run_killed_before_its_first_checkpoint_says_one_thing(trained, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("log.jsonl", "config.json", "trainer.lock"):
        shutil.copy(trained / name, out / name)
    before = _files(out)
    messages = []
    for args in (["--resume"], []):
        status, _, err = _main(capsys, *args, **SETTINGS, output_dir=out)
        _assert_usage_error(status, err, f"{out} already holds a run (log.jsonl) stopped before its first "
                                         f"checkpoint: there is nothing to --resume; start it again with --overwrite")
        messages.append(err)
        assert _files(out) == before
    assert messages[0] == messages[1]


def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_one_exactly(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "run")
    data = bytearray((out / LATEST).read_bytes())
    data[len(data) // 2] ^= 0xFF                      # inside the tensors
    (out / LATEST).write_bytes(bytes(data))
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"step": 3, "lo')                   # and a torn last line
    status, _, err = _main(capsys, "--resume", **SETTINGS, output_dir=out)
    assert status == 0, err
    assert f"{out / LATEST} is corrupt: its content does not match its checksum; using {out / PREVIOUS} (step 2)" in err
    assert (out / "checkpoint.corrupt.pt").read_bytes() == bytes(data)
    expected = [{k: v for k, v in r.items() if not k.startswith("time") and k != "images_per_s"}
                for r in _records(trained / "log.jsonl")]
    assert [{k: v for k, v in r.items() if not k.startswith("time") and k != "images_per_s"}
            for r in _records(out / "log.jsonl")] == expected
    final, straight = (torch.load(d / LATEST, weights_only=True) for d in (out, trained))
    assert final["step"] == 3 and all(torch.equal(v, straight["student"][k]) for k, v in final["student"].items())
    assert checkpoint.load(out / PREVIOUS)["step"] == 2


def test_a_trainer_on_a_full_disk_stops_in_one_line_and_resumes_once_there_is_room(trained, tmp_path, capsys):
    disk = tmp_path / "disk"
    size = (trained / LATEST).stat().st_size
    if not _mount_tmpfs(disk, f"{5 * size // 2 // 1024}k"):     # the log and two checkpoints, not three
        pytest.skip("needs root and tmpfs mounts (the simulated ENOSPC tests cover the code)")
    try:
        out = disk / "run"
        status, _, err = _main(capsys, **SETTINGS, output_dir=out)
        _assert_usage_error(status, err, f"cannot write {out / LATEST}: No space left on device",
                            f"{LATEST} is as it was", "--resume")
        assert checkpoint.load(out / LATEST)["step"] == 2 and checkpoint.load(out / PREVIOUS)["step"] == 1
        assert [r["step"] for r in _records(out / "log.jsonl")] == [0, 1, 2]
        assert not list(out.glob(".*.tmp"))
        subprocess.run(["mount", "-o", f"remount,size={4 * size // 1024}k", str(disk)], check=True)
        status, _, err = _main(capsys, "--resume", **SETTINGS, output_dir=out)
        assert status == 0, err
        final, straight = (torch.load(d / LATEST, weights_only=True) for d in (out, trained))
        assert all(torch.equal(v, straight["student"][k]) for k, v in final["student"].items())
    finally:
        _unmount(disk)


# ------------------------------------------------------------------ evaluate and export (point 4)

def _exit_line(main, args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("loca_train: error: "), err
    assert "Traceback" not in err
    return err


def test_evaluate_and_export_of_unreadable_or_foreign_checkpoints(trained, tmp_path, capsys):
    files = _foreign_files(tmp_path / "foreign")
    (tmp_path / "foreign" / "cut.pt").write_bytes((trained / LATEST).read_bytes()[:5000])
    files["cut.pt"] = "is truncated or corrupt"
    for name, message in files.items():
        path = tmp_path / "foreign" / name
        assert message in _exit_line(ev.main, ["--checkpoint", str(path), "--no-progress"], capsys)
        run = tmp_path / f"run_{name}"
        run.mkdir()
        (run / LATEST).symlink_to(path)
        err = _exit_line(export.main, ["--run-dir", str(run)], capsys)
        assert message in err and f"no readable checkpoint in {run}" in err
        assert _exit_line(ev.main, ["--run-dir", str(run), "--no-progress"], capsys) == err
        assert sorted(p.name for p in run.iterdir()) == [LATEST]          # nothing written


def test_export_and_evaluate_with_a_bad_output(trained, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for output, message in ((tmp_path, "a directory"), (tmp_path / "missing" / "e.pt", "its folder does not exist")):
        assert message in _exit_line(export.main, ["--run-dir", str(trained), "--output", str(output)], capsys)
    err = _exit_line(ev.main, ["--run-dir", str(trained), "--output-dir", str(tmp_path / "file" / "eval")], capsys)
    assert f"--output-dir {tmp_path / 'file' / 'eval'}: cannot write there" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_evaluate_with_masks_that_ignore_every_pixel(trained, tmp_path, capsys):
    from test_evaluate import _segmentation_folder

    images, masks, _ = _segmentation_folder(tmp_path, count=4, size=(12, 10))
    from PIL import Image
    for mask in masks.rglob("*.png"):
        Image.new("L", (10, 12), 255).save(mask)
    err = _exit_line(ev.main, ["--run-dir", str(trained), "--data", str(images), "--masks", str(masks),
                               "--output-dir", str(tmp_path / "eval"), "--no-progress"], capsys)
    assert "every patch of the probe's images is ignored (label 255)" in err and str(images) in err
    assert not (tmp_path / "eval" / "eval.json").exists()
