"""Detection data (toe.data.detection), COCO box AP (toe.train.detection) and ``toe-train task=detection``: COCO
folders the tests write themselves, the embedded digits-detection set, and real runs of YOLOS with ToE."""

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg

from toe.config.schema import ConfigError
from toe.config.validate import validate
from toe.data.detection import (
    AnnotationError,
    DigitsDetection,
    coco_sets,
    collate_detection,
    detection_transforms,
    digits_detection_sets,
    draw_digits_detection,
    write_coco_folder,
)
from toe.train.detection import box_ap, coco_results
from toe.train.task import train

SMALL = DigitsDetection(train_images=40, val_images=12, canvas=32, max_digits=2, digit_sizes=(12, 20))


def _coco_root(tmp_path: Path, spec: DigitsDetection = SMALL) -> Path:
    root = tmp_path / "coco"
    for split, train_split in (("train2017", True), ("val2017", False)):
        dataset, images = draw_digits_detection(spec, train_split)
        write_coco_folder(root, split, dataset, images)
    return root


def test_the_embedded_set_is_drawn_the_same_every_time_with_boxes_around_the_ink():
    first, images = draw_digits_detection(SMALL, train=True)
    again, _ = draw_digits_detection(SMALL, train=True)
    assert first == again
    other, _ = draw_digits_detection(DigitsDetection(**{**SMALL.__dict__, "seed": 1}), train=True)
    assert other != first
    assert {c["id"] for c in first["categories"]} == set(range(1, 11))
    for ann in first["annotations"]:
        x, y, w, h = (int(v) for v in ann["bbox"])
        assert 0 <= x and 0 <= y and x + w <= 32 and y + h <= 32 and w >= 2 and h >= 2
        pixels = torch.from_numpy(np.array(images[ann["image_id"]].convert("L")))
        inside = pixels[y : y + h, x : x + w]
        assert inside[0].max() > 32 and inside[-1].max() > 32 and inside[:, 0].max() > 32 and inside[:, -1].max() > 32
    per_image = [sum(a["image_id"] == i["id"] for a in first["annotations"]) for i in first["images"]]
    assert min(per_image) >= 1 and max(per_image) <= 2


def test_a_written_coco_folder_reads_back_the_same_boxes_through_pycocotools(tmp_path):
    root = _coco_root(tmp_path)
    train_set, val_set = coco_sets(str(root))
    embedded, _ = digits_detection_sets(SMALL)
    assert len(train_set) == 40 and len(val_set) == 12 and train_set.num_classes == 11
    for index in (0, 7, 39):
        image, target = train_set.raw(index)
        image_e, target_e = embedded.raw(index)
        assert image.size == (32, 32) and torch.equal(target["boxes"], target_e["boxes"])
        assert torch.equal(target["labels"], target_e["labels"])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "annotations" / "instances_val2017.json").unlink(), "annotation file not found"),
        (lambda root: (root / "annotations" / "instances_val2017.json").write_text("{no json"), "not valid JSON"),
        (lambda root: next((root / "val2017").iterdir()).unlink(), "listed image(s) not in"),
        (
            lambda root: _edit(root, lambda d: d["annotations"][0].update(bbox=[20, 20, 30, 5])),
            "lies outside its image",
        ),
        (lambda root: _edit(root, lambda d: d["annotations"][0].update(image_id=999)), "names image 999"),
        (lambda root: _edit(root, lambda d: d.pop("categories")), "not a COCO annotation file"),
        (lambda root: _edit(root, lambda d: d["annotations"][0].update(category_id=42)), "category 42"),
    ],
)
def test_a_broken_coco_folder_is_named_in_one_line(tmp_path, damage, message):
    root = _coco_root(tmp_path)
    damage(root)
    with pytest.raises(
        AnnotationError, match="instances_val2017.json" if "image(s)" not in message else "val2017"
    ) as err:
        coco_sets(str(root))
    assert message in str(err.value) and "\n" not in str(err.value)


def _edit(root: Path, change) -> None:
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_detrs_training_transform_keeps_boxes_on_their_objects():
    train_set, _ = digits_detection_sets(SMALL)
    train_t, eval_t = detection_transforms([48, 64], 96, 40, 1.0, True, (0.5,) * 3, (0.5,) * 3)
    torch.manual_seed(0)
    random.seed(0)  # DETR's random-size crop draws from Python's RNG, as DETR's does
    for index in range(10):
        image, target = train_set.raw(index)
        x, out = train_t(image, target)
        boxes = out["boxes"]
        assert x.dtype == torch.float32 and x.shape[0] == 3
        assert min(x.shape[1:]) in (48, 64) or max(x.shape[1:]) == 96  # the shortest side, unless the longest caps it
        assert max(x.shape[1:]) <= 96 and ((boxes >= 0) & (boxes <= 1)).all()
        assert len(out["labels"]) == len(boxes) and out["size"].tolist() == list(x.shape[1:])
    x, out = eval_t(*train_set.raw(0))
    assert x.shape[1:] == (40, 40)
    expected = train_set.raw(0)[1]["boxes"] / 32  # flip-free, crop-free: the same fractions
    cx, cy = (expected[:, 0] + expected[:, 2]) / 2, (expected[:, 1] + expected[:, 3]) / 2
    torch.testing.assert_close(out["boxes"][:, :2], torch.stack([cx, cy], 1), atol=1e-6, rtol=0)
    flip_t, _ = detection_transforms([32], 32, 32, 1.0, False, (0.5,) * 3, (0.5,) * 3)
    flipped = flip_t(*train_set.raw(0))[1]["boxes"]
    torch.testing.assert_close(flipped[:, 0], 1 - out["boxes"][:, 0], atol=1e-6, rtol=0)


def test_batches_are_padded_to_the_largest_image():
    images = [torch.ones(3, 20, 30), torch.ones(3, 28, 16)]
    batch, targets = collate_detection([(images[0], {"a": 1}), (images[1], {"a": 2})])
    assert batch.shape == (2, 3, 28, 30) and targets == [{"a": 1}, {"a": 2}]
    assert batch[0, :, 20:].abs().sum() == 0 and batch[1, :, :, 16:].abs().sum() == 0


def test_box_ap_is_one_for_the_ground_truth_and_falls_with_the_overlap():
    _, val_set = digits_detection_sets(SMALL)
    coco = val_set.coco
    exact = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.dataset["annotations"]
    ]
    assert box_ap(coco, exact).ap == pytest.approx(1.0)
    shifted = [dict(r, bbox=[r["bbox"][0] + r["bbox"][2] * 0.2, *r["bbox"][1:]]) for r in exact]  # IoU 0.67
    found = box_ap(coco, shifted)
    assert found.ap50 == pytest.approx(1.0) and found.ap75 == pytest.approx(0.0) and 0 < found.ap < 0.5
    wrong = [dict(r, category_id=r["category_id"] % 10 + 1) for r in exact]
    assert box_ap(coco, wrong).ap == 0.0 and box_ap(coco, []).ap == 0.0


def test_coco_results_are_pixel_boxes_of_the_original_image():
    outputs = {
        "pred_logits": torch.tensor([[[0.0, 0.0, 5.0, 0.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.25]]]),
    }
    (result,) = coco_results(outputs, [{"image_id": torch.tensor(7), "orig_size": torch.tensor([40, 80])}])
    assert result["image_id"] == 7 and result["category_id"] == 2
    assert result["bbox"] == pytest.approx([20.0, 15.0, 40.0, 10.0])


# --- toe-train task=detection --------------------------------------------------------------------------------

TINY_DETECTION = [
    "task=detection",
    "logger=none",
    "data.images=[48,16]",
    "schedule.epochs=3",
    "schedule.length=3",
    "schedule.stage_starts=[0,1,2]",
    "detection.backbone_epochs=1",
]


@pytest.fixture
def detection_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_toe_train_task_detection_trains_its_backbone_then_yolos_with_toe(tmp_path, detection_cache):
    cfg = compose_cfg(TINY_DETECTION)
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary.status == "completed" and summary.method == "toe" and summary.model == "vit_tiny_patch16_224"
    assert [r["stage"] for r in rows] == [1, 2, 3]
    # 64 patches, 10 detection tokens and the class token; ToE's 0.5 and 0.75 of the patches in stages 1 and 2
    assert [r["tokens_after_first_block"] for r in rows] == [1 + 32 + 10, 1 + 48 + 10, 1 + 64 + 10]
    for key in ("final_box_ap", "final_box_ap50", "final_box_ap75", "best_box_ap"):
        assert 0.0 <= getattr(summary, key) <= 1.0
    assert summary.final_top1 is None and all(r["val_box_ap"] is not None for r in rows)
    assert rows[0]["train_flops_total"] < rows[2]["train_flops_total"] - rows[1]["train_flops_total"]
    backbones = list((detection_cache / "backbones").iterdir())
    assert len(backbones) == 1 and (backbones[0] / "checkpoint.pth").is_file()
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=False)["model"]
    assert (
        "backbone.det_token" in state and "backbone.mid_pos_embed" in state and "class_embed.layers.2.weight" in state
    )
    # a second run reuses the cached backbone
    # a COCO folder on that backbone, at several scales with flips and DETR's crop: batches of other token counts
    coco = train(
        compose_cfg(
            [o for o in TINY_DETECTION if not o.startswith("data.")]
            + [
                "data=coco",
                f"data.root={_coco_root(tmp_path)}",
                f"finetune.path={backbones[0] / 'checkpoint.pth'}",
                "detection.scales=[24,32,40]",
                "detection.max_size=48",
                "detection.crop=true",
                "recipe.hflip=0.5",
                "recipe.batch_size=8",
            ]
        ),
        tmp_path / "coco_run",
    )
    assert coco.status == "completed" and 0.0 <= coco.final_box_ap <= 1.0 and coco.data == "coco"


def test_a_detection_run_on_a_coco_folder_with_a_backbone_of_another_shape_is_refused_in_one_line(tmp_path):
    root = _coco_root(tmp_path)
    backbone = tmp_path / "backbone.pth"
    import timm

    torch.save({"model": timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4).state_dict()}, backbone)
    tiny = [o for o in TINY_DETECTION if not o.startswith("data.")]
    cfg = compose_cfg(tiny + ["data=coco", f"data.root={root}", f"finetune.path={backbone}"])
    with pytest.raises(ConfigError, match="do not fit") as err:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=detection", "data=digits"], "task=detection with data=digits"),
        (["data=digits_detection"], "task=classification with data=digits_detection"),
        (["task=detection", "data=coco", "data.root=/tmp"], "needs finetune.path"),
        (["task=detection", "method=tome"], "Token Merging"),
        (["task=detection", "recipe.mixup=0.8"], "Mixup"),
        (["task=detection", "data.digit_sizes=[12,40]"], "larger than the canvas"),
        (["data.canvas=40"], "only data=digits_detection"),
    ],
)
def test_detection_configs_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(["logger=none"] + overrides), devices=False)


def test_toe_train_task_detection_reports_a_missing_coco_root_in_one_line(tmp_path):
    backbone = tmp_path / "b.pth"
    torch.save({"x": torch.zeros(1)}, backbone)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "toe.cli.train",
            "task=detection",
            "data=coco",
            f"data.root={tmp_path / 'none'}",
            f"finetune.path={backbone}",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "does not exist" in output and "Traceback" not in output


@pytest.mark.slow
def test_a_killed_detection_run_resumes_to_the_same_box_ap_as_an_uninterrupted_one(tmp_path):
    import os
    import signal
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", TOE_CACHE=str(tmp_path / "cache"))
    overrides = [o for o in TINY_DETECTION if not o.startswith("schedule.")] + [
        "schedule.epochs=4",
        "schedule.length=4",
        "schedule.stage_starts=[0,1,2]",
        "data.images=[96,16]",
    ]

    def cli(run_dir):
        return [sys.executable, "-m", "toe.cli.train", *overrides, f"hydra.run.dir={run_dir}"]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cli(straight), check=True, capture_output=True, env=env, timeout=600)  # trains the backbone too
    proc = subprocess.Popen(cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoint.pth").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "checkpoint.pth", weights_only=True)["epoch"] < 4
    subprocess.run(cli(killed), check=True, capture_output=True, env=env, timeout=600)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").open()] for d in (straight, killed)]
    for key in ("stage", "tokens_after_first_block", "train_loss", "val_box_ap", "val_box_ap50", "lr"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    assert len(json.loads((killed / "summary.json").read_text())["resumed_at"]) == 1
