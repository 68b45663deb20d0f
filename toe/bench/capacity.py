"""``toe-bench capacity``: how many images per second per CPU core the PIL input pipeline delivers, on JPEGs it
writes, and the cores a GPU needs to be fed with full tokens and in ToE stage 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from toe.bench.timing import measure

# Training throughput of DeiT-S on one GPU, the default of --gpu-img-per-s: timm's published benchmark
# (huggingface/pytorch-image-models, results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv:
# deit_small_patch16_224, 1053.64 train samples/s, batch 384, AMP, RTX 3090, PyTorch 1.12).
PUBLISHED_DEIT_S_TRAIN_IMG_PER_S = 1053.64


def write_jpeg_images(folder: Path, count: int, size: int = 224, seed: int = 0) -> List[Path]:
    """``count`` JPEG files of ``size`` px (quality 90) with smooth structure plus noise, so that they decode like
    photographs rather than like flat colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        frequency = rng.uniform(2, 12, 3)
        smooth = np.stack([np.sin(frequency[c] * (xs + ys * (c + 1)) + phase[c]) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * smooth + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"image_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def bench_capacity(
    images: int, gpu_img_per_s: float, stage1_speedup: float, repeats: int, folder: Optional[Path] = None
) -> Dict[str, Any]:
    """Decode + the DeiT recipe's train augmentation (timm's PIL path: RandomResizedCrop 224, flip, RandAugment
    rand-m9-mstd0.5-inc1, random erasing 0.25, normalise) on one CPU core, in img/s, and the cores a GPU needs to
    be fed at ``gpu_img_per_s`` with full tokens and at ``stage1_speedup`` times that in ToE stage 1."""
    import math
    import tempfile
    from importlib.resources import files

    from omegaconf import OmegaConf
    from PIL import Image

    from toe.data.datasets import build_transforms

    recipe = OmegaConf.create((files("toe.conf") / "recipe" / "deit.yaml").read_text())
    data_config = {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    train_transform, _ = build_transforms(data_config, recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: what one DataLoader worker gets
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_jpeg_images(Path(folder or tmp), images)

            def one_pass() -> None:
                for path in paths:
                    with Image.open(path) as image:
                        train_transform(image.convert("RGB"))

            seconds = measure(one_pass, torch.device("cpu"), 1, repeats)["median"]
    finally:
        torch.set_num_threads(threads)
    per_core = images / seconds
    return {
        "img_per_s_per_core": per_core,
        "gpu_img_per_s": gpu_img_per_s,
        "cores_full_tokens": math.ceil(gpu_img_per_s / per_core),
        "stage1_img_per_s": gpu_img_per_s * stage1_speedup,
        "cores_toe_stage1": math.ceil(gpu_img_per_s * stage1_speedup / per_core),
        "stage1_speedup": stage1_speedup,
        "transform": str(train_transform).replace("\n", " "),
    }
