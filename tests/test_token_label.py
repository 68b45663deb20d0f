"""Token labeling: label maps the tests write, crop-aligned targets, the loss, the map writer and LV-ViT runs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import compose_cfg, write_image_folder
from PIL import Image

from toe.config.schema import ConfigError
from toe.data.label_maps import dense_logits, write_label_maps
from toe.data.token_label import LabelMapDataset, LabelMapError, TokenLabelLoss, smoothing_values, token_label_targets

NUM_CLASSES = 6


def _position_map(height=4, width=4, k=3):
    """A label map whose top-1 class at (row, col) is ``row * width + col`` (mod classes, here with enough
    classes to be unique), logit 10 against 0 for the runners-up."""
    classes = torch.zeros(k, height, width)
    classes[0] = torch.arange(height * width, dtype=torch.float32).reshape(height, width)
    for j in range(1, k):
        classes[j] = (classes[0] + j) % (height * width)
    scores = torch.zeros(k, height, width)
    scores[0] = 10.0
    return scores, classes.long()


def _batch(scores, classes, box, label=0):
    return {
        "scores": scores[None],
        "classes": classes[None],
        "box": torch.tensor([box]),
        "label": torch.tensor([label]),
    }


def test_full_box_keeps_each_positions_class_and_a_quadrant_box_crops_it():
    scores, classes = _position_map()
    ground_truth, cls_target, dense = token_label_targets(
        _batch(scores, classes, [0.0, 0.0, 1.0, 1.0]), 16, (4, 4), smoothing=0.0, box_order="xy"
    )
    assert dense.shape == (1, 16, 16)
    assert dense.argmax(-1)[0].tolist() == list(range(16))  # row-major positions keep their own class
    torch.testing.assert_close(dense.sum(-1), torch.ones(1, 16))
    # top-left quadrant at a 2x2 grid: positions 0, 1, 4, 5 of the map
    _, _, dense = token_label_targets(_batch(scores, classes, [0.0, 0.0, 0.5, 0.5]), 16, (2, 2), 0.0, "xy")
    assert dense.argmax(-1)[0].tolist() == [0, 1, 4, 5]
    # a box (top 0, left 0.5, bottom 0.5, right 1): the top-right quadrant, rows 0-1 and columns 2-3
    _, _, dense = token_label_targets(_batch(scores, classes, [0.0, 0.5, 0.5, 1.0]), 16, (2, 2), 0.0, "xy")
    assert dense.argmax(-1)[0].tolist() == [2, 3, 6, 7]
    # the official code hands roi_align (top, left, bottom, right) as (x1, y1, x2, y2): the transposed region
    _, _, dense = token_label_targets(_batch(scores, classes, [0.0, 0.5, 0.5, 1.0]), 16, (2, 2), 0.0, "official")
    assert dense.argmax(-1)[0].tolist() == [8, 9, 12, 13]
    assert ground_truth.argmax(-1).tolist() == [0] and cls_target.shape == (1, 16)


def test_targets_are_softmax_over_all_classes_with_the_official_smoothing():
    scores, classes = _position_map(2, 2, k=2)
    _, cls_target, dense = token_label_targets(
        _batch(scores, classes, [0.0, 0.0, 1.0, 1.0]), 10, (2, 2), smoothing=0.1, box_order="xy"
    )
    on, off = smoothing_values(0.1, 10)
    assert (on, off) == pytest.approx((0.91, 0.01))
    # position 0: class 0 has logit 10, the other 9 classes logit 0 (top-k runner-up included)
    expected = torch.full((10,), 1.0)
    expected[0] = math.exp(10.0)
    expected = expected / expected.sum() * on + off
    torch.testing.assert_close(dense[0, 0], expected)
    assert float(dense.sum(-1).mean()) == pytest.approx(1 + off)  # the official on/off sum to 1 + s/C
    assert cls_target.argmax(-1).item() in range(4)


def test_classes_beyond_the_model_are_an_error(tmp_path):
    from timm.data import create_dataset

    data = write_image_folder(tmp_path / "data")
    maps = tmp_path / "maps"
    _write_maps(maps, data)
    scores, classes = _position_map()  # classes up to 15
    torch.save(torch.stack([scores, classes.float()]).half(), maps / "cat" / "cat_2.pt")
    dataset = LabelMapDataset(create_dataset("", root=str(data), split="train", is_training=True), maps, NUM_CLASSES)
    dataset.transform = timm.data.create_transform(input_size=(3, 16, 16), is_training=True)
    assert dataset[1][1]["classes"].max() < NUM_CLASSES
    with pytest.raises(LabelMapError, match="cat_2.pt names class 15, but the model has 6 classes"):
        dataset[2]


def _write_maps(root: Path, dataset_root: Path, size=4):
    """One map per training image of an image folder: the image's class everywhere, logit 8."""
    for class_dir in sorted((dataset_root / "train").iterdir()):
        label = sorted(p.name for p in (dataset_root / "train").iterdir()).index(class_dir.name)
        for image in class_dir.iterdir():
            classes = torch.stack([torch.full((size, size), float((label + j) % 2)) for j in range(2)])
            scores = torch.stack([torch.full((size, size), 8.0), torch.zeros(size, size)])
            (root / class_dir.name).mkdir(parents=True, exist_ok=True)
            torch.save(torch.stack([scores, classes]).half(), root / class_dir.name / f"{image.stem}.pt")


def _coordinate_image_folder(root: Path, size=48):
    """Images whose red channel is the column and green channel the row (0-255), so a crop shows its box."""
    ramp = np.linspace(0, 255, size).astype(np.uint8)
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 0] = ramp[None, :]
    pixels[..., 1] = ramp[:, None]
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            Image.fromarray(pixels).save(root / split / name / f"{name}0.png")
    return root


def test_dataset_crop_box_matches_the_image_crop_and_flip_mirrors_the_map(tmp_path):
    from timm.data import create_dataset, create_transform

    data = _coordinate_image_folder(tmp_path / "data")
    maps = tmp_path / "maps"
    for name in ("a", "b"):
        (maps / name).mkdir(parents=True)
        scores, classes = _position_map(4, 4, k=2)
        torch.save(torch.stack([scores, classes.float()]).half(), maps / name / f"{name}0.pt")
    dataset = LabelMapDataset(create_dataset("", root=str(data), split="train", is_training=True), maps, 16)
    for hflip in (0.0, 1.0):
        dataset.transform = create_transform(
            input_size=(3, 16, 16),
            is_training=True,
            scale=(0.2, 0.6),
            hflip=hflip,
            mean=(0, 0, 0),
            std=(1, 1, 1),
            interpolation="bilinear",
            color_jitter=None,
        )
        for _ in range(5):
            image, target = dataset[0]
            top, left, bottom, right = target["box"].tolist()
            assert 0 <= top < bottom <= 1 and 0 <= left < right <= 1
            # the crop's top-left pixel shows where the box starts (red = column, green = row; flipped: mirrored)
            column = image[0, 0, 0].item() if hflip == 0 else 1 - image[0, 0, 0].item()
            assert column == pytest.approx(left, abs=0.08) and image[1, 0, 0].item() == pytest.approx(top, abs=0.08)
            assert torch.equal(target["classes"], classes.flip(-1) if hflip else classes)
            assert target["label"].item() == 0


def test_missing_or_malformed_label_maps_are_named(tmp_path):
    from timm.data import create_dataset

    data = write_image_folder(tmp_path / "data")
    train = create_dataset("", root=str(data), split="train", is_training=True)
    with pytest.raises(LabelMapError, match="cat/cat_0.pt"):
        LabelMapDataset(train, tmp_path, 2)
    maps = tmp_path / "maps"
    _write_maps(maps, data)
    torch.save(torch.zeros(5, 4, 4), maps / "cat" / "cat_1.pt")
    dataset = LabelMapDataset(train, maps, 2)
    dataset.transform = timm.data.create_transform(input_size=(3, 16, 16), is_training=True)
    with pytest.raises(LabelMapError, match=r"cat_1.pt has shape \(5, 4, 4\)"):
        dataset[1]


def test_loss_is_class_token_ce_plus_dense_ce_with_mixtoken_mixing():
    torch.manual_seed(0)
    scores, classes = _position_map(4, 4, k=2)
    target = {
        "scores": torch.stack([scores, scores * 0.5]),
        "classes": torch.stack([classes, classes.flip(-1)]),
        "box": torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 0.75, 0.75]]),
        "label": torch.tensor([3, 5]),
    }
    cls_logits, dense = torch.randn(2, 16, requires_grad=True), torch.randn(2, 4, 16, requires_grad=True)
    box = (0, 0, 1, 2)  # MixToken pasted 2 of 4 tokens: lam = 0.5
    loss = TokenLabelLoss(16, (2, 2), smoothing=0.1, dense_weight=0.5, box_order="xy")((cls_logits, dense, box), target)
    _, cls_target, dense_target = token_label_targets(target, 16, (2, 2), 0.1, "xy")
    mixed = 0.5 * cls_target + 0.5 * cls_target.flip(0)
    expected = (
        -(mixed * cls_logits.log_softmax(-1)).sum(-1).mean()
        + 0.5 * -(dense_target * dense.log_softmax(-1)).sum(-1).mean()
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert dense.grad.abs().sum() > 0

    # without label maps: the class token alone, against the smoothed (and MixToken-mixed) label
    plain = TokenLabelLoss(16, (2, 2), smoothing=0.1)((cls_logits, None, (0, 0, 0, 0)), torch.tensor([3, 5]))
    on, off = smoothing_values(0.1, 16)
    one_hot = torch.full((2, 16), off)
    one_hot[0, 3], one_hot[1, 5] = on, on
    torch.testing.assert_close(plain, -(one_hot * cls_logits.log_softmax(-1)).sum(-1).mean())


def test_label_maps_written_from_a_vit_and_a_cnn_hold_their_top_k_dense_logits(tmp_path):
    from toe.data.datasets import DigitsDataset

    dataset = DigitsDataset(train=False, img_size=32)
    dataset.images, dataset.targets, dataset.names = dataset.images[:6], dataset.targets[:6], dataset.names[:6]
    dataset.transform = timm.data.create_transform(input_size=(3, 32, 32))
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    assert write_label_maps(vit, dataset, tmp_path / "vit", progress=False) == 6
    saved = torch.load(tmp_path / "vit" / f"{dataset.names[2]}.pt")
    assert saved.shape == (2, 5, 4, 4) and saved.dtype == torch.float16
    with torch.no_grad():
        logits = dense_logits(vit, dataset[2][0][None])[0]  # [4, 4, 10]
    values, indices = logits.topk(5, dim=-1)
    assert torch.equal(saved[1].long(), indices.permute(2, 0, 1))
    torch.testing.assert_close(saved[0].float(), values.permute(2, 0, 1), atol=1e-2, rtol=1e-2)
    resnet = timm.create_model("resnet10t", num_classes=10).eval()
    write_label_maps(resnet, dataset, tmp_path / "cnn", topk=3, progress=False)
    assert torch.load(tmp_path / "cnn" / f"{dataset.names[0]}.pt").shape == (2, 3, 1, 1)


def test_lvvit_trains_with_token_labels_and_toe(digits_label_maps, tmp_path):
    from toe.train.task import train

    cfg = compose_cfg(["logger=none", "model=lvvit_cpu", "schedule.epochs=3", f"token_label.root={digits_label_maps}"])
    summary = train(cfg, tmp_path / "lvvit")
    assert summary.status == "completed"
    rows = [json.loads(line) for line in (tmp_path / "lvvit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens_after_first_block"] for r in rows] == [33, 49, 65]  # ToE stages, CLS token included
    # two CE terms over 10 classes: the loss starts near 2 ln 10 and falls
    assert rows[0]["train_loss"] > math.log(10) and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert 0.0 <= summary.best_top1 <= 1.0


def test_lvvit_without_label_maps_trains_on_the_class_token_and_says_so(tmp_path, caplog):
    from toe.train.task import train

    summary = train(compose_cfg(["logger=none", "model=lvvit_cpu", "schedule.epochs=3"]), tmp_path / "run")
    assert summary.status == "completed" and summary.best_top1 > 0.3
    assert "without label maps" in caplog.text


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["token_label.root=/nowhere"], "no dense head"),
        (["model=lvvit_cpu", "token_label.root=/nowhere"], "is not a directory"),
        (["model=lvvit_cpu", "token_label.root=.", "recipe.mixup=0.8"], "MixToken replaces Mixup"),
        (["model=lvvit_cpu", "token_label.root=.", "token_label.box_order=yx"], "box_order=yx"),
        (["model=lvvit_cpu", "method=efficienttrain", "schedule.epochs=5"], "fixed position embedding"),
    ],
)
def test_bad_token_label_settings_are_config_errors(tmp_path, overrides, message):
    from toe.train.task import train

    with pytest.raises(ConfigError, match=message):
        train(compose_cfg(["logger=none", "schedule.epochs=3", *overrides]), tmp_path / "run")
