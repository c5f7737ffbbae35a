"""Image folders read right or reported (issue 27, point 2): every PIL mode decoded to the right
8-bit RGB, unreadable files and folders, symlinked folders and link loops, FIFOs, corrupt
files and oversized images reported (or skipped and counted with --skip-bad-images), never
silently skipped or hung; SIGTERM ends a run on the main process's loader promptly."""
import builtins
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from loca_train import images as images_module
from loca_train import preset
from loca_train.batches import StepBatches
from loca_train.images import TRANSPARENT_BACKGROUND, BadImage, ImageFolder, decode_image, list_images
from test_train import MICRO, _cli_args
from test_train_cli import _assert_usage_error, _main

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
WHITE = np.array(TRANSPARENT_BACKGROUND, dtype=np.float64)


def _png16(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG (PIL writes 16 bits for greyscale only): values (h, w, channels) uint16."""
    height, width = values.shape[:2]
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _over_white(rgb, alpha) -> np.ndarray:
    rgb, alpha = np.asarray(rgb, dtype=np.float64), np.asarray(alpha, dtype=np.float64)[..., None] / 255
    return rgb * alpha + WHITE * (1 - alpha)


GREY16 = np.array([[0, 128, 129, 257], [4096, 32768, 65534, 65535]], dtype=np.uint16)
ALPHA = np.array([[0, 64, 128, 255]], dtype=np.uint8)
COLOURS = np.array([[[200, 30, 90], [10, 250, 120], [255, 255, 0], [0, 0, 255]]], dtype=np.uint8)
PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255, 90, 90, 90]


def _grey16_png(path):
    Image.fromarray(GREY16).save(path)          # PIL writes uint16 greyscale as a 16-bit PNG
    assert Image.open(path).mode == "I;16"
    return np.repeat(np.round(GREY16 / 257.0)[..., None], 3, axis=2)


def _int32_tiff(path):
    values = np.array([[-5, 0, 257, 65535, 70000, 1 << 30]], dtype=np.int32)
    Image.fromarray(values, "I").save(path)
    assert Image.open(path).mode == "I"
    return np.repeat(np.round(values.clip(0, 65535) / 257.0)[..., None], 3, axis=2)


def _rgb48_png(path):
    values = np.array([[[0x80FF, 0xFFFF, 0x0101], [0, 0x1234, 0xFF00]]], dtype=np.uint16)
    path.write_bytes(_png16(values, 2))
    return values / 257.0                        # PIL keeps the high byte: within 1 of exact


def _rgba64_png(path):
    values = np.array([[[0xFFFF, 0, 0, 0], [0, 0xFFFF, 0, 0x8080], [0x4040, 0x8080, 0xC0C0, 0xFFFF]]],
                      dtype=np.uint16)
    path.write_bytes(_png16(values, 6))
    return _over_white(values[..., :3] / 257.0, values[..., 3] / 257.0)


def _palette_png(path, transparency=None):
    indices = np.array([[0, 1, 2, 3]], dtype=np.uint8)
    img = Image.fromarray(indices, "P")
    img.putpalette(PALETTE)
    img.save(path, **({} if transparency is None else {"transparency": transparency}))
    assert Image.open(path).mode == "P"
    rgb = np.array(PALETTE, dtype=np.float64).reshape(4, 3)[indices]
    if transparency is None:
        return rgb
    alpha = np.full(4, 255) if isinstance(transparency, int) else np.frombuffer(transparency, np.uint8)
    if isinstance(transparency, int):
        alpha[transparency] = 0
    return _over_white(rgb, alpha[indices])


def _grey_png(path):
    values = np.array([[0, 1, 127, 255]], dtype=np.uint8)
    Image.fromarray(values, "L").save(path)
    return np.repeat(values[..., None], 3, axis=2)


def _grey_alpha_png(path):
    values = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    Image.fromarray(np.stack([values, ALPHA], axis=-1), "LA").save(path)
    return _over_white(np.repeat(values[..., None], 3, axis=2), ALPHA)


def _rgba_png(path):
    Image.fromarray(np.concatenate([COLOURS, ALPHA[..., None]], axis=-1), "RGBA").save(path)
    return _over_white(COLOURS, ALPHA)


def _rgb_trns_png(path):
    Image.fromarray(COLOURS, "RGB").save(path, transparency=(255, 255, 0))   # tRNS: one colour is clear
    return np.where((COLOURS == (255, 255, 0)).all(-1, keepdims=True), WHITE, COLOURS)


def _bilevel_png(path):
    values = np.array([[0, 1, 1, 0]], dtype=bool)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "1"
    return np.repeat(values[..., None] * 255.0, 3, axis=2)


def _cmyk(path):
    cmyk = np.array([[[0, 255, 255, 128], [0, 0, 0, 0], [255, 255, 255, 255], [64, 128, 192, 32]]],
                    dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(path)
    assert Image.open(path).mode == "CMYK"
    # PIL's conversion (no colour profile): each channel (255 - ink) * (255 - black) / 255.
    return (255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255


MODES = {"grey16.png": _grey16_png, "int32.tif": _int32_tiff, "rgb48.png": _rgb48_png,
         "rgba64.png": _rgba64_png, "palette.png": _palette_png,
         "palette_index_transparent.png": lambda path: _palette_png(path, 2),
         "palette_alpha.png": lambda path: _palette_png(path, bytes([255, 0, 128, 30])),
         "grey.png": _grey_png, "grey_alpha.png": _grey_alpha_png, "rgba.png": _rgba_png,
         "rgb_trns.png": _rgb_trns_png, "bilevel.png": _bilevel_png, "cmyk.tif": _cmyk,
         "cmyk.jpg": _cmyk}


@pytest.mark.parametrize("name", sorted(MODES))
def test_each_mode_decodes_to_the_right_rgb(tmp_path, name):
    path = tmp_path / name
    expected = MODES[name](path)
    decoded = decode_image(str(path))
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    # JPEG is lossy (CMYK solid pixels stay within a few levels); the others within rounding.
    tolerance = 4 if name.endswith(".jpg") else 1
    assert np.abs(decoded.astype(np.float64) - expected).max() <= tolerance, (decoded, expected)


def test_a_16bit_greyscale_image_is_not_white(tmp_path):
    # The case: a mid-grey 16-bit PNG decoded (clipped at 255) almost all white.
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "a.png")
    assert (decode_image(str(tmp_path / "a.png")) == 128).all()


def test_float_pixels_are_reported_not_guessed(tmp_path):
    Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(BadImage, match=r"f\.tif \(32-bit float pixels \(mode F\)"):
        decode_image(str(tmp_path / "f.tif"))


def _folder(root, names=("a/x.png", "a/y.png", "b/z.png")):
    """Small RGB images at `names` under root; returns their paths."""
    paths = []
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (5 + i, 4), (10 * i, 20, 30)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def deny(monkeypatch):
    """deny(path): make a file or folder unreadable: chmod 000, or as root (who reads it anyway)
    the PermissionError that opening or listing it would give, simulated."""
    denied = set()

    def refuse(function):
        def refusing(path, *args, **kwargs):
            if os.fspath(path) in denied:
                raise PermissionError(13, os.strerror(13), os.fspath(path))
            return function(path, *args, **kwargs)
        return refusing

    if AS_ROOT:
        monkeypatch.setattr(os, "scandir", refuse(os.scandir))
        monkeypatch.setattr(builtins, "open", refuse(builtins.open))
    yield lambda path: os.chmod(path, 0) if not AS_ROOT else denied.add(str(path))


def test_an_unreadable_file_is_listed_and_reported_when_decoded(tmp_path, deny):
    files = _folder(tmp_path)
    deny(files[1])
    images = ImageFolder(str(tmp_path), 0)
    assert images.files == files and images.bad_entries == {}
    with pytest.raises(BadImage, match=f"cannot decode image {files[1]} .Permission denied.*--skip-bad-images"):
        images[1]
    assert images[0].shape == (3, 4, 5) and images[2].shape == (3, 4, 7)      # the others decode


def test_an_unreadable_folder_is_an_error_or_skipped_and_counted(tmp_path, deny):
    files = _folder(tmp_path)
    deny(tmp_path / "a")
    with pytest.raises(BadImage, match=f"--data {tmp_path}: 1 entry cannot be read: {tmp_path / 'a'} "
                                       r"\(cannot read folder: Permission denied\); --skip-bad-images"):
        ImageFolder(str(tmp_path), 0)
    images = ImageFolder(str(tmp_path), 0, skip_bad=True)
    assert images.files == files[2:]
    assert images.bad_entries == {str(tmp_path / "a"): "cannot read folder: Permission denied"}
    os.chmod(tmp_path / "a", 0o700)                                         # tmp_path can be cleaned


def test_symlinked_folders_are_followed_and_loops_listed_once(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    own = _folder(data, ("a/x.png",))
    linked = _folder(elsewhere, ("b/y.png", "b/deeper/z.png"))
    (data / "linked").symlink_to(elsewhere / "b", target_is_directory=True)
    (data / "a" / "up").symlink_to(data, target_is_directory=True)              # a loop to the root
    (elsewhere / "b" / "deeper" / "back").symlink_to(elsewhere / "b", target_is_directory=True)
    files, bad = list_images(str(data))
    assert bad == {}
    # Each image once, under the path the user sees; neither loop is entered again.
    assert files == [own[0], str(data / "linked" / "deeper" / "z.png"), str(data / "linked" / "y.png")]
    assert len(linked) == 2 and ImageFolder(str(data), 0)[2].shape == (3, 4, 5)


def test_link_loops_and_dangling_links_are_reported(tmp_path):
    files = _folder(tmp_path)
    (tmp_path / "self.png").symlink_to(tmp_path / "self.png")
    (tmp_path / "ping").symlink_to(tmp_path / "pong")
    (tmp_path / "pong").symlink_to(tmp_path / "ping")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nothing.jpg")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "nothing.txt")              # not an image: not listed
    files_listed, bad = list_images(str(tmp_path))
    assert files_listed == files
    loop = os.strerror(40)                                                      # ELOOP
    assert bad == {str(tmp_path / "self.png"): f"link: {loop}", str(tmp_path / "ping"): f"link: {loop}",
                   str(tmp_path / "pong"): f"link: {loop}",
                   str(tmp_path / "gone.jpg"): "link: No such file or directory"}


def _fifo(path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(path)


def test_a_fifo_is_reported_without_opening_it(tmp_path):
    files = _folder(tmp_path)
    _fifo(tmp_path / "a" / "pipe.jpg")
    with pytest.raises(BadImage, match=r"1 entry cannot be read: .*pipe\.jpg \(a FIFO\)"):
        ImageFolder(str(tmp_path), 0)
    images = ImageFolder(str(tmp_path), 0, skip_bad=True)
    assert images.files == files and list(images.bad_entries.values()) == ["a FIFO"]
    # Decoded directly (as a file that became a FIFO after listing): an error, not a wait for a writer.
    errors = []
    reader = threading.Thread(target=lambda: errors.append(pytest.raises(BadImage, decode_image,
                                                                         str(tmp_path / "a" / "pipe.jpg"))),
                              daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and "(a FIFO)" in str(errors[0].value)


@pytest.mark.parametrize("damage", ["garbage", "truncated_png", "truncated_jpeg", "empty"])
def test_corrupt_and_truncated_files_are_reported_and_the_others_kept(tmp_path, damage):
    files = _folder(tmp_path)
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        whole, "JPEG" if damage == "truncated_jpeg" else "PNG")
    data = {"garbage": b"\x89PNG\r\n\x1a\n not an image", "empty": b"",
            "truncated_png": whole.getvalue()[:len(whole.getvalue()) // 2],
            "truncated_jpeg": whole.getvalue()[:len(whole.getvalue()) // 2]}[damage]
    bad = tmp_path / "b" / ("bad.jpg" if damage == "truncated_jpeg" else "bad.png")
    bad.write_bytes(data)
    images = ImageFolder(str(tmp_path), 0)
    assert images.files == sorted(files + [str(bad)])
    index = images.files.index(str(bad))
    with pytest.raises(BadImage, match=f"cannot decode image {bad} "):
        images[index]
    assert [tuple(images[i].shape) for i in range(4) if i != index] == [(3, 4, 5), (3, 4, 6), (3, 4, 7)]


def test_the_pixel_limit_is_exact_and_named(tmp_path):
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "a.png")
    assert decode_image(str(tmp_path / "a.png"), 0, max_pixels=200).shape == (10, 20, 3)   # at the limit
    with pytest.raises(BadImage, match=r"a\.png \(20x10 pixels, more than the limit of 199 \(MAX_IMAGE_PIXELS\)"):
        decode_image(str(tmp_path / "a.png"), 0, max_pixels=199)


def test_jpegs_decode_at_reduced_size_within_the_limit(tmp_path):
    # 800 x 600 = 480,000 pixels; at source size 64 a JPEG decodes at 1/8 (100 x 75), a PNG cannot.
    rng = np.random.default_rng(0)
    pixels = np.repeat(np.repeat(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), 100, 0), 100, 1)
    for name in ("a.jpg", "a.png"):
        Image.fromarray(pixels).save(tmp_path / name, quality=95)
    small = decode_image(str(tmp_path / "a.jpg"), 64, max_pixels=100 * 75)
    full = decode_image(str(tmp_path / "a.png"), 64)
    assert small.shape == full.shape == (48, 64, 3)
    assert np.abs(small.astype(int) - full.astype(int)).mean() < 6            # the same picture
    with pytest.raises(BadImage, match="800x600 pixels"):
        decode_image(str(tmp_path / "a.png"), 64, max_pixels=100 * 75)
    with pytest.raises(BadImage, match="800x600 pixels"):
        decode_image(str(tmp_path / "a.jpg"), 0, max_pixels=100 * 75)          # full size: no draft


def _bad_data(root):
    """A run's folder: 5 good images, and one of each bad kind that is found at listing."""
    good = _folder(root, [f"c/good{i}.png" for i in range(5)])
    _fifo(root / "c" / "pipe.jpg")
    (root / "c" / "gone.png").symlink_to(root / "nothing.png")
    (root / "c" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return good


def test_skip_bad_images_counts_every_kind_once_and_trains_on_the_rest(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    good = _bad_data(data)
    status, stdout, err = _main(capsys, "--skip-bad-images", data=data, output_dir=out, steps=3)
    assert status == 0, err
    listed = [str(data / "c" / "gone.png"), str(data / "c" / "pipe.jpg")]
    # One line at the start for what listing found, one per file that fails to decode.
    assert err.count("skipping 2 entries cannot be read") == 1 and all(path in err for path in listed)
    assert err.count(f"skipped {data / 'c' / 'corrupt.png'}") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 3
    assert summary["skipped_image_files"] == sorted(listed + [str(data / "c" / "corrupt.png")])
    config = json.loads((out / "config.json").read_text())
    assert config["num_images"] == len(good) + 1                               # the corrupt file is listed


def test_without_skip_bad_images_listing_problems_stop_before_any_work(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    _bad_data(data)
    status, stdout, err = _main(capsys, data=data, output_dir=out)
    _assert_usage_error(status, err, f"--data {data}: 2 entries cannot be read: {data / 'c' / 'gone.png'} "
                                     f"(link: No such file or directory), {data / 'c' / 'pipe.jpg'} (a FIFO); "
                                     "--skip-bad-images skips them")
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize("num_workers, to_group", [(0, False), (1, True)])
def test_the_first_sigterm_stops_a_run_after_its_step(tmp_path, num_workers, to_group):
    # --num-workers 0: the images are read on the trainer's process, where the stop request
    # lives (a FIFO among them blocked it for ever). A signal to the process group (a job
    # scheduler's) reaches the loader workers too: they must leave the stop to the trainer.
    data, out = tmp_path / "data", tmp_path / "run"
    _bad_data(data)
    process = subprocess.Popen([sys.executable, "-m", "loca_train", "--skip-bad-images",
                                *_cli_args(**{**MICRO, "num_workers": num_workers, "steps": 100_000, "data": data,
                                              "output_dir": out, "checkpoint_every": 100_000})],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    logged = log.read_text().count("\n")
    (os.killpg if to_group else os.kill)(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == signal.SIGTERM and summary["skipped_images"] == 3
    # At most two more steps are finished: the one under way when the signal came, and the next,
    # whose all-reduce tells every rank to stop (train._step reads the request when it starts).
    # The checkpoint is at the step after the last one logged: nothing done is lost.
    steps_done = log.read_text().count("\n")
    assert logged <= steps_done <= logged + 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == steps_done


def test_an_image_past_the_pixel_limit_stops_a_run_or_is_skipped(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 720)        # a small limit, not a huge image
    data = tmp_path / "data"
    _folder(data, [f"c/good{i}.png" for i in range(5)])
    big = data / "c" / "huge.png"
    Image.new("RGB", (40, 30), (9, 9, 9)).save(big)                     # 1200 pixels
    # 6 images, 2 steps of 4: every image is met.
    status, _, err = _main(capsys, data=data, output_dir=tmp_path / "stopped")
    _assert_usage_error(status, err, f"cannot decode image {big} (40x30 pixels, more than the limit of 720",
                        "--skip-bad-images")
    out = tmp_path / "skipped"
    status, _, err = _main(capsys, "--skip-bad-images", data=data, output_dir=out)
    assert status == 0 and err.count(f"skipped {big}") == 1, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["skipped_image_files"] == [str(big)]


def test_a_batch_from_images_none_of_which_decode_names_one(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 10)
    _folder(tmp_path, [f"c/{i}.png" for i in range(4)])
    cfg = preset("tiny", **MICRO)
    with pytest.raises(BadImage, match=r"none of the 4 images can be decoded, e.g. cannot decode image "
                                       r"\S+/c/\d\.png \(\dx4 pixels, more than the limit of 10"):
        StepBatches(ImageFolder(str(tmp_path), cfg.source_size, skip_bad=True), cfg)[0]
