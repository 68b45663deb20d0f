"""Detection data: COCO in its usual layout, and an embedded digits-detection set that toe builds itself.

Both are read through pycocotools' ``COCO`` (the annotation file's index and, for evaluation, ``COCOeval``), so the
embedded set is a COCO data set in every way but where its images live (in memory). A sample is a PIL image and
DETR's target: ``boxes`` ``[K, 4]`` (cx, cy, w, h as fractions of the transformed image), ``labels`` (category
ids), ``image_id`` and ``orig_size`` (height, width), crowd annotations left out as DETR's ``ConvertCocoPolysToMask``
leaves them.

Transforms are torchvision's ``transforms.v2``, which move the boxes with the image: DETR's (and YOLOS's) training
recipe is a random flip, then one of a random shortest-side resize or a resize, a random-size crop and another
resize; evaluation resizes the shortest side to ``eval_size``. Batches are padded at the bottom and right to the
largest image (DETR's ``nested_tensor_from_tensor_list``; YOLOS ignores the padding mask).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from toe.data.datasets import DataRootError, digits_split

# YOLOS's training scales: the shortest side is drawn from these (datasets/coco.py of hustvl/YOLOS and ToE/YOLOS)
YOLOS_TINY_SCALES = tuple(range(256, 609, 16))
YOLOS_SCALES = tuple(range(480, 801, 16))


class AnnotationError(DataRootError):
    """A detection annotation file that is missing, malformed or does not fit its images; the message names it."""


def _coco_api(dataset: Dict[str, Any], source: str):
    """pycocotools' ``COCO`` index of an annotation dict, quietly (it prints its progress)."""
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            api.createIndex()
        except (KeyError, TypeError) as err:
            raise AnnotationError(f"{source}: not a COCO annotation file ({type(err).__name__}: {err})") from None
    return api


def check_annotations(dataset: Any, source: str) -> None:
    """One line naming ``source`` and the problem, for what would otherwise fail deep inside training."""
    if not isinstance(dataset, dict) or not all(key in dataset for key in ("images", "annotations", "categories")):
        raise AnnotationError(f"{source}: not a COCO annotation file (needs images, annotations and categories)")
    sizes = {}
    for image in dataset["images"]:
        missing = [key for key in ("id", "file_name", "width", "height") if key not in image]
        if missing:
            raise AnnotationError(f"{source}: image entry {image.get('id', image)} has no {', '.join(missing)}")
        sizes[image["id"]] = (image["width"], image["height"])
    categories = {c["id"] for c in dataset["categories"]}
    for ann in dataset["annotations"]:
        if ann.get("image_id") not in sizes:
            raise AnnotationError(f"{source}: annotation {ann.get('id')} names image {ann.get('image_id')}, not listed")
        if ann.get("category_id") not in categories:
            raise AnnotationError(
                f"{source}: annotation {ann.get('id')} has category {ann.get('category_id')}, not among the categories"
            )
        box = ann.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise AnnotationError(f"{source}: annotation {ann.get('id')} has no [x, y, w, h] bbox")
        x, y, w, h = box
        width, height = sizes[ann["image_id"]]
        if w < 0 or h < 0 or x < -0.5 or y < -0.5 or x + w > width + 0.5 or y + h > height + 0.5:
            raise AnnotationError(
                f"{source}: annotation {ann.get('id')} box {list(box)} lies outside its image "
                f"{ann['image_id']} ({width}x{height})"
            )


class CocoDetectionSet(Dataset):
    """Images and DETR targets from a COCO annotation index; images from ``folder`` or, for the embedded set,
    from ``images`` (a dict of PIL images by image id)."""

    def __init__(self, api: Any, folder: Optional[Path] = None, images: Optional[Dict[int, Image.Image]] = None):
        self.coco = api
        self.folder, self.images = folder, images
        self.ids = sorted(api.imgs)
        self.transform: Any = None
        self.categories = sorted(api.cats)

    @property
    def num_classes(self) -> int:
        """DETR's count: the largest category id + 1 (COCO: 91)."""
        return max(self.categories) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        if self.images is not None:
            return self.images[image_id]
        return Image.open(self.folder / self.coco.imgs[image_id]["file_name"]).convert("RGB")

    def raw(self, index: int) -> Tuple[Image.Image, Dict[str, torch.Tensor]]:
        """The image and its boxes in pixels ``(x0, y0, x1, y1)``, before any transform."""
        image_id = self.ids[index]
        image = self.load_image(image_id)
        width, height = image.size
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.long)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": torch.tensor(image_id),
            "orig_size": torch.tensor([height, width]),
        }
        return image, target

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image, target = self.raw(index)
        return self.transform(image, target) if self.transform is not None else (image, target)


def coco_sets(root: Optional[str], train_split: str = "train2017", val_split: str = "val2017"):
    """COCO in its usual layout: ``<root>/<split>/`` images, ``<root>/annotations/instances_<split>.json``."""
    if not root:
        raise DataRootError("data=coco needs data.root=<path> (train2017/, val2017/, annotations/instances_*.json)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataRootError(f"data.root={root} does not exist or is not a directory")
    sets = []
    for split in (train_split, val_split):
        folder, ann_file = path / split, path / "annotations" / f"instances_{split}.json"
        if not folder.is_dir():
            raise DataRootError(f"data.root={root} has no {split}/ folder of images")
        if not ann_file.is_file():
            raise AnnotationError(f"{ann_file}: annotation file not found")
        try:
            dataset = json.loads(ann_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AnnotationError(f"{ann_file}: not valid JSON ({err})") from None
        check_annotations(dataset, str(ann_file))
        missing = [im["file_name"] for im in dataset["images"] if not (folder / im["file_name"]).is_file()]
        if missing:
            raise AnnotationError(
                f"{ann_file}: {len(missing)} listed image(s) not in {folder} (the first: {missing[0]})"
            )
        sets.append(CocoDetectionSet(_coco_api(dataset, str(ann_file)), folder=folder))
    if sets[0].categories != sets[1].categories:
        raise AnnotationError(f"data.root={root}: {train_split} and {val_split} list different categories")
    return sets[0], sets[1]


# --- the embedded digits-detection set ---------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsDetection:
    """How the embedded set is drawn: ``canvas`` px square images, each with ``min_digits``..``max_digits`` of
    scikit-learn's handwritten digits pasted at random places (not overlapping) and sizes (``digit_sizes`` px), the
    digits of the train images from the digits' train split and those of the val images from its val split (the
    classification split of ``data=digits``, so that a backbone trained there has seen none of the val digits)."""

    train_images: int = 1000
    val_images: int = 200
    canvas: int = 64
    min_digits: int = 1
    max_digits: int = 3
    digit_sizes: Tuple[int, int] = (16, 32)
    seed: int = 0


def _digit_pixels(train: bool) -> Tuple[np.ndarray, np.ndarray]:
    pixels, targets, chosen = digits_split(train)  # data=digits's own split (its defaults: 0.2, seed 0)
    return pixels[chosen], targets[chosen]


def draw_digits_detection(spec: DigitsDetection, train: bool) -> Tuple[Dict[str, Any], Dict[int, Image.Image]]:
    """A COCO annotation dict and its images (by id): digit ``d`` is category ``d + 1``, named ``"d"``; each box is
    the tight box of the pasted digit's ink."""
    pixels, labels = _digit_pixels(train)
    rng = random.Random(spec.seed * 2 + (0 if train else 1))
    count = spec.train_images if train else spec.val_images
    images, entries, annotations = {}, [], []
    for image_id in range(1, count + 1):
        canvas = np.zeros((spec.canvas, spec.canvas), dtype=np.uint8)
        boxes: List[Tuple[int, int, int, int]] = []
        for _ in range(rng.randint(spec.min_digits, spec.max_digits)):
            for _attempt in range(20):  # a free place, else fewer digits on this image
                size = rng.randint(*spec.digit_sizes)
                x, y = rng.randint(0, spec.canvas - size), rng.randint(0, spec.canvas - size)
                if all(x + size <= bx or bx + bw <= x or y + size <= by or by + bh <= y for bx, by, bw, bh in boxes):
                    break
            else:
                continue
            which = rng.randrange(len(pixels))
            digit = np.asarray(Image.fromarray(pixels[which]).resize((size, size), Image.BILINEAR))
            canvas[y : y + size, x : x + size] = np.maximum(canvas[y : y + size, x : x + size], digit)
            rows, cols = np.nonzero(digit > 32)
            box = (
                x + int(cols.min()),
                y + int(rows.min()),
                int(cols.max() - cols.min() + 1),
                int(rows.max() - rows.min() + 1),
            )
            boxes.append((x, y, size, size))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(labels[which]) + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
        images[image_id] = Image.fromarray(canvas).convert("RGB")
        entries.append(
            {"id": image_id, "file_name": f"{image_id:06d}.png", "width": spec.canvas, "height": spec.canvas}
        )
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]
    return {"images": entries, "annotations": annotations, "categories": categories}, images


def digits_detection_sets(spec: DigitsDetection = DigitsDetection()) -> Tuple[CocoDetectionSet, CocoDetectionSet]:
    sets = []
    for train in (True, False):
        dataset, images = draw_digits_detection(spec, train)
        sets.append(CocoDetectionSet(_coco_api(dataset, "digits_detection"), images=images))
    return sets[0], sets[1]


def write_coco_folder(root: Path, split: str, dataset: Dict[str, Any], images: Dict[int, Image.Image]) -> Path:
    """Write a COCO-layout split (``<root>/<split>/`` images, ``<root>/annotations/instances_<split>.json``)."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    names = {entry["id"]: entry["file_name"] for entry in dataset["images"]}
    for image_id, image in images.items():
        image.save(root / split / names[image_id])
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(dataset))
    return path


# --- transforms and batches --------------------------------------------------------------------------------


class RandomSizeCrop:
    """DETR's ``RandomSizeCrop(min_size, max_size)``: a crop of a random width and height in
    ``[min_size, min(side, max_size)]`` at a random place; torchvision's v2 has no crop of a random size in pixels.
    The boxes are cut to the crop (and dropped when nothing is left) by v2's ``SanitizeBoundingBoxes`` after it."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target):
        from torchvision.transforms import v2

        height, width = v2.functional.get_size(image)
        w = random.randint(min(self.min_size, width), min(width, self.max_size))
        h = random.randint(min(self.min_size, height), min(height, self.max_size))
        top, left = random.randint(0, height - h), random.randint(0, width - w)
        image = v2.functional.crop(image, top, left, h, w)
        target = dict(target, boxes=v2.functional.crop(target["boxes"], top, left, h, w))
        return image, target


class DetectionTransform:
    """A v2 pipeline on ``(PIL image, target)``, returning the normalised image tensor and DETR's target."""

    def __init__(self, steps: Sequence[Any], mean: Sequence[float], std: Sequence[float]):
        from torchvision.transforms import v2

        self.steps = v2.Compose(
            [
                *steps,
                v2.ClampBoundingBoxes(),
                v2.SanitizeBoundingBoxes(),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(mean), list(std)),
            ]
        )

    def __call__(self, image: Image.Image, target: Dict[str, torch.Tensor]):
        from torchvision import tv_tensors
        from torchvision.ops import box_convert

        width, height = image.size
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
        image, target = self.steps(image, dict(target, boxes=boxes))
        out_h, out_w = image.shape[-2:]
        scale = torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32)
        target = dict(target, boxes=box_convert(target["boxes"].as_subclass(torch.Tensor), "xyxy", "cxcywh") / scale)
        target["size"] = torch.tensor([out_h, out_w])
        return image, target

    def __repr__(self) -> str:
        return " -> ".join(_describe(step) for step in self.steps.transforms)


def _describe(step: Any) -> str:
    """A transform in a few words, for the run's log line."""
    inner = getattr(step, "transforms", None)
    if inner is not None:
        joined = " | ".join(_describe(t) for t in inner)
        return f"one of ({joined})" if type(step).__name__ == "RandomChoice" else f"({joined})"
    if isinstance(step, RandomSizeCrop):
        return f"random-size crop {step.min_size}-{step.max_size} px"
    if hasattr(step, "min_size") and hasattr(step, "max_size"):
        sizes = list(step.min_size)
        shown = sizes if len(sizes) <= 4 else f"[{sizes[0]}..{sizes[-1]}]"
        return f"shortest side {shown} (longest <= {step.max_size})"
    return type(step).__name__


def detection_transforms(
    scales: Sequence[int],
    max_size: int,
    eval_size: int,
    hflip: float,
    crop: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> Tuple[DetectionTransform, DetectionTransform]:
    """DETR's train and eval transforms (YOLOS's ``make_coco_transforms``): shortest side drawn from ``scales``,
    longest at most ``max_size``; with ``crop``, half the time a resize to 400/500/600, a random crop of 384-600 px
    and the resize; evaluation at ``eval_size`` (longest side at most ``eval_size * 1333 // 800``)."""
    from torchvision.transforms import v2

    resize = v2.RandomShortestSize(list(scales), max_size=max_size)
    steps: List[Any] = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    if crop:
        cropped = v2.Compose([v2.RandomShortestSize([400, 500, 600]), RandomSizeCrop(384, 600), resize])
        steps.append(v2.RandomChoice([resize, cropped]))
    else:
        steps.append(resize)
    evaluation = [v2.RandomShortestSize([eval_size], max_size=eval_size * 1333 // 800)]
    return DetectionTransform(steps, mean, std), DetectionTransform(evaluation, mean, std)


def collate_detection(batch):
    """Images padded with zeros at the bottom and right to the batch's largest, ``[B, 3, H, W]``, and the list of
    targets (DETR's ``collate_fn`` and nested tensor, without the mask YOLOS does not read)."""
    images, targets = zip(*batch)
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    out = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for slot, image in zip(out, images):
        slot[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    return out, list(targets)
