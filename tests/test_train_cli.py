"""`python -m loca_train` as a user meets it (issue 20): one-line errors before any work, the
output folder guarded, corrupt images, what a run prints and records, checkpoints that load
with weights_only=True, and `python -m loca_train.export`."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from loca_train import __main__ as cli
from loca_train import export, monitor, preset
from loca_train.networks import Encoder
from test_train import MICRO, _cli_args, _records, _run

STEPS = 2


def _main(capsys, *args, **settings):
    """Run `python -m loca_train` in this process: (exit status, stdout, stderr)."""
    try:
        status = cli.main([*_cli_args(**{**MICRO, "steps": STEPS, **settings}), *args])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def _assert_usage_error(status, err, *fragments):
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("loca_train: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _image_folder(root: Path, good: int, corrupt: int = 0) -> Path:
    from PIL import Image

    (root / "class").mkdir(parents=True)
    for i in range(good):
        colour = (40 * i % 256, 255 - 30 * i % 256, 90)
        Image.new("RGB", (30 + i, 24), colour).save(root / "class" / f"good{i}.png")
    for i in range(corrupt):
        (root / "class" / f"corrupt{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


# ------------------------------------------------------------- user errors (points 1, 2, 4)

def test_resume_without_a_checkpoint_is_an_error_naming_the_folder(tmp_path, capsys):
    out = tmp_path / "empty"
    status, _, err = _main(capsys, "--resume", output_dir=out)
    _assert_usage_error(status, err, f"--resume: no checkpoint (checkpoint.pt) in {out}")
    assert not out.exists()


@pytest.mark.parametrize("existing", ["log.jsonl", "checkpoint.pt"])
def test_a_new_run_into_a_folder_holding_a_run_is_refused(tmp_path, capsys, existing):
    out = tmp_path / "run"
    out.mkdir()
    (out / existing).write_text("")
    status, _, err = _main(capsys, output_dir=out)
    _assert_usage_error(status, err, f"{out} already holds a run ({existing})", "--resume", "--overwrite")
    assert (out / existing).read_text() == "" and sorted(p.name for p in out.iterdir()) == [existing]


def test_overwrite_replaces_the_run_and_resume_continues_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert _main(capsys, output_dir=out)[0] == 0
    status, _, err = _main(capsys, "--resume", "--overwrite", output_dir=out)
    _assert_usage_error(status, err, "give one")
    assert _main(capsys, "--overwrite", output_dir=out, steps=1)[0] == 0
    assert [r["step"] for r in _records(out / "log.jsonl")] == [0]
    assert _main(capsys, "--resume", output_dir=out, steps=3)[0] == 0
    assert [r["step"] for r in _records(out / "log.jsonl")] == [0, 1, 2]


@pytest.mark.parametrize("settings, message", [
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(steps=-1), "steps must be >= 0, got -1"),
    (dict(lr=0.0), "lr must be > 0, got 0.0"),
    (dict(lr=-1e-3), "lr must be > 0, got -0.001"),
    (dict(num_images=3), "3 images (procedural set) are fewer than one batch (4)"),
    (dict(data="{tmp}/missing"), "--data {tmp}/missing: no such directory"),
    (dict(data="{tmp}/two_images"), "2 images ({tmp}/two_images) are fewer than one batch (4)"),
    (dict(data="{tmp}/no_images"), "--data {tmp}/no_images: no images"),
    pytest.param(dict(device="cuda"), "--device cuda: CUDA is not available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_user_errors_are_one_line_and_stop_before_any_work(tmp_path, capsys, settings, message):
    _image_folder(tmp_path / "two_images", good=2)
    (tmp_path / "no_images" / "class").mkdir(parents=True)
    settings = {key: value.format(tmp=tmp_path) if isinstance(value, str) else value
                for key, value in settings.items()}
    out = tmp_path / "run"
    status, stdout, err = _main(capsys, output_dir=out, **settings)
    _assert_usage_error(status, err, message.format(tmp=tmp_path))
    assert stdout == "" and not out.exists()       # nothing started: no banner, no output folder


def test_the_command_line_exits_2_with_one_line_and_no_traceback(tmp_path):
    result = _run(["--lr", "0", "--output-dir", str(tmp_path / "run")], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "loca_train: error: lr must be > 0, got 0.0"


def test_a_corrupt_image_stops_the_run_naming_the_file(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", good=5, corrupt=1)
    # 6 images, 2 steps of 4: the corrupt one is in the first or the second batch.
    status, _, err = _main(capsys, data=data, num_workers=1, output_dir=tmp_path / "run")
    _assert_usage_error(status, err, f"cannot decode image {data / 'class' / 'corrupt0.png'}",
                        "--skip-bad-images")


def test_skip_bad_images_skips_and_counts_them(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", good=5, corrupt=1)
    out = tmp_path / "run"
    status, _, err = _main(capsys, "--skip-bad-images", data=data, num_workers=1, output_dir=out)
    assert status == 0, err
    bad = str(data / "class" / "corrupt0.png")
    assert f"skipped {bad}" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["skipped_image_files"] == [bad]
    config = json.loads((out / "config.json").read_text())
    assert config["num_images"] == 6 and config["data"] == str(data)
    assert [r["step"] for r in _records(out / "log.jsonl")] == list(range(STEPS))


# ------------------------------------------------------------- what a run shows and records (point 5)

def test_banner_end_line_config_and_summary(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, stdout, err = _main(capsys, output_dir="run")
    assert status == 0, err
    lines = stdout.splitlines()
    assert lines[0] == f"loca_train: loca, preset tiny, {STEPS} steps"
    labels = [line.split()[0] for line in lines[1:5]]
    assert labels == ["processes", "kernels", "data", "output"]
    assert lines[1].split() == ["processes", "1", "on", "cpu"]
    assert "{" not in stdout                                   # words, not a raw dict
    assert lines[3].split(None, 1)[1].startswith("16 procedural images")
    assert lines[4].split() == ["output", "run"]
    assert lines[-1].startswith("loca_train: done in 0:") and "results in run/" in lines[-1]

    config = json.loads(Path("run/config.json").read_text())
    assert config["output_dir"] == str(tmp_path / "run") and config["device"] == "cpu"
    assert config["num_images"] == MICRO["num_images"] and config["world_size"] == 1
    versions = config["versions"]
    assert versions["torch"] == torch.__version__ and versions["loca_kernels"]
    assert "triton" in versions
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(monitor.__file__).parent,
                         capture_output=True, text=True)
    assert versions["git_commit"] == (git.stdout.strip() if git.returncode == 0 else None)
    summary = json.loads(Path("run/summary.json").read_text())
    assert 0 < summary["wall_time_s"] < 600 and summary["steps"] == STEPS


def test_eta_ignores_the_first_slow_steps(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: clock[0])
    bar = monitor.ProgressBar(total=100, start=0, every=10, enabled=False)
    etas = []
    for step in range(20):
        clock[0] += 30.0 if step < monitor.ProgressBar.ETA_SKIPPED_STEPS else 1.0
        etas.append(bar.eta(step + 1))
    skipped = monitor.ProgressBar.ETA_SKIPPED_STEPS
    assert etas[:skipped] == [None] * skipped and etas[skipped] == pytest.approx(96.0)
    assert etas[-1] == pytest.approx(80.0)                    # 80 steps left at 1 s each
    assert monitor.format_duration(80) == "1:20" and monitor.format_duration(3 * 3600 + 65) == "3:01:05"


# ------------------------------------------------------------- checkpoints and export (point 3)

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(_cli_args(**MICRO, steps=STEPS, output_dir=out)) == 0
    return out


def test_checkpoints_load_with_weights_only(trained_run):
    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    rng = state["rng"][0]
    assert isinstance(rng["torch"], torch.Tensor)
    assert isinstance(rng["numpy"]["keys"], torch.Tensor) and isinstance(rng["python"]["state"], torch.Tensor)
    json.dumps(state["config"])                                 # plain data
    assert state["step"] == STEPS and state["skipped_images"] == []


def test_a_checkpoint_with_pickled_objects_is_refused_in_one_line(tmp_path, capsys):
    import numpy as np

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"rng": np.zeros(3)}, out / "checkpoint.pt")     # as loca_train wrote them before
    status, _, err = _main(capsys, "--resume", output_dir=out)
    _assert_usage_error(status, err, f"{out / 'checkpoint.pt'} holds more than tensors and plain data")


def _teacher_encoder(run: Path):
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    encoder = Encoder(preset("tiny", **MICRO)).eval()
    encoder.load_state_dict(export.teacher_encoder(state))
    return encoder


def test_export_plain_is_the_teacher_encoder(trained_run, tmp_path):
    path = tmp_path / "encoder.pt"
    assert export.main(["--run-dir", str(trained_run), "--output", str(path)]) == 0
    exported = torch.load(path, weights_only=True)
    encoder = Encoder(preset("tiny", **MICRO)).eval()
    encoder.load_state_dict(exported)                           # strict: the same keys and shapes
    images = torch.randn(2, 3, MICRO["image_size"], MICRO["image_size"])
    with torch.no_grad():
        assert torch.equal(encoder(images), _teacher_encoder(trained_run)(images))
    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert not torch.equal(exported["norm.weight"], state["student"]["encoder.norm.weight"])  # the teacher's


def _timm_keys(dim, depth, tokens, patch, hidden):
    """timm's VisionTransformer(num_classes=0) state_dict keys and shapes, written out by hand."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + tokens, dim),
            "patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        keys.update({
            f"blocks.{i}.norm1.weight": (dim,), f"blocks.{i}.norm1.bias": (dim,),
            f"blocks.{i}.attn.qkv.weight": (3 * dim, dim), f"blocks.{i}.attn.qkv.bias": (3 * dim,),
            f"blocks.{i}.attn.proj.weight": (dim, dim), f"blocks.{i}.attn.proj.bias": (dim,),
            f"blocks.{i}.norm2.weight": (dim,), f"blocks.{i}.norm2.bias": (dim,),
            f"blocks.{i}.mlp.fc1.weight": (hidden, dim), f"blocks.{i}.mlp.fc1.bias": (hidden,),
            f"blocks.{i}.mlp.fc2.weight": (dim, hidden), f"blocks.{i}.mlp.fc2.bias": (dim,),
        })
    keys.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return keys


@pytest.mark.parametrize("image_size", [None, 32])
def test_export_timm_has_timms_vit_key_layout(trained_run, tmp_path, image_size):
    path = tmp_path / "timm.pt"
    args = ["--run-dir", str(trained_run), "--output", str(path), "--format", "timm"]
    assert export.main(args + (["--image-size", str(image_size)] if image_size else [])) == 0
    exported = torch.load(path, weights_only=True)
    grid = (image_size or MICRO["image_size"]) // MICRO["patch_size"]
    dim = MICRO["embed_dim"]
    expected = _timm_keys(dim, MICRO["depth"], grid * grid, MICRO["patch_size"], 4 * dim)
    assert {key: tuple(value.shape) for key, value in exported.items()} == expected
    encoder = _teacher_encoder(trained_run)
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], encoder.blocks[0].qkv.weight)
    assert torch.equal(exported["blocks.0.mlp.fc2.bias"], encoder.blocks[0].mlp[2].bias)
    assert not exported["cls_token"].any() and not exported["pos_embed"][0, 0].any()
    if image_size is None:   # raster order, as timm adds them to its patch tokens
        assert torch.equal(exported["pos_embed"][0, 1:], encoder.pos_embed.flatten(2)[0].T)


def test_export_of_a_folder_without_a_checkpoint_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export.main(["--run-dir", str(tmp_path)])
    _assert_usage_error(exit_.value.code, capsys.readouterr().err, f"--run-dir {tmp_path}: no checkpoint")


def test_timm_names_of_the_vit_presets():
    assert export.timm_model(preset("vit_s16"), 224) == "timm.create_model('vit_small_patch16_224', num_classes=0)"
    assert export.timm_model(preset("vit_b16"), 224) == "timm.create_model('vit_base_patch16_224', num_classes=0)"
    assert "VisionTransformer(img_size=384" in export.timm_model(preset("vit_b16"), 384)
