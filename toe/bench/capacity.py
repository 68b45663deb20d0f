"""``toe-bench capacity``: how many images per second per CPU core each input pipeline for image folders (timm's
PIL path, DALI with decoding on the CPU or the GPU) delivers, on JPEGs it writes at two sizes, and the cores a GPU
needs to be fed with full tokens and in ToE stage 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

# Training throughput of DeiT-S on one GPU, the default of --gpu-img-per-s: timm's published benchmark
# (huggingface/pytorch-image-models, results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv:
# deit_small_patch16_224, 1053.64 train samples/s, batch 384, AMP, RTX 3090, PyTorch 1.12).
PUBLISHED_DEIT_S_TRAIN_IMG_PER_S = 1053.64


def write_jpeg_images(folder: Path, count: int, size: Any = 224, seed: int = 0) -> List[Path]:
    """``count`` JPEG files of ``size`` px (an int: square; or ``(width, height)``; quality 90) with smooth
    structure plus noise, so that they decode like photographs rather than like flat colour."""
    import numpy as np
    from PIL import Image

    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        frequency = rng.uniform(2, 12, 3)
        smooth = np.stack([np.sin(frequency[c] * (xs + ys * (c + 1)) + phase[c]) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * smooth + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        path = folder / f"image_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


# The JPEG sizes timed: the 224 px of a resized set, and about ImageNet's average (its training JPEGs are about
# 400 x 350 px, 110 kB)
SIZES = ((224, 224), (400, 350))
PIPELINES = ("pil", "dali")


def _deit_recipe():
    from importlib.resources import files

    from omegaconf import OmegaConf

    return OmegaConf.create((files("toe.conf") / "recipe" / "deit.yaml").read_text())


DEIT_DATA = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def _cpu_seconds(one_pass: Callable[[], Any], repeats: int, device: Optional[torch.device] = None) -> float:
    """The median CPU time (of every thread of this process) of ``one_pass``, after one pass to warm up."""
    import statistics
    import time

    def run() -> float:
        start = time.process_time()
        one_pass()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.process_time() - start

    run()
    return statistics.median(run() for _ in range(repeats))


def _pil_seconds(paths: List[Path], repeats: int) -> Tuple[float, str]:
    from PIL import Image

    from toe.data.datasets import build_transforms

    train_transform, _ = build_transforms(DEIT_DATA, _deit_recipe())

    def one_pass() -> None:
        for path in paths:
            with Image.open(path) as image:
                train_transform(image.convert("RGB"))

    return _cpu_seconds(one_pass, repeats), str(train_transform).replace("\n", " ")


def _dali_seconds(paths: List[Path], repeats: int, mode: str) -> Tuple[float, str]:
    """DALI's CPU seconds for ``paths`` in ``mode``: ``cpu`` (all of it on CPU threads), ``cpu-decode`` (decoding
    on the CPU, the augmentation on the GPU; without a GPU, the graph stops after decoding: the CPU's share),
    ``gpu-decode`` (decoding on the GPU; needs one), ``feed`` (the external source alone: the files read, every
    draw made, nothing decoded; what decoding on the GPU leaves at best). One DALI thread and one thread reading
    the files (the random draws in this one): the CPU time of all three counts; after the warm-up pass the images'
    sizes are known, as in every epoch after a run's first."""
    from timm.data.random_erasing import RandomErasing

    from toe.data.dali import DaliAugment, DaliTrainLoader
    from toe.data.datasets import SeededSamples
    from toe.train.loaders import EpochSampler

    recipe = _deit_recipe()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda and mode != "cpu" else torch.device("cpu")
    augment = DaliAugment.from_recipe(recipe, 224, "bicubic", DEIT_DATA["mean"], DEIT_DATA["std"])
    samples = [(str(path), 0) for path in paths]
    batch = min(32, len(samples))
    sampler = SeededSamples(EpochSampler(samples, 0), 0)
    until = "decode" if mode == "cpu-decode" and not cuda else "normalize"
    erase = RandomErasing(recipe.reprob, mode=recipe.remode, device=str(device))
    loader = DaliTrainLoader(
        samples,
        sampler,
        batch,
        augment,
        device,
        threads=1,
        seed=0,
        erase=erase,
        decode_device=device if mode == "gpu-decode" else torch.device("cpu"),
        until=until,
    )
    if mode == "feed":

        def one_pass() -> None:
            for _ in loader._batches([]):
                pass

    elif until == "decode":
        one_pass: Callable[[], Any] = loader.run_through
    else:

        def one_pass() -> None:
            for _ in loader:
                pass

    seconds = _cpu_seconds(one_pass, repeats, device) * len(samples) / (len(loader) * batch)
    if mode == "feed":
        return seconds, "DALI's external source alone: the files read, every draw made, nothing decoded"
    return seconds, repr(loader) + (" (the graph stopped after decoding: the CPU's share)" if until == "decode" else "")


DALI_MODES = {
    "cpu": "decode + augmentation on CPU threads (no GPU)",
    "cpu-decode": "decode on the CPU, augmentation on the GPU",
    "feed": "the files read and every draw made, no graph: the least any DALI mode leaves on the CPU",
    "gpu-decode": "decode (nvJPEG) and augmentation on the GPU",
}


def bench_capacity(
    images: int,
    gpu_img_per_s: float,
    stage1_speedup: float,
    repeats: int,
    folder: Optional[Path] = None,
    pipelines: Sequence[str] = PIPELINES,
    sizes: Sequence[Tuple[int, int]] = SIZES,
) -> List[Dict[str, Any]]:
    """Per pipeline, mode and JPEG size: the CPU time per image of decoding and the DeiT recipe's train
    augmentation (RandomResizedCrop 224, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, normalise)
    that the pipeline leaves on the CPU, as img/s per CPU core, and the cores a GPU needs to be fed at
    ``gpu_img_per_s`` with full tokens and at ``stage1_speedup`` times that in ToE stage 1. A mode that needs a GPU
    where there is none has ``img_per_s_per_core`` None."""
    import tempfile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: what one DataLoader worker gets
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for width, height in sizes:
                paths = write_jpeg_images(Path(folder or tmp) / f"{width}x{height}", images, (width, height))
                modes = [("pil", "decode + augmentation on one CPU core (timm's per-image path)")]
                if "dali" in pipelines:
                    modes += [(f"dali/{mode}", text) for mode, text in DALI_MODES.items()]
                for name, where in modes:
                    if name.split("/")[0] not in pipelines:
                        continue
                    row: Dict[str, Any] = {"pipeline": name, "jpeg": f"{width}x{height}", "where": where}
                    if name == "dali/gpu-decode" and not torch.cuda.is_available():
                        row.update(img_per_s_per_core=None, transform="needs a GPU to measure")
                    else:
                        seconds, transform = (
                            _pil_seconds(paths, repeats)
                            if name == "pil"
                            else _dali_seconds(paths, repeats, name.split("/")[1])
                        )
                        row.update(img_per_s_per_core=images / seconds, transform=transform)
                    rows.append(_with_cores(row, gpu_img_per_s, stage1_speedup))
    finally:
        torch.set_num_threads(threads)
    return rows


def _with_cores(row: Dict[str, Any], gpu_img_per_s: float, stage1_speedup: float) -> Dict[str, Any]:
    import math

    per_core = row["img_per_s_per_core"]
    row.update(
        gpu_img_per_s=gpu_img_per_s,
        stage1_speedup=stage1_speedup,
        stage1_img_per_s=gpu_img_per_s * stage1_speedup,
        cores_full_tokens=math.ceil(gpu_img_per_s / per_core) if per_core else None,
        cores_toe_stage1=math.ceil(gpu_img_per_s * stage1_speedup / per_core) if per_core else None,
    )
    return row
