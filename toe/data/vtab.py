"""VTAB-1k (Zhai et al., 2019) task folders, as visual prompt tuning evaluates on them.

VPT's own code reads VTAB through TensorFlow Datasets (``src/data/datasets/tf_dataset.py``: the ``train800``,
``val200``, ``train800val200`` and ``test`` splits of each task). The prepared folders that the parameter-efficient
tuning codes after it share (NOAH's ``vtab-1k`` release, read the same way by FacT, SPT and others) hold those splits
as list files, one per split, beside the images::

    <data.root>/<task>/train800.txt          lines "<image path relative to the task folder> <label>"
    <data.root>/<task>/val200.txt
    <data.root>/<task>/train800val200.txt
    <data.root>/<task>/test.txt
    <data.root>/<task>/images/...

VPT's protocol: learning rate and weight decay chosen on ``train800`` / ``val200``, the reported run trained on
``train800val200`` and evaluated on ``test`` (``tune_vtab.py``); ``data.train_split`` and ``data.val_split`` name the
pair. A task's class count is VTAB's (a 1,000-image training split need not hold every class of sun397).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from PIL import Image
from torch.utils.data import Dataset

# VTAB-1k's 19 tasks by group, with their class counts (the folder names of the NOAH release)
VTAB_GROUPS: Dict[str, Dict[str, int]] = {
    "natural": {
        "caltech101": 102,
        "cifar": 100,
        "dtd": 47,
        "oxford_flowers102": 102,
        "oxford_iiit_pet": 37,
        "svhn": 10,
        "sun397": 397,
    },
    "specialized": {"patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5},
    "structured": {
        "clevr_count": 8,
        "clevr_dist": 6,
        "dmlab": 6,
        "kitti": 4,
        "dsprites_loc": 16,
        "dsprites_ori": 16,
        "smallnorb_azi": 18,
        "smallnorb_ele": 9,
    },
}
VTAB_TASKS: Dict[str, int] = {task: n for group in VTAB_GROUPS.values() for task, n in group.items()}
TASK_GROUP: Dict[str, str] = {task: group for group, tasks in VTAB_GROUPS.items() for task in tasks}


class VtabError(ValueError):
    """A VTAB-1k task folder or list file that cannot be read as one; the message names the file and the problem."""


class ListFileImages(Dataset):
    """The images and labels of one list file of a task folder; decoded to RGB when indexed."""

    def __init__(self, folder: Path, samples: List[Tuple[Path, int]], num_classes: int):
        self.folder, self.samples = folder, samples
        self.targets = [label for _, label in samples]
        self.classes = [str(i) for i in range(num_classes)]
        self.transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), label

    def filename(self, index: int) -> str:
        return str(self.samples[index][0].relative_to(self.folder))


def read_list_file(folder: Path, split: str, num_classes: Optional[int]) -> List[Tuple[Path, int]]:
    """``(image path, label)`` of every line of ``<folder>/<split>.txt``; one line names what is wrong (a missing
    file, a line that is not "<path> <label>", a label out of range, an image that is not there)."""
    list_file = folder / f"{split}.txt"
    if not list_file.is_file():
        raise VtabError(f"{list_file}: no such list file (a VTAB-1k task folder has {split}.txt beside its images)")
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise VtabError(f"{list_file}, line {number}: expected '<image path> <label>', got {line.strip()!r}")
        path, label = folder / parts[0], int(parts[1])
        if label < 0 or (num_classes is not None and label >= num_classes):
            raise VtabError(
                f"{list_file}, line {number}: label {label} is outside 0..{(num_classes or 1) - 1}, the task's classes"
            )
        if not path.is_file():
            raise VtabError(f"{list_file}, line {number}: {parts[0]} is not a file in {folder}")
        samples.append((path, label))
    if not samples:
        raise VtabError(f"{list_file}: no images listed")
    return samples


def vtab_task(root: Path, task: str, train_split: str, val_split: str) -> Tuple[ListFileImages, ListFileImages]:
    """The train and val datasets of VTAB-1k task ``task`` under ``root`` (``train_split``.txt, ``val_split``.txt)."""
    folder = root / task
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) if root.is_dir() else ""
        raise VtabError(f"{folder}: no such task folder" + (f" (found: {known})" if known else ""))
    known_classes = VTAB_TASKS.get(task)
    splits = [read_list_file(folder, split, known_classes) for split in (train_split, val_split)]
    num_classes = known_classes or 1 + max(label for samples in splits for _, label in samples)
    return ListFileImages(folder, splits[0], num_classes), ListFileImages(folder, splits[1], num_classes)
