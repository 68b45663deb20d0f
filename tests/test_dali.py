"""The DALI input pipeline (toe.data.dali) on JPEG folders the tests write, on CPU: its batches, its draws against
torchvision's and timm's, its RandAugment ops against timm's, a run that trains and resumes, and bad input."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali", reason='NVIDIA DALI is not installed (pip install "toe[dali]")')

from toe.bench.capacity import write_jpeg_images  # noqa: E402
from toe.data.dali import (  # noqa: E402
    DaliAugment,
    DaliTrainLoader,
    RandAugmentPolicy,
    UndecodableImageError,
    build_graph,
    draw_crops,
    draw_interpolations,
    draw_rand_augment,
    interp_code,
    timm_rand_augment_ops,
)
from toe.data.datasets import SeededSamples  # noqa: E402
from toe.train.loaders import EpochSampler  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEIT = "rand-m9-mstd0.5-inc1"


def _recipe(auto_augment=DEIT, hflip=0.5, scale=(0.08, 1.0)):
    return SimpleNamespace(auto_augment=auto_augment, scale=scale, hflip=hflip, color_jitter=0.3)


def _jpegs(root: Path, per_class=12, size=64):
    samples = []
    for label, name in enumerate(("a", "b")):
        paths = write_jpeg_images(root / "train" / name, per_class, size=size, seed=label)
        samples += [(str(path), label) for path in paths]
    return samples


def _loader(samples, batch=8, seed=0, **recipe):
    augment = DaliAugment.from_recipe(_recipe(**recipe), 48, "bicubic", MEAN, STD)
    sampler = SeededSamples(EpochSampler(samples, seed), seed)
    return DaliTrainLoader(samples, sampler, batch, augment, torch.device("cpu"), threads=1, seed=seed), sampler


def _run_graph(encoded, anchors, sizes, augment, ops=None, bins=None, signs=None, until="normalize", filters=None):
    """One batch through the DALI graph with the draws given (the resize filter: the augmentation's)."""
    count = len(encoded)
    if filters is None:
        filters = [interp_code(augment.interpolation)] * count
    layers = augment.policy.layers if augment.policy else 1
    zeros = np.zeros((count, layers), dtype=np.int32)
    batch = (
        list(encoded),
        [np.array([0], dtype=np.int64)] * count,
        list(np.asarray(anchors, dtype=np.float32)),
        list(np.asarray(sizes, dtype=np.float32)),
        list(np.zeros(count, dtype=np.int32)),
        *(list(np.asarray(zeros if given is None else given, dtype=np.int32)) for given in (ops, bins, signs)),
        list(np.asarray(filters, dtype=np.int32)),
    )
    pipe = build_graph(lambda: batch, augment, count, 1, None, until=until)
    out = pipe.run()[0]
    return [np.array(out[i]) for i in range(count)]


def test_batches_have_the_shape_dtype_and_normalisation_of_timms_pil_path(tmp_path):
    """Crop = the whole image, no flip, no RandAugment: DALI's decode, antialiased bicubic resize and normalisation
    against PIL's (timm's ToTensor + Normalize) on the same JPEG: a fifth of an 8-bit level apart on average."""
    from PIL import Image

    path = write_jpeg_images(tmp_path / "one", 1, size=96)[0]
    augment = DaliAugment.from_recipe(_recipe(auto_augment=None, hflip=0), 48, "bicubic", MEAN, STD)
    out = _run_graph([np.fromfile(path, dtype=np.uint8)], [[0, 0]], [[96, 96]], augment)[0]
    assert out.shape == (3, 48, 48) and out.dtype == np.float32
    with Image.open(path) as image:
        pil = np.asarray(image.convert("RGB").resize((48, 48), Image.BICUBIC), dtype=np.float32) / 255
    expected = ((pil - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
    levels = np.abs(out - expected) * np.array(STD)[:, None, None] * 255
    assert levels.mean() < 0.5 and np.percentile(levels, 99) <= 2.5 and levels.max() <= 5

    samples = _jpegs(tmp_path / "folder")
    loader, sampler = _loader(samples)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 48, 48) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert labels.shape == (8,) and labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    assert len(loader) == len(samples) // 8


def test_train_interpolation_random_draws_one_of_timms_two_filters_per_image_each_close_to_pils(tmp_path):
    """timm's ``random`` (LV-ViT's recipe): bilinear or bicubic per image, uniformly; a fixed filter draws nothing
    (the other draws stay those of a run without it); each filter through DALI within half a level of PIL's."""
    from PIL import Image

    drawn = draw_interpolations(np.random.default_rng(0), "random", 4000)
    assert set(drawn.tolist()) == {interp_code("bilinear"), interp_code("bicubic")}
    assert abs((drawn == interp_code("bicubic")).mean() - 0.5) < 0.03
    rng = np.random.default_rng(0)
    assert (draw_interpolations(rng, "bicubic", 10) == interp_code("bicubic")).all()
    assert rng.random() == np.random.default_rng(0).random()

    path = write_jpeg_images(tmp_path / "one", 1, size=96)[0]
    augment = DaliAugment.from_recipe(_recipe(auto_augment=None, hflip=0), 48, "random", MEAN, STD)
    filters = [interp_code("bilinear"), interp_code("bicubic")]
    out = _run_graph([np.fromfile(path, dtype=np.uint8)] * 2, [[0, 0]] * 2, [[96, 96]] * 2, augment, filters=filters)
    assert np.abs(out[0] - out[1]).max() * 255 * min(STD) > 1  # two images, two filters
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    for dali, pil_filter in zip(out, (Image.BILINEAR, Image.BICUBIC)):
        pil = np.asarray(rgb.resize((48, 48), pil_filter), dtype=np.float32) / 255
        levels = np.abs(dali - ((pil - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1))
        levels *= np.array(STD)[:, None, None] * 255
        assert levels.mean() < 0.5 and np.percentile(levels, 99) <= 2.5, pil_filter


def test_the_same_seed_and_epoch_give_the_same_batches_and_two_copies_of_an_image_get_different_crops(tmp_path):
    samples = _jpegs(tmp_path)
    loader, sampler = _loader(samples)
    sampler.set_epoch(0)
    first = [images.clone() for images, _ in loader]
    sampler.set_epoch(0)  # the same epoch once more (the sampler's shuffle is seeded by set_epoch): the same batches
    again = [images.clone() for images, _ in loader]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
    sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], first[0])
    threaded, threaded_sampler = _loader(samples)
    threaded.threads, threaded.readers = 2, 5  # a batch of 8 read in five parts, two batches ahead
    threaded._start()
    threaded_sampler.set_epoch(0)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, threaded))  # the draws are not the threads'
    from PIL import Image

    for index, (path, _) in enumerate(samples):  # every image's size is kept after its first read
        assert tuple(threaded._sizes[index]) == Image.open(path).size

    same = [samples[0]] * 8  # one image eight times in one batch: eight crops, flips and RandAugment draws
    copies, copies_sampler = _loader(same, auto_augment=None)
    images = next(iter(copies))[0]
    assert len({tuple(image.flatten()[:64].tolist()) for image in images}) == 8


def test_the_crops_follow_torchvisions_random_resized_crop_and_decode_to_their_size(tmp_path):
    """The boxes' area fractions and aspect ratios against torchvision's get_params on a 300 x 400 image, by the
    largest gap between their distribution functions (a two-sample Kolmogorov-Smirnov statistic, 4,000 draws
    each), and DALI decodes each box at its size."""
    from torchvision.transforms import RandomResizedCrop

    count, height, width = 4000, 300, 400
    anchors, sizes = draw_crops(
        np.random.default_rng(0), np.full(count, height), np.full(count, width), (0.08, 1.0), (3 / 4, 4 / 3)
    )
    torch.manual_seed(0)
    boxes = np.array(
        [RandomResizedCrop.get_params(torch.empty(3, height, width), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(count)]
    )

    def ks(a, b):
        grid = np.sort(np.concatenate([a, b]))
        return np.abs(
            np.searchsorted(np.sort(a), grid, "right") / len(a) - np.searchsorted(np.sort(b), grid, "right") / len(b)
        ).max()

    ours_area, ours_ratio = sizes[:, 0] * sizes[:, 1] / (height * width), np.log(sizes[:, 0] / sizes[:, 1])
    theirs_area, theirs_ratio = boxes[:, 2] * boxes[:, 3] / (height * width), np.log(boxes[:, 3] / boxes[:, 2])
    assert ks(ours_area, theirs_area) < 0.04 and ks(ours_ratio, theirs_ratio) < 0.04
    left, top = anchors[:, 0], anchors[:, 1]
    assert (
        (left >= 0).all()
        and (top >= 0).all()
        and (left + sizes[:, 0] <= width).all()
        and (top + sizes[:, 1] <= height).all()
    )
    assert ks(left / np.maximum(width - sizes[:, 0], 1), boxes[:, 1] / np.maximum(width - boxes[:, 3], 1)) < 0.05
    # an image too narrow for every try: torchvision's fallback, the centre crop at the clamped ratio
    anchors, sizes = draw_crops(np.random.default_rng(0), np.array([400]), np.array([40]), (0.9, 1.0), (3 / 4, 4 / 3))
    assert sizes.tolist() == [[40, 53]] and anchors.tolist() == [[0, 173]]

    path = write_jpeg_images(tmp_path, 1, size=96)[0]
    augment = DaliAugment.from_recipe(_recipe(auto_augment=None, hflip=0), 48, "bicubic", MEAN, STD)
    decoded = _run_graph(
        [np.fromfile(path, dtype=np.uint8)] * 2, [[0, 0], [30, 10]], [[96, 96], [50, 70]], augment, until="decode"
    )
    assert [image.shape for image in decoded] == [(96, 96, 3), (70, 50, 3)]


def test_rand_augment_draws_follow_timms_policy():
    policy = RandAugmentPolicy.parse(DEIT)
    assert (policy.layers, policy.magnitude, policy.magnitude_std, policy.increasing, policy.prob) == (
        2,
        9,
        0.5,
        True,
        0.5,
    )
    ops, bins, signs = draw_rand_augment(np.random.default_rng(0), policy, 20000)
    assert ops.shape == bins.shape == signs.shape == (20000, 2)
    assert abs((ops == 15).mean() - 0.5) < 0.01  # each layer skipped with probability 1 - p
    counts = np.bincount(ops[ops < 15], minlength=15) / (ops < 15).sum()
    assert np.abs(counts - 1 / 15).max() < 0.01  # the 15 ops drawn uniformly
    assert abs(bins.mean() - 89.9) < 0.3 and abs(bins.std() - 5.0) < 0.2 and bins.max() == 100  # N(9, 0.5), in tenths
    assert abs(signs.mean() - 0.5) < 0.01
    with pytest.raises(ValueError, match="transform set"):
        RandAugmentPolicy.parse("rand-m9-tweights")
    with pytest.raises(ValueError, match="not RandAugment"):
        RandAugmentPolicy.parse("original")


def test_the_op_set_is_timms_and_its_point_ops_give_timms_pixels(tmp_path, monkeypatch):
    """timm's 15 increasing ops; each pixel-wise op at a magnitude (with its sign +) through DALI against timm's
    AugmentOp on PIL at the same magnitude."""
    import random

    from PIL import Image
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, AugmentOp

    policy = RandAugmentPolicy.parse(DEIT)
    names = [op.name for op in timm_rand_augment_ops(policy)]
    dali_names = {
        "AutoContrast": "auto_contrast",
        "Equalize": "equalize",
        "Invert": "invert",
        "Rotate": "rotate",
        "PosterizeIncreasing": "posterize",
        "SolarizeIncreasing": "solarize",
        "SolarizeAdd": "solarize_add",
        "ColorIncreasing": "color",
        "ContrastIncreasing": "contrast",
        "BrightnessIncreasing": "brightness",
        "SharpnessIncreasing": "sharpness",
        "ShearX": "shear_x",
        "ShearY": "shear_y",
        "TranslateXRel": "translate_x",
        "TranslateYRel": "translate_y",
    }
    assert sorted(names[:-1]) == sorted(dali_names[name] for name in _RAND_INCREASING_TRANSFORMS)
    assert names[-1] == "identity" and len(names) == 16

    path = write_jpeg_images(tmp_path, 1, size=48)[0]
    with Image.open(path) as image:
        pil = image.convert("RGB")
    augment = DaliAugment.from_recipe(_recipe(hflip=0), 48, "bicubic", MEAN, STD)
    monkeypatch.setattr(random, "random", lambda: 0.0)  # timm's _randomly_negate keeps the sign
    encoded = np.fromfile(path, dtype=np.uint8)
    base = _run_graph([encoded], [[0, 0]], [[48, 48]], augment, ops=np.full((1, 2), 15))[0]
    for name, level, tolerance in (
        ("Invert", 9.0, 0),
        ("PosterizeIncreasing", 9.4, 0),
        ("SolarizeIncreasing", 6.3, 0),
        ("SolarizeAdd", 8.0, 0),
        ("BrightnessIncreasing", 4.0, 1),
        ("AutoContrast", 9.0, 1),
    ):
        op = np.array([[names.index(dali_names[name]), 15]])
        bins = np.array([[int(round(level * 10)), 0]])
        out = _run_graph([encoded], [[0, 0]], [[48, 48]], augment, ops=op, bins=bins)[0]
        timm_op = AugmentOp(name, prob=1.0, magnitude=level, hparams={"magnitude_std": 0})
        expected = np.asarray(timm_op(pil), dtype=np.float32)
        # back to 8-bit levels: the graph normalises; the resize of a 48 px crop to 48 px is the image itself
        got = out.transpose(1, 2, 0) * np.array(STD) * 255 + np.array(MEAN) * 255
        reference = base.transpose(1, 2, 0) * np.array(STD) * 255 + np.array(MEAN) * 255
        assert np.abs(reference - np.asarray(pil, dtype=np.float32)).max() < 1.5, "the decoded image is PIL's"
        assert np.abs(got - expected).max() <= tolerance + 0.01, name  # + the normalisation's float rounding


def test_a_dali_run_trains_resumes_as_the_uninterrupted_run_and_logs_its_pipeline(tiny_cfg, tmp_path, caplog):
    import logging

    from conftest import interrupt_after_first_checkpoint

    from toe.train.task import Terminated, train

    root = tmp_path / "jpegs"
    for split, count in (("train", 24), ("val", 8)):
        for label, name in enumerate(("a", "b")):
            write_jpeg_images(root / split / name, count, size=48, seed=10 * label + (split == "val"))
    run = (
        "data=imagefolder",
        f"data.root={root}",
        "train.pipeline=dali",
        "recipe.batch_size=8",
        f"recipe.auto_augment={DEIT}",
        "recipe.reprob=0.25",
        "recipe.hflip=0.5",
        "schedule.epochs=4",
        "schedule.length=4",
    )
    with caplog.at_level(logging.INFO):
        straight = train(tiny_cfg(*run), tmp_path / "straight")
    assert straight.status == "completed" and straight.epochs == 4
    assert "training images: dali pipeline (train.pipeline=dali): DALI, decoding on 1 CPU thread(s)" in caplog.text
    assert f"RandAugment {DEIT}" in caplog.text and "RandomErasing(p=0.25" in caplog.text

    resumed_dir = tmp_path / "resumed"
    watcher = interrupt_after_first_checkpoint(resumed_dir)
    with pytest.raises(Terminated):
        train(tiny_cfg(*run), resumed_dir)
    watcher.join()
    resumed = train(tiny_cfg(*run, "train.workers=2"), resumed_dir)  # two DALI threads: the same draws
    assert resumed.status == "completed" and len(resumed.resumed_at) == 1 and resumed.config_changes == []

    def losses(run_dir):
        return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "straight") == losses(resumed_dir)
    assert straight.final_top1 == resumed.final_top1


def test_bad_files_are_skipped_or_named_and_a_recipe_dali_cannot_run_is_refused(tiny_cfg, tmp_path, caplog):
    import logging

    from toe.config.schema import ConfigError
    from toe.config.validate import validate

    samples = _jpegs(tmp_path / "folder", per_class=8)
    gif = tmp_path / "folder" / "train" / "a" / "animated.gif"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(gif)
    text = tmp_path / "folder" / "train" / "a" / "notes.jpg"
    text.write_text("not an image")
    skipping = [(str(gif), 0), (str(text), 0)] + samples
    loader, _ = _loader(skipping, batch=18)
    with caplog.at_level(logging.WARNING):
        images, labels = next(iter(loader))
    assert images.shape[0] == 18
    assert f"skipped {gif}" in caplog.text and f"skipped {text}" in caplog.text and "train.pipeline=pil" in caplog.text

    broken = tmp_path / "folder" / "train" / "b" / "broken.jpg"
    data = Path(samples[0][0]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # a JPEG cut off: its header reads, its scan does not decode
    loader, _ = _loader([(str(broken), 1)] + samples[:7], batch=8)
    with pytest.raises(UndecodableImageError, match=rf"{broken} cannot be decoded .*train.pipeline=pil"):
        list(loader)

    with pytest.raises(
        ConfigError,
        match=r"train.pipeline=dali cannot run this run: data=digits is not an image folder.*train.pipeline=pil",
    ):
        validate(tiny_cfg("train.pipeline=dali"))
    root = tmp_path / "folder"
    (root / "val").mkdir()
    with pytest.raises(ConfigError, match=r"recipe.auto_augment='original'|auto_augment='original' is not RandAugment"):
        validate(
            tiny_cfg("data=imagefolder", f"data.root={root}", "train.pipeline=dali", "recipe.auto_augment=original")
        )
    with pytest.raises(ConfigError, match=r"curriculum.auto_augment: auto_augment='augmix-m1' is not RandAugment"):
        validate(  # the curriculum's policy replaces the recipe's: it is the one checked
            tiny_cfg(
                "data=imagefolder",
                f"data.root={root}",
                "train.pipeline=dali",
                "method=efficienttrain",
                "curriculum.auto_augment='augmix-m{magnitude}'",
                "schedule.epochs=10",
                "schedule.length=10",
            )
        )


def test_a_curriculum_phase_changes_the_draws_magnitude_in_the_same_graph_and_its_micro_batch_in_a_new_one(tmp_path):
    samples = _jpegs(tmp_path)
    loader, sampler = _loader(samples, batch=8, auto_augment="rand-m1-mstd0.5-inc1")
    sampler.set_epoch(0)

    def bins_drawn():
        return np.concatenate([batch[6] for batch in loader._batches([])])  # (..., ops, bins, signs)

    graph = loader._pipe
    low = bins_drawn()
    loader.reconfigure(8, loader.augment.with_policy("rand-m9-mstd0.5-inc1"))
    assert loader._pipe is graph  # a magnitude is the draws' only
    high = bins_drawn()
    assert abs(low.mean() - 10) < 3 and abs(high.mean() - 90) < 3  # bins of 0.1: m1 and m9 with mstd 0.5
    images = [batch for batch, _ in loader]
    assert len(images) == 3 and images[0].shape == (8, 3, 48, 48)

    loader.reconfigure(4, loader.augment)  # the last phase's two micro-batches per step
    assert loader._pipe is not graph
    halves = [batch for batch, _ in loader]
    assert len(halves) == len(loader) == 6 and all(batch.shape == (4, 3, 48, 48) for batch in halves)
    loader.reconfigure(4, loader.augment.with_policy("rand-n1-m9-mstd0.5-inc1"))  # one layer: another graph
    assert next(iter(loader))[0].shape == (4, 3, 48, 48)


def test_the_efficienttrain_curriculum_trains_on_dali_through_its_phases(tiny_cfg, tmp_path, caplog):
    """method=efficienttrain_toe on a JPEG folder through train.pipeline=dali: five one-epoch phases, each
    logged with its resolution and magnitude, the last with two micro-batches per step; the run completes."""
    import logging

    from toe.train.task import train

    root = tmp_path / "jpegs"
    for split, count in (("train", 16), ("val", 4)):
        for label, name in enumerate(("a", "b")):
            write_jpeg_images(root / split / name, count, size=48, seed=10 * label + (split == "val"))
    cfg = tiny_cfg(
        "data=imagefolder",
        f"data.root={root}",
        "train.pipeline=dali",
        "method=efficienttrain_toe",
        "recipe.batch_size=8",
        "schedule.epochs=5",
        "schedule.length=5",
    )
    with caplog.at_level(logging.INFO):
        result = train(cfg, tmp_path / "run")
    assert result.status == "completed" and result.epochs == 5
    assert "training images: dali pipeline (train.pipeline=dali)" in caplog.text
    assert "RandAugment rand-m1-mstd0.5-inc1" in caplog.text  # the graph is built for the first phase's policy
    for magnitude in (1, 3, 5, 7):
        assert f"RandAugment m{magnitude}, 1 micro-batches of 8 per step" in caplog.text
    assert "RandAugment m9, 2 micro-batches of 4 per step" in caplog.text
    assert caplog.text.count("DALI graph rebuilt for batches of 4") == 1  # only where the micro-batch changes
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sizes = [m["img_size"] for m in metrics]
    assert sizes[0] < sizes[-1] and all(np.isfinite(m["train_loss"]) for m in metrics)


def test_the_run_samplers_shard_and_repeat_the_images_dali_reads(tmp_path):
    """DDP's sharding and repeated augmentation are the run's samplers' (as on the PIL path): two ranks of a
    DistributedSampler read disjoint halves, timm's RepeatAugSampler gives each image to three ranks."""
    from timm.data.distributed_sampler import RepeatAugSampler
    from torch.utils.data import DistributedSampler

    samples = _jpegs(tmp_path, per_class=12)
    augment = DaliAugment.from_recipe(_recipe(), 48, "bicubic", MEAN, STD)

    def paths_read(sampler, rank):
        loader = DaliTrainLoader(samples, SeededSamples(sampler, 0, rank), 4, augment, torch.device("cpu"), 1, 0, rank)
        fed = []
        list(loader._batches(fed))
        return [path for batch in fed for path in batch]

    halves = [paths_read(DistributedSampler(samples, 2, rank, seed=0, drop_last=True), rank) for rank in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 12 and not set(halves[0]) & set(halves[1])
    assert set(halves[0]) | set(halves[1]) == {path for path, _ in samples}
    repeated = [
        paths_read(RepeatAugSampler(samples, num_replicas=3, rank=rank, shuffle=True), rank) for rank in range(3)
    ]
    counts = {}
    for rank_paths in repeated:
        for path in rank_paths:
            counts[path] = counts.get(path, 0) + 1
    # every image read is read thrice, once per rank (timm's sampler then keeps a third of the epoch: its
    # selected_round)
    assert set(counts.values()) == {3} and all(len(set(paths)) == len(paths) for paths in repeated)


def test_auto_takes_dali_for_an_image_folder_on_cuda_and_pil_on_the_cpu(tiny_cfg, tmp_path):
    from conftest import write_image_folder

    from toe.config.schema import typed_config
    from toe.train.loaders import choose_pipeline

    root = write_image_folder(tmp_path)
    cfg = typed_config(tiny_cfg("data=imagefolder", f"data.root={root}", "recipe=deit", "model.img_size=32"))
    plan = SimpleNamespace(phases=[])
    assert choose_pipeline(cfg, False, "bicubic", plan, torch.device("cuda")) == "dali"
    assert choose_pipeline(cfg, False, "bicubic", plan, torch.device("cpu")) == "pil"
    assert choose_pipeline(typed_config(tiny_cfg()), True, "bicubic", plan, torch.device("cuda")) == "tensor"
    lvvit = typed_config(tiny_cfg("data=imagefolder", f"data.root={root}", "recipe=lvvit", "model.img_size=32"))
    assert choose_pipeline(lvvit, False, "random", plan, torch.device("cuda")) == "dali"  # a filter per image
    augmix = typed_config(tiny_cfg("data=imagefolder", f"data.root={root}", "recipe.auto_augment=augmix-m5"))
    assert choose_pipeline(augmix, False, "bicubic", plan, torch.device("cuda")) == "pil"  # a recipe DALI cannot run
