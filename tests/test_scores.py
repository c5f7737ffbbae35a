"""Issue 28: the photo scenes and their splits, the controls, the threshold-free and
matched-distance scores, the bootstrap intervals, and the evaluation of a PASCAL VOC folder."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from loca_train import __main__ as cli
from loca_train import evaluate as ev
from loca_train import preset
from loca_train.evaluation import scores as sc
from loca_train.evaluation.controls import (TruthFeatures, colour_features, control_sources, noise_features,
                                            position_code)
from loca_train.evaluation.data import photo_split
from loca_train.evaluation.metrics import patch_majority, roc_auc
from loca_train.evaluation.stats import Bootstrap, mean_iou, ratio, summarise
from loca_train.images import IGNORE_LABEL, open_images
from loca_train.photos import PHOTO_CLASSES, SPLIT_BANDS, PhotoScenes
from test_train import MICRO, _cli_args

IGNORE = IGNORE_LABEL


# ------------------------------------------------------------------ photo scenes

def test_photo_scenes_hold_several_instances_per_class_and_are_pure():
    scenes = PhotoScenes(3, 48, seed=1, split="test")
    for index in range(3):
        image, instances, classes = scenes.scene(index)
        assert image.shape == (3, 48, 48) and image.dtype == torch.uint8
        assert torch.equal(instances == 0, classes == 0)
        assert set(classes.unique().tolist()) <= set(range(len(PHOTO_CLASSES)))
        per_class = {}
        for i in instances.unique().tolist()[1:]:
            assert len(classes[instances == i].unique()) == 1
            c = int(classes[instances == i][0])
            per_class[c] = per_class.get(c, 0) + 1
        assert max(per_class.values()) >= 2                           # class-mates elsewhere in the scene
    assert all(torch.equal(a, b) for a, b in zip(PhotoScenes(3, 48, seed=1, split="test").scene(2), scenes.scene(2)))


def test_photo_splits_read_disjoint_bands_and_differ():
    bands = sorted(SPLIT_BANDS.values())
    assert bands[0][0] == 0 and bands[-1][1] == 1 and all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    images = [PhotoScenes(1, 32, split=s)[0] for s in SPLIT_BANDS]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    split = photo_split(2, 1, 2, size=32)
    assert split.probe == [0, 1] and split.validation == [2] and split.test == [3, 4]
    assert torch.equal(split.dataset.scene(2)[0], PhotoScenes(1, 32, split="validation")[0])
    with pytest.raises(ValueError, match="split must be one of train, validation, test, got 'eval'"):
        PhotoScenes(1, 32, split="eval")
    training = open_images(None, 4, 32, 0, scenes="photos")        # --scenes photos: the train split
    assert training.split == "train" and torch.equal(training[1], PhotoScenes(4, 32, split="train")[1])


# ------------------------------------------------------------------ controls

def test_controls_position_colour_noise_and_ideal():
    code = position_code((6, 6)).flatten(0, 1)
    cosine = F.normalize(code, dim=-1) @ F.normalize(code, dim=-1).T
    assert cosine[0, 1] > cosine[0, 2] > cosine[0, 3]               # falls with the distance
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(colour_features(x, 4)[1, 0, 1], x[1, :, :4, 4:].mean((1, 2)))
    noise = noise_features(4)(x)
    assert noise.shape == (2, 2, 2, 64) and torch.equal(noise_features(4)(x), noise)
    instances = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3], [0, 0, 3, 3]], dtype=torch.uint8)
    classes = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]], dtype=torch.uint8)
    ideal = TruthFeatures(3, 4)([(None, instances, classes)], (2, 2))[0].flatten(0, 1)
    cosine = F.normalize(ideal, dim=-1) @ F.normalize(ideal, dim=-1).T
    assert torch.allclose(cosine[0], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    assert set(control_sources(4, 3)) == {"noise", "position", "colour", "ideal"}


# ------------------------------------------------------------------ scores on hand-made cases

def test_grouped_mann_whitney_matches_roc_auc_with_ties():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 5, (200,), generator=g).float()
    positive = torch.rand(200, generator=g) < 0.4
    groups = torch.randint(0, 3, (200,), generator=g)
    u, pairs = sc.grouped_mann_whitney(values, positive, groups, 4)
    for k in range(3):
        v, p = values[groups == k], positive[groups == k]
        assert float(u[k] / pairs[k]) == pytest.approx(roc_auc(v[p], v[~p]))
    assert pairs[3] == 0


def test_jaccard_curves_and_best_threshold():
    maps = torch.tensor([[0.9, 0.8, 0.2, 0.1], [0.5, 0.5, 0.5, -0.5]])
    truth = torch.tensor([[True, False, True, False], [True, True, False, False]])
    curves, best = sc.jaccard_curves(maps, truth, torch.tensor([-1.0, 0.0, 0.85, 0.95]))
    assert curves[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0])
    assert curves[1].tolist() == pytest.approx([0.5, 2 / 3, 0.0, 0.0])
    # Best: the top 3 of the first map (2 / 3); the second cuts its tie at 0.5 whole (2 / 3).
    assert best.tolist() == pytest.approx([2 / 3, 2 / 3])


def test_pair_scores_separate_matched_distances():
    instances = torch.zeros(4, 4, dtype=torch.uint8)
    instances[:, :2] = 1
    one_hot = F.one_hot(instances.long(), 2).float()
    rows = sc.pair_scores(one_hot, instances)
    assert ratio(rows["similarity_auc"]) == 1 and ratio(rows["similarity_auc_matched_distance"]) == 1
    assert rows["similarity_auc_objects"][1] == 0                   # one object: no pair to compare
    position = position_code((4, 4))
    rows = sc.pair_scores(position, instances)
    assert ratio(rows["similarity_auc"]) > 0.6                      # near pairs are same-region pairs ...
    assert ratio(rows["similarity_auc_matched_distance"]) < ratio(rows["similarity_auc"])   # ... less so here


def test_prompt_auroc_at_matched_distances_takes_away_what_position_tells():
    # Patch 0 of a 2 x 2 grid on 4 x 4 pixels is centred at (1, 1); pixel centres are at k + 0.5.
    centre = torch.arange(4, dtype=torch.float64) + 0.5 - 1
    expected = (centre[:, None] ** 2 + centre ** 2).sqrt()
    assert torch.equal(sc.prompt_distances([(1, 0)], (2, 2), (4, 4))[0], expected)
    instances = torch.zeros(32, 32, dtype=torch.uint8)
    instances[4:28, 2:14] = 1                                        # an object on the left, background right
    classes = instances.clone()
    grid = (8, 8)
    one_hot = F.one_hot(patch_majority(instances, grid).long(), 2).float()

    def matched(features):
        _, auroc, rows, *_ = sc.prompt_scores(features, instances, classes)["object"]
        return float(auroc[0]), float(rows[0, 0] / rows[0, 1])
    assert matched(one_hot)[1] > 0.95
    # A code of position ranks the object's pixels first (they are near the prompt), but within one
    # ring of distance it tells nothing (the code is not exactly isotropic: not exactly one half).
    plain, at_matched_distance = matched(position_code(grid))
    assert plain > 0.85 and at_matched_distance < 0.6


# ------------------------------------------------------------------ statistics

def test_bootstrap_intervals_normalisation_and_paired_differences():
    per_image = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0], [2.0, 2.0]])
    boot = Bootstrap(4, samples=500)
    assert Bootstrap.value(per_image, ratio) == pytest.approx(6 / 9)
    draws = boot.samples(per_image, ratio)
    assert draws.shape == (500,) and draws.min() >= 0 and draws.max() <= 1
    confusion = torch.tensor([[[3.0, 1.0, 0.0, 2.0]]])                # [[3, 1], [0, 2]]
    assert float(mean_iou(confusion.sum(1))) == pytest.approx((3 / 4 + 2 / 3) / 2)
    sources = {"noise": per_image * torch.tensor([0.0, 1.0]), "ideal": per_image * torch.tensor([0.0, 1.0]) * 2,
               "net": per_image}
    sources["ideal"][:, 0] = sources["ideal"][:, 1] / 2
    result = summarise({k: {"m": v} for k, v in sources.items()}, {"m": "ratio"}, boot, references=("noise",))
    assert result["scores"]["ideal"]["m"]["normalised"]["value"] == pytest.approx(1)
    assert result["scores"]["noise"]["m"]["normalised"]["low"] == 0
    difference = result["differences"]["ideal - noise"]["m"]
    assert difference["value"] == pytest.approx(0.5) and difference["low"] == difference["high"] == pytest.approx(0.5)
    assert "noise - noise" not in result["differences"]
    runs = torch.stack([per_image, per_image * torch.tensor([0.0, 1.0])])     # two runs: 2/3 and 0
    assert Bootstrap.value(runs, ratio) == pytest.approx(1 / 3)
    assert Bootstrap(4, runs=2, samples=200).samples(runs, ratio).max() == pytest.approx(2 / 3, abs=0.4)
    with pytest.raises(ValueError, match=r"per_image must be \(runs=1, images=4, k\)"):
        boot.samples(torch.zeros(3, 2), ratio)


def test_measure_controls_on_photo_scenes_chooses_thresholds_on_validation():
    cfg = dataclasses.replace(preset("tiny"), image_size=48, patch_size=6)      # an 8 x 8 grid
    split = photo_split(2, 2, 2, size=48)
    sources = control_sources(6, len(PHOTO_CLASSES), 16)
    measured = sc.measure(sources, split, cfg, batch_size=4, examples=1)
    assert measured.counts["validation_images"] == 2 and measured.counts["test_images"] == 2
    assert set(measured.per_image["ideal"]) == set(sc.KINDS)
    assert measured.examples and set(measured.examples[0]["maps"]) == set(sources)
    result = sc.summary([measured])
    ideal, noise = result["scores"]["ideal"], result["scores"]["noise"]
    for metric in ("prompt_class_auroc", "similarity_auc_matched_distance", "probe_miou"):
        assert ideal[metric]["value"] > noise[metric]["value"]
    assert -1 <= result["thresholds"]["position"]["class"] <= 1
    # Other test scenes do not move the thresholds: they come from the validation scenes.
    again = sc.measure(sources, photo_split(2, 2, 1, size=48), cfg, batch_size=4)
    assert again.thresholds == measured.thresholds
    assert "normalised: noise = 0, ideal = 1" in sc.scores_table(result)


# ------------------------------------------------------------------ a VOC folder

def _voc_folder(root, train=("a", "b", "c"), val=("d", "e", "f"), extra=("x", "y")):
    """VOC2012's layout: JPEGImages (also images without masks), SegmentationClass (palette
    PNGs, 255 on object borders), SegmentationObject and ImageSets/Segmentation lists."""
    from PIL import Image

    for name in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / name).mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(train + val + extra):
        h, w = 30, 40
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(
            root / "JPEGImages" / f"{name}.jpg")
        if name in extra:
            continue
        classes = torch.zeros(h, w, dtype=torch.uint8)
        objects = torch.zeros(h, w, dtype=torch.uint8)
        for i, (y, x) in enumerate(((4, 4), (16, 20))):
            classes[y:y + 10, x:x + 12] = 1 + (k + i) % 20
            objects[y:y + 10, x:x + 12] = i + 1
        border = F.max_pool2d(objects[None].float(), 3, 1, 1)[0] != objects.float()
        classes[border], objects[border] = IGNORE, IGNORE
        for folder, mask in (("SegmentationClass", classes), ("SegmentationObject", objects)):
            png = Image.fromarray(mask.numpy(), mode="L").convert("P")
            png.putpalette([(7 * i) % 256 for i in range(768)])
            png.save(root / folder / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(val) + "\n")
    return root


def test_evaluate_a_voc_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(_cli_args(**MICRO, steps=1, output_dir=run)) == 0
    voc = _voc_folder(tmp_path / "VOC2012")
    out = tmp_path / "eval"
    assert ev.main(["--run-dir", str(run), "--data", str(voc), "--output-dir", str(out), "--no-progress",
                    "--examples", "1"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert "3 VOC val images" in result["data"] and result["scores_split"]["test_images"] == 3
    assert result["scores_split"]["probe_images"] == 3
    assert set(result["scores"]) == {"teacher", "student", "random_init", "raw_pixels", "noise", "position",
                                     "colour", "ideal"}
    ideal = result["scores"]["ideal"]
    assert ideal["prompt_object_auroc"]["value"] > result["scores"]["noise"]["prompt_object_auroc"]["value"]
    assert "teacher - random_init" in result["differences"]
    assert "normalised: noise = 0, ideal = 1" in capsys.readouterr().out
    # Two runs (here the same one twice) combined: intervals over runs and images.
    assert ev.main(["--combine"] + [str(out / "eval.json")] * 2 + ["--output", str(out / "seeds.json")]) == 0
    combined = json.loads((out / "seeds.json").read_text())["scores"]["teacher"]["probe_miou"]
    assert combined["value"] == pytest.approx(result["scores"]["teacher"]["probe_miou"]["value"])
    assert "2 runs; 95% intervals over runs and test images" in capsys.readouterr().out
    for argv, message in ((["--combine", str(out / "missing.json")], "--combine " + str(out / "missing.json")),
                          (["--run-dir", str(run), "--output", str(out / "x.json")], "--output goes with --combine")):
        with pytest.raises(SystemExit):
            ev.main(argv)
        assert message in capsys.readouterr().err
    (voc / "ImageSets/Segmentation/val.txt").write_text("d\nmissing\n")
    with pytest.raises(SystemExit):
        ev.main(["--run-dir", str(run), "--data", str(voc), "--output-dir", str(out), "--no-progress"])
    assert "val.txt lists 2 images, 1 of them missing from JPEGImages" in capsys.readouterr().err
