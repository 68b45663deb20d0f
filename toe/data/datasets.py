"""Datasets: the embedded digits set, image folders (ImageNet layout) and CIFAR, behind one builder.

Datasets are built without transforms first (so the class count can size the model), and get timm transforms
once the model's data config is known: ``create_model -> resolve_model_data_config -> create_transform``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Sampler


class DataRootError(ValueError):
    """``data.root`` is missing or does not hold the data set it should; the message says what was expected."""


def digits_split(
    train: bool, val_fraction: float = 0.2, split_seed: int = 0
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's ``load_digits`` as uint8 8x8 images ``[1797, 8, 8]``, their digits, and the indices of the
    train (or val) side of the fixed stratified split: the split of ``data=digits`` and of the digits pasted into
    ``data=digits_detection``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, val_idx = train_test_split(
        np.arange(len(pixels)), test_size=val_fraction, random_state=split_seed, stratify=digits.target
    )
    return pixels, digits.target, train_idx if train else val_idx


class DigitsDataset(Dataset):
    """scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits), upscaled to RGB images.

    A fixed stratified split (``val_fraction``, ``split_seed``) gives the same train/val images on every machine.
    """

    def __init__(
        self,
        train: bool,
        img_size: int = 32,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        classes: Optional[Sequence[int]] = None,
    ):
        pixels, targets, chosen = digits_split(train, val_fraction, split_seed)
        # a subset of the digits (the split is that of all ten, so an image is in the same split either way),
        # relabelled 0..K-1 in the order given
        kept = list(range(10)) if classes is None else [int(c) for c in classes]
        label = {digit: index for index, digit in enumerate(kept)}
        chosen = np.array([i for i in chosen if int(targets[i]) in label], dtype=np.int64)
        self.classes = [str(digit) for digit in kept]
        self.images = [
            Image.fromarray(pixels[i]).resize((img_size, img_size), Image.BILINEAR).convert("RGB") for i in chosen
        ]
        self.targets = [label[int(t)] for t in targets[chosen]]
        # <class>/<index in load_digits>: the key of each image's label map for token labeling
        self.names = [f"{targets[i]}/{i:04d}" for i in chosen]
        self.transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


def _require_dir(root: Optional[str], name: str, expect: str) -> Path:
    if not root:
        raise DataRootError(f"data={name} needs data.root=<path> ({expect})")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataRootError(f"data.root={root} does not exist or is not a directory ({expect})")
    return path


def _image_folder(root: Optional[str], name: str, train_split: str, val_split: str) -> Tuple[Dataset, Dataset]:
    from timm.data import create_dataset

    expect = f"an image folder with {train_split}/ and {val_split}/ holding one sub-folder per class"
    path = _require_dir(root, name, expect)
    for split in (train_split, val_split):
        if not (path / split).is_dir():
            raise DataRootError(f"data.root={root} has no {split}/ folder (expected {expect})")
    datasets = []
    for split in (train_split, val_split):
        ds = create_dataset("", root=str(path), split=split, is_training=split == train_split)
        if len(ds) == 0:
            raise DataRootError(f"data.root={root}: no images found under {split}/ (expected {expect})")
        ds.classes = list(ds.reader.class_to_idx)
        if len(ds.classes) < 2:
            which = ds.classes[0] if ds.classes and ds.classes[0] else f"its images lie directly in {split}/"
            raise DataRootError(
                f"data.root={root}: {split}/ holds {len(ds.classes)} class ({which}); expected {expect}, at least two"
            )
        try:
            ds[0]  # decoded once now: a folder of files PIL cannot read is named here, not by a worker's traceback
        except Exception as err:  # noqa: BLE001 - PIL raises several types for a file it cannot decode
            name = ds.filename(0) if hasattr(ds, "filename") else "its first image"
            raise DataRootError(
                f"data.root={root}: {split}/{name} cannot be read as an image "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        datasets.append(ds)
    if datasets[0].classes != datasets[1].classes:
        raise DataRootError(f"data.root={root}: {train_split}/ and {val_split}/ have different class folders")
    return datasets[0], datasets[1]


def _cifar(root: Optional[str], name: str, download: bool) -> Tuple[Dataset, Dataset]:
    from torchvision import datasets as tv

    cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    if download:
        path = Path(root or ".").expanduser()
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = _require_dir(root, name, f"the folder that holds {folder}/, or data.download=true")
        if not (path / folder).is_dir():
            raise DataRootError(f"data.root={root} has no {folder}/ folder (set data.download=true to fetch it)")
    try:
        return cls(str(path), train=True, download=download), cls(str(path), train=False, download=download)
    except RuntimeError as err:  # torchvision's integrity check
        raise DataRootError(f"data.root={root}: {err}") from None


def build_datasets(cfg: Any) -> Tuple[Dataset, Dataset]:
    """Train and val datasets for ``cfg.data`` (no transforms yet); both carry ``classes``."""
    name = cfg.data.name
    if name == "digits":
        kwargs = dict(
            img_size=cfg.model.img_size,
            val_fraction=cfg.data.val_fraction,
            split_seed=cfg.data.split_seed,
            classes=getattr(cfg.data, "classes", None),
        )
        return DigitsDataset(train=True, **kwargs), DigitsDataset(train=False, **kwargs)
    if name in ("imagefolder", "imagenet"):
        return _image_folder(cfg.data.root, name, cfg.data.train_split, cfg.data.val_split)
    if name in ("cifar10", "cifar100"):
        return _cifar(cfg.data.root, name, bool(cfg.data.download))
    if name == "vtab":
        return _vtab(cfg.data.root, cfg.data.task, cfg.data.train_split, cfg.data.val_split)
    raise DataRootError(
        f"unknown data.name={name!r}: expected digits, imagefolder, imagenet, cifar10, cifar100 or vtab"
    )


def _vtab(root: Optional[str], task: Optional[str], train_split: str, val_split: str) -> Tuple[Dataset, Dataset]:
    from toe.data.vtab import VtabError, vtab_task

    path = _require_dir(root, "vtab", "the VTAB-1k folder, one sub-folder per task")
    if not task:
        raise DataRootError("data=vtab needs data.task=<task folder>, e.g. data.task=cifar")
    try:
        return vtab_task(path, task, train_split, val_split)
    except VtabError as err:
        raise DataRootError(str(err)) from None


KNOWN_CLASS_COUNTS = {"digits": 10, "cifar10": 10, "cifar100": 100}


def class_count(cfg: Any) -> int:
    """The classes the run's head will have, without reading the images: ``data.num_classes``, the count of a data
    set toe knows, or the class folders of an image folder's training split (what :func:`build_datasets` finds)."""
    if cfg.data.num_classes:
        return int(cfg.data.num_classes)
    if cfg.data.name == "digits" and getattr(cfg.data, "classes", None) is not None:
        return len(cfg.data.classes)
    if cfg.data.name in KNOWN_CLASS_COUNTS:
        return KNOWN_CLASS_COUNTS[cfg.data.name]
    if cfg.data.name == "vtab":
        from toe.data.vtab import VTAB_TASKS

        if cfg.data.task in VTAB_TASKS:
            return VTAB_TASKS[cfg.data.task]
        train, _ = build_datasets(cfg)
        return len(train.classes)
    folder = _require_dir(cfg.data.root, cfg.data.name, "an image folder") / cfg.data.train_split
    if not folder.is_dir():
        raise DataRootError(f"data.root={cfg.data.root} has no {cfg.data.train_split}/ folder")
    return len([p for p in folder.iterdir() if p.is_dir()])


def build_transforms(data_config: dict, recipe: Any) -> Tuple[Callable, Callable]:
    """timm train/eval transforms from the model's data config and the recipe's augmentation settings."""
    from timm.data import create_transform

    train_interpolation = recipe.train_interpolation or data_config["interpolation"]
    train = create_transform(
        **dict(data_config, interpolation=train_interpolation),
        is_training=True,
        scale=tuple(recipe.scale),
        hflip=recipe.hflip,
        color_jitter=recipe.color_jitter,
        auto_augment=recipe.auto_augment,
        re_prob=recipe.reprob,
        re_mode=recipe.remode,
    )
    eval_config = dict(data_config, crop_pct=recipe.eval_crop_pct or data_config["crop_pct"])
    return train, create_transform(**eval_config, is_training=False)


# --- the random draws of per-image transforms, a function of the run's seed and the sample's place --------------
class SeededSamples(Sampler):
    """A training sampler that yields ``(index, seed)``: the seed of each sample's transform is a function of the
    run's seed, the epoch, the process's rank and the sample's place in the epoch (repeated augmentation's copies
    of one image get their own seeds).

    Why: timm's per-image transforms draw from the RNGs of the process that runs them: a DataLoader worker's,
    seeded from the loader when its iterator starts, or the main process's, which the training step shares. So the
    crops of an epoch depended on the number of workers, on how many loader iterators came before (evaluation
    starts one each time it runs) and, on a resume, on workers that start afresh: a resumed run did not draw what an
    uninterrupted one drew. Seeded per sample, the draws are the same whatever ``train.workers`` and
    ``train.eval_every`` are, and a resume is exact."""

    def __init__(self, sampler: Sampler, seed: int, rank: int = 0):
        self.sampler, self.seed, self.rank, self.epoch = sampler, int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        base = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch, self.rank]).generate_state(1)[0]
        for place, index in enumerate(self.sampler):
            yield int(index), (int(base) << 32) + place


class SeededTransforms(Dataset):
    """``dataset[(index, seed)]``: ``dataset[index]`` with Python's, NumPy's and torch's RNGs seeded by ``seed``
    while its transform runs (timm's transforms draw from all three), and restored after, so that in the main
    process the training step's own draws are untouched. Served by :class:`SeededSamples`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        import random

        import torch

        index, seed = key
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # the CPU generator only: a GPU's stays the training's
        try:
            return self.dataset[index]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
