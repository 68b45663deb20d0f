import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from toe.config.schema import ConfigError
from toe.data.augment import BatchAugment, TensorImages, random_resized_crop_boxes
from toe.train.task import train

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(batch=6, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def _normalised(images):
    return (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_crop_boxes_follow_torchvision_sampling_per_image():
    torch.manual_seed(0)
    boxes = random_resized_crop_boxes(4000, 32, 40, scale=(0.3, 0.9), ratio=(3 / 4, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 40).all()
    area = h * w / (32 * 40)
    # areas and aspect ratios are drawn before rounding to whole pixels: allow a pixel's worth either way
    assert area.min() > 0.3 - 0.07 and area.max() < 0.9 + 0.07
    assert (w / h).min() > 3 / 4 - 0.1 and (w / h).max() < 4 / 3 + 0.1
    assert len({tuple(b) for b in boxes.tolist()}) > 1000  # each image its own box
    # an area no try can fit falls back to torchvision's centre crop of the clamped aspect ratio
    wide = random_resized_crop_boxes(3, 10, 40, scale=(2.0, 2.0), ratio=(3 / 4, 4 / 3))
    assert wide.tolist() == [[0.0, 13.0, 10.0, 13.0]] * 3  # 13 = round(10 x 4/3) wide, (40 - 13) // 2 from the left


def test_the_whole_image_comes_back_normalised_and_flips_per_image():
    images = _images()
    keep = BatchAugment(32, (1.0, 1.0), (1.0, 1.0), 0.0, "bicubic", MEAN, STD)
    torch.testing.assert_close(keep(images), _normalised(images), atol=1e-5, rtol=0)
    flip = BatchAugment(32, (1.0, 1.0), (1.0, 1.0), 1.0, "bilinear", MEAN, STD)
    torch.testing.assert_close(flip(images), _normalised(images.flip(-1)), atol=1e-5, rtol=0)
    torch.manual_seed(3)
    half = BatchAugment(32, (1.0, 1.0), (1.0, 1.0), 0.5, "bilinear", MEAN, STD)(images.repeat(8, 1, 1, 1))
    flipped = [torch.allclose(out, _normalised(images.flip(-1))[i % 6], atol=1e-5) for i, out in enumerate(half)]
    assert 8 < sum(flipped) < 40  # about half of 48


def test_a_crop_equals_torchvision_resized_crop_of_its_box():
    images = _images(batch=5, size=24)
    augment = BatchAugment(32, (0.3, 0.8), (3 / 4, 4 / 3), 0.0, "bilinear", MEAN, STD)
    torch.manual_seed(7)
    out = augment(images)
    torch.manual_seed(7)
    boxes = random_resized_crop_boxes(5, 24, 24, (0.3, 0.8), (3 / 4, 4 / 3)).int().tolist()
    for image, result, (top, left, h, w) in zip(images, out, boxes):
        expected = TF.resized_crop(
            image.float(), top, left, h, w, [32, 32], interpolation=TF.InterpolationMode.BILINEAR, antialias=False
        )
        torch.testing.assert_close(result, _normalised(expected.round().clamp(0, 255)[None])[0], atol=0.02, rtol=0)
        assert not math.isclose(float(result.std()), 0.0)


def test_tensor_images_serve_a_batch_by_indices():
    images = _images(batch=10)
    dataset = TensorImages(images, list(range(10)), [str(i) for i in range(10)])
    batch, labels = dataset.__getitems__([3, 1, 4])
    assert torch.equal(batch, images[[3, 1, 4]]) and labels.tolist() == [3, 1, 4]
    with pytest.raises(ValueError, match="uint8"):
        TensorImages(images.float(), list(range(10)), [])


def test_the_pipeline_is_chosen_from_the_recipe_and_a_forced_tensor_pipeline_says_why_not(tiny_cfg, tmp_path):
    from conftest import write_image_folder

    from toe.config.validate import checked_config
    from toe.train.build import build_run
    from toe.train.distributed import DistInfo

    assert build_run(*checked_config(tiny_cfg()), DistInfo()).pipeline == "tensor"  # digits with the CPU recipe
    assert build_run(*checked_config(tiny_cfg("train.pipeline=pil")), DistInfo()).pipeline == "pil"
    assert build_run(*checked_config(tiny_cfg("recipe.reprob=0.25")), DistInfo()).pipeline == "pil"
    with pytest.raises(ConfigError, match=r"train.pipeline=tensor cannot run this run: recipe.auto_augment=rand-m9"):
        build_run(
            *checked_config(tiny_cfg("train.pipeline=tensor", "recipe.auto_augment=rand-m9-mstd0.5-inc1")), DistInfo()
        )
    root = write_image_folder(tmp_path / "imgs")
    with pytest.raises(ConfigError, match="is read from files"):
        build_run(
            *checked_config(
                tiny_cfg("train.pipeline=tensor", "data=imagefolder", f"data.root={root}", "recipe.batch_size=4")
            ),
            DistInfo(),
        )


def test_both_pipelines_train_the_default_model(tiny_cfg, tmp_path):
    results = {
        pipeline: train(
            tiny_cfg(
                f"train.pipeline={pipeline}",
                "model.kwargs.depth=4",
                "schedule.epochs=5",
                "schedule.stage_starts=[0,1,2]",
            ),
            tmp_path / pipeline,
        )
        for pipeline in ("tensor", "pil")
    }
    # 10 classes: a broken model or pipeline stays near 0.10; five epochs gave 0.29-0.40 over seeds 0-2, both pipelines
    for summary in results.values():
        assert summary.status == "completed" and summary.final_top1 > 0.2


def test_loader_settings_follow_the_pipeline_the_device_and_the_cores(monkeypatch):
    from toe.train import loaders as run

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert run.loader_settings("auto", "tensor", cuda, 1) == {"num_workers": 0, "pin_memory": True}
    assert run.loader_settings("auto", "pil", cpu, 1) == {"num_workers": 0, "pin_memory": False}
    monkeypatch.setattr(run, "available_cores", lambda: 32)
    assert run.loader_settings("auto", "pil", cuda, 4) == {
        "num_workers": 7,
        "pin_memory": True,
        "persistent_workers": True,
        "prefetch_factor": 4,
    }
    assert run.loader_settings("auto", "pil", cuda, 1)["num_workers"] == 16  # capped
    monkeypatch.setattr(run, "available_cores", lambda: 2)
    assert run.loader_settings("auto", "pil", cuda, 8)["num_workers"] == 1  # never none on a GPU
    assert run.loader_settings(3, "tensor", cpu, 1) == {
        "num_workers": 3,
        "pin_memory": False,
        "persistent_workers": True,
        "prefetch_factor": 2,
    }


def test_an_image_folder_trains_on_the_pil_path_with_persistent_workers(tiny_cfg, tmp_path, caplog):
    import logging

    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "imgs")
    with caplog.at_level(logging.INFO):
        summary = train(
            tiny_cfg("data=imagefolder", f"data.root={root}", "recipe.batch_size=4", "train.workers=1"),
            tmp_path / "run",
        )
    assert summary.status == "completed" and summary.epochs == 2
    assert "training images: pil pipeline" in caplog.text
    assert "data loading: 1 worker(s), persistent, prefetch 2" in caplog.text


def test_the_tensor_pipeline_gives_the_default_run_the_images_of_timms_pil_path(monkeypatch):
    """The default run's images (digits, bicubic, the model's normalisation), cropped by the same boxes: the tensor
    pipeline and timm's PIL train transform agree to within a level or two of 8 bits (the bicubic kernels differ)."""
    from conftest import compose_cfg

    import toe.data.augment as augment
    from toe.config.schema import typed_config
    from toe.data.datasets import build_datasets, build_transforms
    from toe.train.build import create_model, model_data_config

    cfg = typed_config(compose_cfg([]))
    train_set, _ = build_datasets(cfg)
    data_config = model_data_config(create_model(cfg, 10), cfg)
    pil_transform = build_transforms(data_config, cfg.recipe)[0]
    crop, to_tensor, normalise = pil_transform.transforms
    assert (crop.scale, crop.ratio) == (tuple(cfg.recipe.scale), (3 / 4, 4 / 3))
    images = augment.uint8_images(train_set)[:128]
    torch.manual_seed(0)
    boxes = random_resized_crop_boxes(128, 32, 32, crop.scale, crop.ratio)
    monkeypatch.setattr(augment, "random_resized_crop_boxes", lambda *args, **kwargs: boxes)
    tensor = BatchAugment(
        32, crop.scale, crop.ratio, 0.0, data_config["interpolation"], data_config["mean"], data_config["std"]
    )(images)
    pil = torch.stack(
        [
            normalise(
                to_tensor(
                    TF.resized_crop(
                        train_set.images[i], *[int(v) for v in boxes[i]], [32, 32], interpolation=crop.interpolation
                    )
                )
            )
            for i in range(128)
        ]
    )
    levels = (tensor - pil).abs() * 255 * data_config["std"][0]
    assert levels.mean() < 1.0 and levels.max() <= 8.0
