"""The dense-feature evaluation (issue 17): the procedural scenes' ground truth and evaluation
split, VOC-style mask folders, the metrics on hand-made cases, `python -m loca_train.evaluate`,
training's --eval-every and `python -m loca_train.plot`."""
import json

import pytest
import torch
import torch.nn.functional as F

from loca_train import __main__ as cli
from loca_train import evaluate as ev
from loca_train.evaluation import data as ev_data, metrics as ev_metrics, probe as ev_probe, runner as ev_runner
from loca_train import plot, preset
from loca_train.images import IGNORE_LABEL, SCENE_CLASSES, ProceduralImages, SegmentationFolder
from test_train import MICRO, _cli_args, _records

IGNORE = IGNORE_LABEL


# ------------------------------------------------------------------ ground truth and splits

def test_scenes_return_their_ground_truth():
    scenes = ProceduralImages(8, 48, seed=3)
    for index in range(8):
        image, instances, semantic = scenes.scene(index)
        assert torch.equal(image, scenes[index])                    # training sees the same image
        assert image.shape == (3, 48, 48) and instances.shape == semantic.shape == (48, 48)
        assert torch.equal(instances == 0, semantic == 0)
        assert set(semantic.unique().tolist()) <= set(range(len(SCENE_CLASSES)))
        for shape in instances.unique().tolist()[1:]:               # one class per shape, one colour
            assert len(semantic[instances == shape].unique()) == 1
            striped = int(semantic[instances == shape][0]) in (2, 4)
            colours = len(image[:, instances == shape].T.unique(dim=0))
            assert colours <= 2 if striped else colours == 1
    again = ProceduralImages(8, 48, seed=3).scene(5)
    assert all(torch.equal(a, b) for a, b in zip(again, scenes.scene(5)))


def test_later_shapes_occlude_earlier_ones():
    # Over many scenes, the last shape is never covered and some earlier one is.
    covered = False
    for index in range(20):
        _, instances, _ = ProceduralImages(20, 64).scene(index)
        ids = instances.unique().tolist()
        covered |= ids != list(range(max(ids) + 1))
        assert (instances == max(ids)).sum() > 0
    assert covered


def test_evaluation_split_is_fixed_and_never_trained_on():
    cfg = preset("tiny", **MICRO)
    split, again = ev_data.procedural_split(cfg, 6, 4), ev_data.procedural_split(preset("tiny", **MICRO, seed=5), 6, 4)
    assert split.probe == list(range(6)) and split.test == list(range(6, 10))
    for i in split.probe + split.test:
        assert all(torch.equal(a, b) for a, b in zip(split.dataset.scene(i), again.dataset.scene(i)))
    evaluation = {bytes(split.dataset[i].numpy()) for i in range(10)}
    for seed in (0, 1):
        training = {bytes(ProceduralImages(100, cfg.source_size, seed)[i].numpy()) for i in range(100)}
        assert not evaluation & training


# ------------------------------------------------------------------ mask folders

def _png(path, array, mode):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.frombytes("P", (array.shape[1], array.shape[0]), array.numpy().tobytes())
        image.putpalette([40 * i % 256 for i in range(768)])      # colours that are not the indices
    else:
        image = Image.fromarray(array.numpy())
    image.save(path)


def _segmentation_folder(root, count=4, size=(12, 10)):
    """Images root/images/c/i.png with class masks (palette PNGs, a 255 border) and instance masks."""
    for i in range(count):
        h, w = size
        classes = torch.zeros(h, w, dtype=torch.uint8)
        classes[2:6, 3:8] = 1 + i % 3
        classes[0] = IGNORE
        instances = (classes > 0).to(torch.uint8) * (classes != IGNORE)
        _png(root / "images" / "c" / f"{i}.png", torch.randint(0, 256, (h, w, 3), dtype=torch.uint8), "RGB")
        _png(root / "masks" / "c" / f"{i}.png", classes, "P")
        _png(root / "objects" / "c" / f"{i}.png", instances, "L")
    return root / "images", root / "masks", root / "objects"


def test_mask_folder_reads_class_indices_of_palette_pngs(tmp_path):
    images, masks, objects = _segmentation_folder(tmp_path)
    folder = SegmentationFolder(str(images), 24, str(masks), str(objects))
    image, instances, classes = folder.scene(1)
    assert image.shape == (3, 24, 20) and classes.shape == instances.shape == (24, 20)   # resized together
    assert set(classes.unique().tolist()) == {0, 2, IGNORE} and set(instances.unique().tolist()) == {0, 1}
    assert (classes[:2] == IGNORE).all() and (classes[4:12, 6:16] == 2).all()
    assert folder.scene(0)[1] is not None and SegmentationFolder(str(images), 24, str(masks)).scene(0)[1] is None


def test_mask_folder_errors(tmp_path):
    images, masks, objects = _segmentation_folder(tmp_path)
    with pytest.raises(ev.UsageError, match="--masks .*missing: no such directory"):
        SegmentationFolder(str(images), 24, str(tmp_path / "missing"))
    (masks / "c" / "2.png").unlink()
    with pytest.raises(ev.UsageError, match=r"no mask for 1 of 4 images, e\.g\. .*2\.png \(expected .*masks/c/2\.png"):
        SegmentationFolder(str(images), 24, str(masks))
    _png(masks / "c" / "2.png", torch.zeros(11, 12, dtype=torch.uint8), "L")
    with pytest.raises(ev.UsageError, match=r"--masks: mask .*2\.png is 12x11 pixels, its image .*2\.png 10x12"):
        SegmentationFolder(str(images), 24, str(masks))
    _png(masks / "c" / "2.png", torch.zeros(12, 10, 3, dtype=torch.uint8), "RGB")
    with pytest.raises(ev.UsageError, match="is a RGB image, not a PNG of class indices"):
        SegmentationFolder(str(images), 24, str(masks)).scene(2)
    (objects / "c" / "3.png").unlink()
    with pytest.raises(ev.UsageError, match="--instances .*no mask for 1 of 4 images"):
        SegmentationFolder(str(images), 24, str(masks), str(objects))


def test_folder_split_is_a_fixed_half(tmp_path):
    images, masks, _ = _segmentation_folder(tmp_path, count=7)
    cfg = preset("tiny", **MICRO)
    split = ev_data.folder_split(cfg, str(images), str(masks))
    again = ev_data.folder_split(cfg, str(images), str(masks))
    assert (split.probe, split.test) == (again.probe, again.test)
    assert len(split.probe) == 3 and sorted(split.probe + split.test) == list(range(7))


# ------------------------------------------------------------------ metrics on hand-made cases

def _one_hot_features(instances):
    """Features equal to one-hot instance ids, one patch per pixel: (h, w, ids)."""
    return F.one_hot(instances.long(), int(instances.max()) + 1).float()


def _instances():
    instances = torch.zeros(8, 8, dtype=torch.uint8)
    instances[1:4, 1:6] = 1
    instances[5:8, 2:4] = 2
    instances[4:7, 5:8] = 3
    return instances


def test_one_hot_instance_features_segment_perfectly():
    instances = _instances()
    features = _one_hot_features(instances)
    result = ev_metrics.prompt_segmentation(features, instances)
    assert [object_id for object_id, _ in result.prompts] == [1, 2, 3] and result.skipped == 0
    assert torch.equal(result.jaccard, torch.ones(3, len(ev_metrics.THRESHOLDS)))
    same, different = ev_metrics.region_pair_similarities(features, instances)
    assert (same == 1).all() and (different == 0).all()
    assert ev_metrics.roc_auc(same, different) == 1.0


def test_constant_features_give_chance_auc():
    instances = _instances()
    same, different = ev_metrics.region_pair_similarities(torch.ones(8, 8, 5), instances)
    assert len(same) + len(different) == 64 * 63 // 2
    assert ev_metrics.roc_auc(same, different) == 0.5
    nan = ev_metrics.roc_auc(torch.zeros(3), torch.zeros(0))
    assert nan != nan


def test_roc_auc_counts_pairs_and_half_ties():
    assert ev_metrics.roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.5])) == 0.75
    assert ev_metrics.roc_auc(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])) == 0.625   # (0.5 + 0 + 1 + 1) / 4
    assert ev_metrics.roc_auc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0


def test_jaccard_of_a_wrong_map_and_ignored_pixels():
    instances = torch.zeros(4, 4, dtype=torch.uint8)
    instances[:2, :2] = 1
    features = torch.zeros(4, 4, 2)
    features[..., 0] = 1
    features[:2, :4, 1] = 1        # the top half: objects's 4 pixels + 4 background ones
    features[:2, :2, 0] = 0
    features[:2, 2:, 0] = 0
    jaccard = ev_metrics.prompt_segmentation(features, instances).jaccard
    assert torch.allclose(jaccard, torch.full_like(jaccard, 0.5))
    instances[:2, 2:] = IGNORE     # the wrongly predicted pixels are not counted
    jaccard = ev_metrics.prompt_segmentation(features, instances).jaccard
    assert torch.equal(jaccard, torch.ones_like(jaccard))


def test_prompt_is_the_patch_deepest_inside_lowest_index_on_ties():
    # A 16 x 16 image, 4 x 4 patches of 4 pixels (centres at 2, 6, 10, 14).
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[0:12, 0:16] = True                       # centre rows 2, 6, 10 inside; row 6 deepest
    # Deepest: centres (6, 6) and (6, 10), 6.5 from the nearest pixel centre outside (the image
    # edge, the border at row 12); the lower raster index wins.
    assert ev_metrics.prompt_patch(inside, (4, 4)) == 1 * 4 + 1
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[8:16, 8:16] = True                       # touching the image corner
    assert ev_metrics.prompt_patch(inside, (4, 4)) == 2 * 4 + 2   # centres (10, 10) and (14, 14): 2.5 vs 2.5 tie
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[3:5, 3:5] = True                          # between patch centres: no prompt
    assert ev_metrics.prompt_patch(inside, (4, 4)) is None
    instances = inside.to(torch.uint8)
    instances[8:16, 8:16] = 2
    result = ev_metrics.prompt_segmentation(torch.randn(4, 4, 3), instances)
    assert result.skipped == 1 and [object_id for object_id, _ in result.prompts] == [2]


def test_patch_majority_ignores_255_and_breaks_ties_low():
    labels = torch.tensor([[1, 1, 2, 2],
                           [1, 3, 2, 3],
                           [IGNORE, IGNORE, 4, 0],
                           [IGNORE, IGNORE, 0, 4]], dtype=torch.uint8)
    assert ev_metrics.patch_majority(labels, (2, 2)).tolist() == [[1, 2], [IGNORE, 0]]


def test_probe_learns_separable_features_and_miou():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (300,))
    features = F.one_hot(labels, 3).float() * 2 + 0.1 * torch.randn(300, 3)
    probe = ev_probe.train_probe(features, labels, 3)
    assert torch.equal(probe.logits(features).argmax(-1), labels)
    truth = torch.tensor([[0, 1], [2, IGNORE]])
    confusion = ev_metrics.confusion_matrix(torch.tensor([[0, 1], [1, 1]]), truth)
    assert confusion.sum() == 3 and confusion[2, 1] == 1
    assert ev_metrics.iou_per_class(confusion) == {0: 1.0, 1: 0.5, 2: 0.0}


def test_threshold_is_chosen_on_one_half_and_reported_on_the_other():
    selection = [torch.tensor([[0.1 * t for t in range(10)]])]            # best at 0.9
    report = [torch.tensor([[1.0 - 0.1 * t for t in range(10)]])]
    choice = ev_metrics.threshold_choice(selection, report)
    assert choice["prompt_threshold"] == 0.9 and choice["prompt_jaccard"] == pytest.approx(0.1)
    assert choice["prompt_jaccard_per_threshold"]["0.0"] == 1.0


# ------------------------------------------------------------------ the commands

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert cli.main(_cli_args(**MICRO, steps=3, eval_every=2, eval_images=4, output_dir=out)) == 0
    return out


def test_eval_every_logs_the_metrics_and_draws_no_random_number(run):
    records = _records(run / "log.jsonl")
    evaluated = [r["step"] for r in records if "eval_probe_miou" in r]
    assert evaluated == [1, 2]                                  # every 2 steps and at the end
    for key in ("eval_prompt_jaccard", "eval_similarity_auc", "eval_similarity_same", "time_eval"):
        assert key in records[1]
    cfg = preset("tiny", **MICRO)
    encoder = ev_data.random_init_encoder(cfg)
    state = torch.get_rng_state()
    ev_runner.training_metrics(encoder, cfg, "cpu", ev_data.procedural_split(cfg, 4, 2))
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(cfg.seed)
    from loca_train.networks import LocaNet
    assert torch.equal(LocaNet(cfg).encoder.pos_embed, encoder.pos_embed)   # the network train() starts from


def test_evaluate_command_writes_json_png_and_table(run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "eval"
    args = ["--run-dir", str(run), "--probe-images", "8", "--test-images", "4", "--output-dir", str(out),
            "--examples", "2", "--no-progress"]
    assert ev.main(args) == 0
    stdout = capsys.readouterr().out
    assert "teacher" in stdout and "random init" in stdout and "probe_miou" in stdout
    result = json.loads((out / "eval.json").read_text())
    assert set(result["scores"]) == {"teacher", "student", "random_init", "raw_pixels", "noise", "position",
                                     "colour", "ideal"}
    for source in result["scores"].values():
        assert 0 <= source["probe_miou"]["value"] <= 1 and 0 <= source["prompt_object_auroc"]["value"] <= 1
    assert result["scores_split"]["probe_images"] == 8 and result["scores_split"]["test_images"] == 4
    assert result["scores_split"]["validation_images"] == 2 and result["step"] == 3
    assert "git_commit" in result["versions"] and result["run_versions"]["torch"] == torch.__version__
    with Image.open(out / "eval.png") as figure:
        assert figure.size[0] > figure.size[1] > 0
    # --checkpoint writes beside the checkpoint by default.
    assert ev.main(["--checkpoint", str(run / "checkpoint.pt"), "--probe-images", "4", "--test-images", "2",
                    "--examples", "0", "--no-progress"]) == 0
    assert json.loads((run / "eval.json").read_text())["scores_split"]["test_images"] == 2


def test_evaluate_on_a_mask_folder(run, tmp_path, capsys):
    images, masks, objects = _segmentation_folder(tmp_path, count=4, size=(24, 20))
    args = ["--run-dir", str(run), "--data", str(images), "--masks", str(masks), "--output-dir", str(tmp_path),
            "--no-progress"]
    assert ev.main(args) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert "prompt_object_jaccard" not in result["scores"]["teacher"]           # no --instances
    assert "no --instances" in capsys.readouterr().out
    assert ev.main(args + ["--instances", str(objects)]) == 0
    assert "prompt_object_jaccard" in json.loads((tmp_path / "eval.json").read_text())["scores"]["raw_pixels"]


@pytest.mark.parametrize("args, message", [
    (["--run-dir", "{tmp}"], "--run-dir {tmp}: no checkpoint (checkpoint.pt) in it"),
    (["--checkpoint", "{tmp}/none.pt"], "--checkpoint {tmp}/none.pt: no such file"),
    (["--run-dir", "{run}", "--data", "{tmp}"], "--data needs --masks"),
    (["--run-dir", "{run}", "--masks", "{tmp}"], "--masks and --instances go with --data"),
    (["--run-dir", "{run}", "--data", "{tmp}", "--masks", "{tmp}"], "--data {tmp}: no images"),
])
def test_evaluate_errors_are_one_line(run, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        ev.main([a.format(tmp=tmp_path, run=run) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err


def test_eval_every_on_the_photo_scenes_reads_train_and_validation_scenes_only(tmp_path):
    cfg = preset("tiny", **dict(MICRO, scenes="photos"))
    split, eval_cfg = ev_data.monitoring_split(cfg, 4)
    assert [part.split for part in split.dataset.parts] == ["train", "validation"]
    assert split.test == [8, 9, 10, 11] and eval_cfg.image_size == ev_data.EVAL_GRID * cfg.patch_size
    assert cli.main(_cli_args(**dict(MICRO, scenes="photos"), steps=2, eval_every=2, eval_images=2,
                              output_dir=tmp_path / "run")) == 0
    assert "eval_probe_miou" in _records(tmp_path / "run" / "log.jsonl")[-1]


def test_eval_every_needs_a_built_in_scene_set(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(_cli_args(**MICRO, steps=1, eval_every=1, data=tmp_path, output_dir=tmp_path / "run"))
    assert "--eval-every needs a built-in scene set's ground truth" in capsys.readouterr().err


def test_plot_draws_curves(run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    assert plot.main([str(run), "--output", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 1000
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)       # as if not installed
    with pytest.raises(SystemExit):
        plot.main([str(run), "--output", str(tmp_path / "again.png")])
    assert "needs matplotlib: pip install matplotlib" in capsys.readouterr().err
