"""The DALI input pipeline for image folders: JPEG decoding and the DeiT recipe's augmentation in NVIDIA DALI, on
the GPU where there is one (decoding included) and on CPU threads where there is not.

Why: ToE's stage 1 steps up to twice as fast as full tokens, so the input must keep up; timm's per-image PIL path
(decode, RandomResizedCrop, flip, RandAugment, normalise) costs a CPU core about a third of a millisecond to a
millisecond per image, and a current GPU training DeiT-S in ToE stage 1 would need 15 to 25 cores to be fed.

Why DALI and not torchvision's decoding on the device: torchvision decodes JPEGs on the GPU (``decode_jpeg(...,
device="cuda")``), but its transforms draw one set of parameters per call, so per-image crops and RandAugment ops
on a batch would be ours to write, op by op, and a crop is only taken after the whole image is decoded. DALI is
made for this: it decodes only each image's crop (``decoders.image_slice``; on the GPU with nvJPEG and the hardware
JPEG decoder of A100/H100-class GPUs), applies every image's own crop, flip and augmentation ops, and runs the same
graph on CPU threads where there is no GPU (so the path is tested on CPU machines).

What is the same as timm's PIL path, and what is not (README's pipeline table says it too):

- The crop: drawn per image as torchvision's ``RandomResizedCrop.get_params`` draws it (an area uniform in
  ``recipe.scale``, an aspect ratio log-uniform in [3/4, 4/3], 10 tries; :func:`draw_crops`), then resized with
  DALI's antialiased cubic (or linear) filter, or for ``train_interpolation=random`` either, drawn per image as
  timm draws it; PIL's bicubic and bilinear are antialiased too. A run on this pipeline does not
  draw the crops the PIL path draws (no two pipelines do: the distributions match, tests/test_dali.py checks them
  against torchvision's).
- RandAugment: timm's policy string (``rand-m9-mstd0.5-inc1``) rebuilt from DALI's operations
  (:func:`timm_rand_augment`): timm's op set (its 15 "increasing" ops, or the 15 plain ones), its magnitude mapping
  of each op, the magnitude's Gaussian noise (``mstd``) and clip (``mmax``), each layer applied with probability
  ``p`` (0.5), ops drawn with replacement, signs at random (:func:`draw_rand_augment`). It differs in: the geometric
  ops (rotate, shear, translate) interpolate bilinearly (DALI's warp has no bicubic) and fill with one grey level
  (the mean of timm's per-channel fill colour) where timm fills with the mean colour; equalize uses OpenCV's
  histogram formula; sharpness leaves a one-pixel border; contrast and colour are DALI's blends, close to PIL's; the
  magnitude is quantised to steps of 0.1.
- Random erasing (timm's ``RandomErasing``) and Mixup/CutMix run on the device batch, timm's own code, as the step
  already runs Mixup.
- Sampling and randomness: the run's own sampler (``EpochSampler``, ``DistributedSampler``, timm's
  ``RepeatAugSampler``) chooses the images of every epoch, so sharding and repeated augmentation are the PIL path's.
  Every random draw is made in Python from a generator of (run seed, epoch, rank, batch) and fed to the graph,
  which draws nothing: it is built once and serves every epoch, a resumed run draws what an uninterrupted one
  draws, and DALI's thread count changes nothing.
- The EfficientTrain curriculum: a phase's RandAugment magnitude is only its draws' (the graph's tables cover every
  magnitude), its micro-batch a graph of that batch size (:meth:`DaliTrainLoader.reconfigure`); the low-frequency
  crop runs on the device batch, as on the other pipelines.

Evaluation stays on timm's PIL path (deterministic, a small fraction of the images). Files DALI cannot decode
(GIF, say) are skipped with a warning naming them, as timm's reader skips a file it cannot read; a file that looks
like an image but does not decode stops the run with its name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

DALI_INSTALL = 'pip install "toe[dali]", or "toe[dali-cuda13]" for a CUDA 13 stack'
# The random crop's aspect ratios (timm's default, as the other pipelines use)
CROP_RATIO = (3 / 4, 4 / 3)
# The magnitude's resolution: timm's magnitudes are floats on [0, 10] (with mstd noise); DALI indexes its tables by
# bins, 10 to a unit
BINS_PER_LEVEL = 10
LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is each op's full strength
# Batches whose files are read ahead of DALI's external source (DALI itself prefetches two batches' outputs)
READ_AHEAD = 2


def dali_missing() -> Optional[str]:
    """Why DALI cannot be used here (``None`` when it can)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except (ImportError, OSError) as err:
        return f"NVIDIA DALI is not installed ({DALI_INSTALL}; {type(err).__name__}: {err})"
    return None


# --- RandAugment: timm's policy strings, DALI's operations --------------------------------------------------------
@dataclass(frozen=True)
class RandAugmentPolicy:
    """timm's ``rand-...`` policy string, parsed as ``timm.data.auto_augment.rand_augment_transform`` parses it."""

    layers: int = 2  # n: ops per image
    magnitude: float = LEVEL_DENOM  # m
    magnitude_std: float = 0.0  # mstd: Gaussian noise on m per op (inf: uniform in [0, m])
    magnitude_max: float = LEVEL_DENOM  # mmax: the clip of the noisy magnitude
    increasing: bool = False  # inc: the ops whose strength grows with the magnitude
    prob: float = 0.5  # p: each layer applied with this probability
    config: str = ""  # the string it was parsed from

    @classmethod
    def parse(cls, config: str) -> "RandAugmentPolicy":
        parts = config.split("-")
        if parts[0] != "rand":
            raise ValueError(f"auto_augment={config!r} is not RandAugment (rand-...)")
        values: dict = {}
        for part in parts[1:]:
            if part.startswith("t"):  # timm's named transform sets and weights
                raise ValueError(f"auto_augment={config!r}: the transform set {part!r} (timm's 't' section)")
            split = re.split(r"(\d.*)", part)
            if len(split) < 2:
                continue
            key, value = split[:2]
            if key == "mstd":
                values["magnitude_std"] = math.inf if float(value) > 100 else float(value)
            elif key == "mmax":
                values["magnitude_max"] = float(int(value))
            elif key == "inc":
                values["increasing"] = bool(int(value))
            elif key == "m":
                values["magnitude"] = float(int(value))
            elif key == "n":
                values["layers"] = int(value)
            elif key == "p":
                values["prob"] = float(value)
            else:
                raise ValueError(f"auto_augment={config!r}: unknown RandAugment section {part!r}")
        return cls(**values, config=config)


def _levels(policy: RandAugmentPolicy) -> np.ndarray:
    """The magnitude of every bin, ``0, 0.1, ..., mmax``."""
    return np.arange(int(round(policy.magnitude_max * BINS_PER_LEVEL)) + 1) / BINS_PER_LEVEL


def _posterize_mask(bits_to_keep: float) -> np.ndarray:
    """timm's posterize: keep ``bits`` most significant bits (8 or more: unchanged; 0: black, as PIL's)."""
    bits = int(bits_to_keep)
    return np.array(255 if bits >= 8 else (0xFF << (8 - bits)) & 0xFF, dtype=np.uint8)


RAND_AUGMENT_OPS = 15  # timm's op sets (inc or plain) hold 15 ops; index 15 of the table is the identity


def timm_rand_augment_ops(policy: RandAugmentPolicy) -> List[Any]:
    """timm's RandAugment op set as DALI augmentations, each with timm's map from magnitude to argument (its
    ``LEVEL_TO_ARG``), tabulated per magnitude bin; the last entry is the identity a skipped layer takes."""
    from nvidia.dali import fn
    from nvidia.dali.auto_aug import augmentations as a
    from nvidia.dali.auto_aug.core import augmentation

    # DALI's own equalize and sharpness call the operators by their deprecated fn.experimental names (a warning
    # at every build that no filter silences: DALI resets the filter around it); the same operators by their names
    @augmentation(name="equalize")
    def equalize(data, _):
        return fn.equalize(data)

    @augmentation(name="sharpness", param_device="auto")
    def sharpness(data, kernel):
        return fn.filter(data, kernel)

    level = _levels(policy) / LEVEL_DENOM  # the fraction of full strength per bin
    ops = [
        a.auto_contrast,
        equalize,
        a.invert,
        a.rotate.augmentation(mag_range=level * 30.0, randomly_negate=True),
        a.solarize_add.augmentation(mag_range=np.minimum(128, (level * 110).astype(int)).astype(np.float64)),
        a.shear_x.augmentation(mag_range=level * 0.3, randomly_negate=True),
        a.shear_y.augmentation(mag_range=level * 0.3, randomly_negate=True),
        a.translate_x.augmentation(mag_range=level * 0.45, randomly_negate=True),
        a.translate_y.augmentation(mag_range=level * 0.45, randomly_negate=True),
    ]
    posterize_bits = (level * 4).astype(int)
    solarize = np.minimum(256, (level * 256).astype(int))
    if policy.increasing:
        enhance = dict(mag_range=level * 0.9, randomly_negate=True)
        ops += [
            a.posterize.augmentation(mag_range=(4 - posterize_bits).astype(np.float64), mag_to_param=_posterize_mask),
            a.solarize.augmentation(mag_range=(256 - solarize).astype(np.float64)),
            a.color.augmentation(**enhance, mag_to_param=_increasing_factor),
            a.contrast.augmentation(**enhance, mag_to_param=_increasing_factor),
            a.brightness.augmentation(**enhance, mag_to_param=_increasing_factor),
            sharpness.augmentation(**enhance, mag_to_param=_sharpness_kernel_increasing),
        ]
    else:
        enhance = dict(mag_range=level * 1.8 + 0.1, randomly_negate=False)
        ops += [
            a.posterize.augmentation(mag_range=posterize_bits.astype(np.float64), mag_to_param=_posterize_mask),
            a.solarize.augmentation(mag_range=solarize.astype(np.float64)),
            a.color.augmentation(**enhance, mag_to_param=None),
            a.contrast.augmentation(**enhance, mag_to_param=None),
            a.brightness.augmentation(**enhance, mag_to_param=None),
            sharpness.augmentation(**enhance, mag_to_param=_sharpness_kernel_factor),
        ]
    assert len(ops) == RAND_AUGMENT_OPS
    return ops + [a.identity]


def _increasing_factor(signed: float) -> np.ndarray:
    """timm's ``_enhance_increasing_level_to_arg``: 1 +- the magnitude, kept at 0.1 or above."""
    return np.array(max(0.1, 1.0 + signed), dtype=np.float32)


def _sharpness_kernel_factor(factor: float) -> np.ndarray:
    """PIL's ImageEnhance.Sharpness at ``factor`` (1: unchanged) as a 3x3 kernel: a blend of the image and PIL's
    SMOOTH filter."""
    blur = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13
    identity = np.zeros((3, 3), dtype=np.float32)
    identity[1, 1] = 1
    return (factor * identity + (1 - factor) * blur).astype(np.float32)


def _sharpness_kernel_increasing(signed: float) -> np.ndarray:
    return _sharpness_kernel_factor(max(0.1, 1.0 + signed))


def draw_rand_augment(rng: np.random.Generator, policy: RandAugmentPolicy, count: int) -> Tuple[np.ndarray, ...]:
    """The RandAugment draws of ``count`` images, as timm's ``RandAugment`` and ``AugmentOp`` make them: per image
    and layer an op drawn uniformly with replacement (the identity where the layer is skipped, probability
    ``1 - prob``), a magnitude around ``m`` (Gaussian ``mstd``, uniform in [0, m] for an infinite one, clipped to
    [0, mmax]) as a bin of :data:`BINS_PER_LEVEL` per unit, and a sign. Returns ``(ops, bins, signs)``, each
    ``[count, layers]`` int32."""
    shape = (count, policy.layers)
    skip = RAND_AUGMENT_OPS  # the identity's index (timm_rand_augment_ops)
    ops = rng.integers(0, skip, size=shape)
    if policy.prob < 1:
        ops = np.where(rng.random(shape) < policy.prob, ops, skip)
    if policy.magnitude_std == math.inf:
        level = rng.uniform(0, policy.magnitude, size=shape)
    elif policy.magnitude_std > 0:
        level = rng.normal(policy.magnitude, policy.magnitude_std, size=shape)
    else:
        level = np.full(shape, policy.magnitude)
    bins = np.rint(np.clip(level, 0, policy.magnitude_max) * BINS_PER_LEVEL)
    signs = rng.integers(0, 2, size=shape)
    return ops.astype(np.int32), bins.astype(np.int32), signs.astype(np.int32)


def timm_rand_augment(images: Any, policy: RandAugmentPolicy, size: int, fill: int, ops: Any, bins: Any, signs: Any):
    """timm's RandAugment on a DALI batch of ``size`` x ``size`` uint8 HWC images, with the per-image draws of
    :func:`draw_rand_augment` fed in (``ops``, ``bins``, ``signs``: DataNodes of ``[layers]`` per image)."""
    from nvidia.dali import types
    from nvidia.dali.auto_aug.core import select, signed_bin

    table = timm_rand_augment_ops(policy)
    for layer in range(policy.layers):
        images = select(
            table,
            ops[layer],
            data=images,
            magnitude_bin=signed_bin(bins[layer], random_sign=signs[layer]),
            num_magnitude_bins=int(round(policy.magnitude_max * BINS_PER_LEVEL)) + 1,
            shape=[size, size],
            fill_value=fill,
            interp_type=types.INTERP_LINEAR,
        )
    return images


# --- the recipe as DALI runs it ------------------------------------------------------------------------------------
# random: bilinear or bicubic per image, as timm's RandomResizedCropAndInterpolation draws it (LV-ViT's recipe)
INTERPOLATIONS = ("bicubic", "bilinear", "random")


def interp_code(name: str) -> int:
    """DALI's interpolation type of ``bicubic`` or ``bilinear``, as the graph takes it per image."""
    from nvidia.dali import types

    return int(types.INTERP_CUBIC if name == "bicubic" else types.INTERP_LINEAR)


def draw_interpolations(rng: np.random.Generator, interpolation: str, count: int) -> np.ndarray:
    """The resize filter of ``count`` images (DALI's codes, int32): ``interpolation``'s for each, or for
    ``random`` one of timm's two (``_RANDOM_INTERPOLATION``: bilinear, bicubic) drawn uniformly per image. Only
    ``random`` draws from ``rng``."""
    if interpolation != "random":
        return np.full(count, interp_code(interpolation), dtype=np.int32)
    choices = np.array([interp_code("bilinear"), interp_code("bicubic")], dtype=np.int32)
    return choices[rng.integers(0, 2, size=count)]


IMAGE_FOLDERS = ("imagefolder", "imagenet")


@dataclass(frozen=True)
class DaliAugment:
    """The training augmentation of a recipe, as the DALI graph runs it: a random resized crop to ``size``, a
    flip, RandAugment (or none), normalisation; random erasing follows on the device batch."""

    size: int
    scale: Tuple[float, float]
    hflip: float
    interpolation: str  # bicubic | bilinear | random
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    policy: Optional[RandAugmentPolicy]
    fill: int  # the geometric RandAugment ops' fill level

    @classmethod
    def from_recipe(
        cls, recipe: Any, size: int, interpolation: str, mean: Sequence[float], std: Sequence[float]
    ) -> "DaliAugment":
        policy = RandAugmentPolicy.parse(recipe.auto_augment) if recipe.auto_augment else None
        # timm fills with the mean colour (its img_mean hparam); DALI's warp takes one level
        fill = int(round(np.mean([min(255, round(255 * m)) for m in mean])))
        return cls(
            size,
            tuple(recipe.scale),
            float(recipe.hflip),
            interpolation,
            tuple(mean),
            tuple(std),
            policy,
            fill,
        )

    def with_policy(self, config: Optional[str]) -> "DaliAugment":
        """The same augmentation with RandAugment ``config`` (a curriculum phase's)."""
        return dataclasses.replace(self, policy=RandAugmentPolicy.parse(config) if config else None)

    @property
    def graph_settings(self) -> Tuple[Any, ...]:
        """What the DALI graph is built from; the rest (crop scale, flip probability, RandAugment's magnitude, its
        noise and layer probability, the resize filter) are only the draws' and change nothing in it."""
        policy = self.policy
        tables = None if policy is None else (policy.layers, policy.increasing, policy.magnitude_max)
        return self.size, self.mean, self.std, self.fill, tables


def dali_pipeline_reasons(
    recipe: Any,
    train_interpolation: str,
    data_name: str,
    curriculum: Sequence[str],
    token_labels: bool,
) -> List[str]:
    """Why the DALI pipeline cannot run a run (empty when it can): the recipe settings it lacks, data that is not
    an image folder, token labels cropped with each image. ``curriculum``: the RandAugment policies of the
    EfficientTrain phases, which replace the recipe's (empty without the curriculum)."""
    reasons = []
    if data_name not in IMAGE_FOLDERS:
        reasons.append(f"data={data_name} is not an image folder (the DALI pipeline reads imagefolder and imagenet)")
    policies = [("curriculum.auto_augment", policy) for policy in curriculum] or [
        ("recipe.auto_augment", recipe.auto_augment)
    ]
    for key, policy in policies:
        if not policy:
            if recipe.color_jitter:  # timm leaves colour jitter out when RandAugment is on
                reasons.append(f"recipe.color_jitter={recipe.color_jitter}")
            break
        try:
            RandAugmentPolicy.parse(policy)
        except ValueError as err:
            reasons.append(f"{key}: {err} (the DALI pipeline runs timm's RandAugment policies, rand-...)")
            break  # the phases' policies differ in their magnitude only: one says it
    if train_interpolation not in INTERPOLATIONS:
        reasons.append(f"recipe.train_interpolation={train_interpolation}")
    if token_labels:
        reasons.append("token labeling crops each image's label map with it")
    return reasons


def dali_refusal(reasons: List[str]) -> str:
    return (
        f"train.pipeline=dali cannot run this run: {'; '.join(reasons)} (train.pipeline=pil runs it on timm's PIL path)"
    )


def dali_unavailable(
    recipe: Any, train_interpolation: str, data_name: str, curriculum: Sequence[str], token_labels: bool
) -> Optional[str]:
    """Why ``train.pipeline=dali`` cannot train this run, in one line (``None`` when it can): what it cannot run
    (:func:`dali_pipeline_reasons`), or DALI not installed."""
    reasons = dali_pipeline_reasons(recipe, train_interpolation, data_name, curriculum, token_labels)
    if reasons:
        return dali_refusal(reasons)
    missing = dali_missing()
    return f"train.pipeline=dali: {missing}" if missing else None


def build_graph(
    source: Callable[[], Tuple[List[np.ndarray], ...]],
    augment: DaliAugment,
    batch_size: int,
    threads: int,
    device_id: Optional[int],
    decode_on_gpu: bool = True,
    prefetch: int = 2,
    until: str = "normalize",
):
    """The DALI pipeline of a run: ``source()`` gives a batch of (encoded files, labels, crop anchors (x, y), crop
    sizes (w, h), flips, RandAugment ops, bins, signs, resize filters), every random draw made on the Python side
    (:class:`DaliTrainLoader`), so the graph itself draws nothing and serves every epoch. With ``device_id`` a
    GPU's, the augmentation runs there and the decoding too (nvJPEG, "mixed", only the crop's region) unless
    ``decode_on_gpu`` is false; with ``device_id`` None all of it runs on ``threads`` CPU threads. ``until="decode"``
    stops after decoding: what the CPU does when the GPU does the rest (``toe-bench capacity``)."""
    from nvidia.dali import fn, pipeline_def, types

    def graph():
        encoded, labels, anchors, sizes, flips, ops, bins, signs, filters = fn.external_source(
            source=source,
            num_outputs=9,
            batch=True,
            dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT] + [types.INT32] * 5,
        )
        images = fn.decoders.image_slice(
            encoded,
            anchors,
            sizes,
            device="mixed" if device_id is not None and decode_on_gpu else "cpu",
            output_type=types.RGB,
            normalized_anchor=False,
            normalized_shape=False,
            adjust_orientation=False,  # PIL (timm's loader) does not turn images by their EXIF orientation
        )
        if until == "decode":
            return images, labels
        if device_id is not None and not decode_on_gpu:
            images = images.gpu()
        images = fn.resize(
            images,
            resize_x=augment.size,
            resize_y=augment.size,
            interp_type=fn.cast(filters, dtype=types.INTERP_TYPE),
            antialias=True,
        )
        images = fn.flip(images, horizontal=flips)
        if augment.policy is not None:
            images = timm_rand_augment(images, augment.policy, augment.size, augment.fill, ops, bins, signs)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255 * m for m in augment.mean],
            std=[255 * s for s in augment.std],
        )
        return images, labels

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The external source node")  # RandAugment's draws, unread without it
        pipe = pipeline_def(graph, enable_conditionals=True)(
            batch_size=batch_size,
            num_threads=max(1, threads),
            device_id=device_id,
            prefetch_queue_depth=prefetch,
            seed=0,  # nothing in the graph draws
        )
        pipe.build()
    return pipe


def draw_crops(
    rng: np.random.Generator,
    heights: np.ndarray,
    widths: np.ndarray,
    scale: Tuple[float, float],
    ratio: Tuple[float, float],
    attempts: int = 10,
) -> Tuple[np.ndarray, np.ndarray]:
    """Random resized crop boxes of images of ``heights`` x ``widths``, drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws each: up to ``attempts`` tries of an area uniform in ``scale`` and a
    log-uniform aspect ratio in ``ratio``, the first that fits, at a uniform place; where none fits, the centre
    crop at the aspect ratio clamped to ``ratio``. Returns ``(anchors [N, 2] as (x, y), sizes [N, 2] as (w, h))``,
    float32, in pixels."""
    heights, widths = np.asarray(heights, dtype=np.float64), np.asarray(widths, dtype=np.float64)
    count = len(heights)
    area = (heights * widths)[:, None]
    target = area * rng.uniform(scale[0], scale[1], size=(count, attempts))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(count, attempts)))
    w, h = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first, found = fits.argmax(axis=1), fits.any(axis=1)
    rows = np.arange(count)
    w, h = w[rows, first], h[rows, first]
    in_ratio = widths / heights
    fallback_w = np.where(in_ratio > ratio[1], np.rint(heights * ratio[1]), widths)
    fallback_h = np.where(in_ratio < ratio[0], np.rint(widths / ratio[0]), heights)
    w, h = np.where(found, w, fallback_w), np.where(found, h, fallback_h)
    top = np.where(found, rng.integers(0, heights - h + 1), (heights - h) // 2)
    left = np.where(found, rng.integers(0, widths - w + 1), (widths - w) // 2)
    return np.stack([left, top], 1).astype(np.float32), np.stack([w, h], 1).astype(np.float32)


# --- files -----------------------------------------------------------------------------------------------------------
_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"BM",  # BMP
    b"II*\x00",  # TIFF
    b"MM\x00*",
    b"\x00\x00\x00\x0cjP  ",  # JPEG 2000
    b"\xff\x4f\xff\x51",
)


def decodable(head: bytes) -> bool:
    """Whether a file starting with ``head`` is in a format DALI's image decoder reads (JPEG, PNG, BMP, TIFF,
    JPEG 2000, WebP, PNM)."""
    head = bytes(head[:12])
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return True
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"123456":
        return True
    return any(head.startswith(signature) for signature in _SIGNATURES)


class UndecodableImageError(ValueError):
    """A training file that reads as an image format but does not decode; the message names it."""


def folder_samples(dataset: Any) -> List[Tuple[str, int]]:
    """``(path, class index)`` of every image of a timm image-folder dataset, in its order."""
    reader = getattr(dataset, "reader", None)
    samples = getattr(reader, "samples", None)
    if samples is None:
        raise TypeError(f"{type(dataset).__name__} is not a timm image folder (no reader.samples)")
    return [(str(path), int(target)) for path, target in samples]


class _Source:
    """The DALI graph's external source: the current epoch's batches, then StopIteration (the epoch's end)."""

    def __init__(self):
        self.batches: Iterator[Tuple[List[np.ndarray], ...]] = iter(())

    def __call__(self) -> Tuple[List[np.ndarray], ...]:
        return next(self.batches)


class DaliTrainLoader:
    """The training batches of one process: the run's ``sampler`` (``set_epoch`` by the run, as for a DataLoader)
    chooses the images; every random draw (crop box, flip, RandAugment ops, magnitudes and signs) is made here from
    a NumPy generator of (run seed, epoch, rank, batch), and DALI decodes and augments with them. Yields ``(images
    [B, 3, S, S] float32, labels [B] int64)``, the images on the device (CUDA) or the CPU, the labels on the CPU.
    Drops the last partial batch, as the other pipelines' loaders do. ``erase``: timm's RandomErasing, run on the
    batch. ``readers``: the threads reading the files (default: ``threads``). The DALI pipeline is built once (its
    RandAugment graph takes seconds to build) and serves every epoch."""

    def __init__(
        self,
        samples: Sequence[Tuple[str, int]],
        sampler: Any,
        batch_size: int,
        augment: DaliAugment,
        device: torch.device,
        threads: int,
        seed: int,
        rank: int = 0,
        erase: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        decode_device: Optional[torch.device] = None,
        prefetch: int = 2,
        until: str = "normalize",
        readers: Optional[int] = None,
    ):
        self.samples, self.sampler, self.batch_size, self.augment = list(samples), sampler, batch_size, augment
        self.device, self.threads, self.seed, self.rank = device, threads, int(seed), int(rank)
        self.erase, self.prefetch = erase, prefetch
        self.readers = max(1, int(readers if readers is not None else threads))  # threads reading the files
        self.decode_on_gpu = (decode_device or device).type == "cuda"
        self.until = until  # "decode": the graph stops there, run by run_through() only (toe-bench capacity)
        self.skipped: set = set()  # paths of the files skipped (each warned of once)
        # Every image's (width, height), read once (PIL's header parse is most of the Python side's cost per
        # image); 0 until then. An array, not a dict: ImageNet's 1.28 M images take 10 MB.
        self._sizes = np.zeros((len(self.samples), 2), dtype=np.int32)
        self._skip_lock = threading.Lock()
        self._source, self._pipe, self._iterator, self._ready = _Source(), None, None, False
        self._start()  # built now, so that the first epoch's time is the epoch's (the graph takes seconds)

    def _start(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        device_id = None if self.device.type != "cuda" else (self.device.index or 0)
        self._pipe = build_graph(
            self._source,
            self.augment,
            self.batch_size,
            self.threads,
            device_id,
            self.decode_on_gpu,
            self.prefetch,
            self.until,
        )
        if self.until == "normalize":
            self._iterator = DALIGenericIterator(
                self._pipe, ["images", "labels"], auto_reset=False, prepare_first_batch=False
            )
        self._fresh = True

    def reconfigure(self, batch_size: int, augment: DaliAugment) -> None:
        """Batches of ``batch_size`` with ``augment`` from the next epoch on (a curriculum phase's micro-batch and
        RandAugment magnitude). The graph is built anew only where what it is built from changes (the batch size,
        or :attr:`DaliAugment.graph_settings`); a new magnitude is only the draws'."""
        rebuild = batch_size != self.batch_size or augment.graph_settings != self.augment.graph_settings
        self.batch_size, self.augment = batch_size, augment
        if rebuild:
            start = time.perf_counter()
            self._pipe = self._iterator = None  # the old graph's threads go with it
            self._ready = False
            self._start()
            log.info("DALI graph rebuilt for batches of %d (%.1f s)", batch_size, time.perf_counter() - start)

    def run_through(self) -> int:
        """One epoch through the graph, its outputs left where DALI made them (what the pipeline costs the CPU,
        without a consumer); returns the images done."""
        self._source.batches = self._batches([])
        batches = 0
        while True:
            try:
                self._pipe.run()
            except StopIteration:
                break
            batches += 1
        self._pipe.reset()
        return batches * self.batch_size

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def _rng(self, batch: int) -> np.random.Generator:
        epoch = int(getattr(self.sampler, "epoch", 0))
        return np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, self.rank, batch])

    def _read(self, index: int) -> Tuple[str, np.ndarray, int, Tuple[int, int]]:
        """The file of ``index`` with its (width, height); or, for a file that is no image PIL identifies or DALI
        decodes (timm's dataset skips a file it cannot read), the next one that is, with a warning naming each file
        skipped. Called from the reading threads."""
        import io

        from PIL import Image, UnidentifiedImageError

        for _ in range(len(self.samples)):
            path, target = self.samples[index]
            if path not in self.skipped:
                with open(path, "rb") as file:
                    data = file.read()
                width, height = self._sizes[index]
                if width:
                    return path, np.frombuffer(data, dtype=np.uint8), target, (int(width), int(height))
                problem = None
                if decodable(data[:12]):
                    try:
                        with Image.open(io.BytesIO(data)) as image:
                            self._sizes[index] = image.size
                            return path, np.frombuffer(data, dtype=np.uint8), target, image.size
                    except (UnidentifiedImageError, OSError, ValueError) as err:
                        problem = f"{type(err).__name__}: {err}"
                else:
                    problem = "not an image format DALI decodes (JPEG, PNG, BMP, TIFF, JPEG 2000, WebP, PNM)"
                with self._skip_lock:
                    if path not in self.skipped:
                        self.skipped.add(path)
                        log.warning("skipped %s: %s; train.pipeline=pil reads what PIL reads", path, problem)
            index = (index + 1) % len(self.samples)
        raise UndecodableImageError(f"none of the {len(self.samples)} training files is an image DALI decodes")

    def _read_batch(self, indices: Sequence[int]) -> List[Tuple[str, np.ndarray, int, Tuple[int, int]]]:
        return [self._read(index) for index in indices]

    def _batches(self, fed: List[List[str]]) -> Iterator[Tuple[List[np.ndarray], ...]]:
        """The epoch's batches for DALI's external source. The files are read by :attr:`readers` threads,
        :data:`READ_AHEAD` batches ahead of DALI, each batch in as many parts as there are threads: a file system's
        latency (a network one's is milliseconds) is waited for in parallel, off the training loop's thread, and
        the read order changes nothing drawn (each batch's draws come from its own generator)."""
        indices = [item[0] if isinstance(item, tuple) else int(item) for item in self.sampler]
        count, size = len(self), self.batch_size
        parts = max(1, min(self.readers, size))
        with ThreadPoolExecutor(self.readers, thread_name_prefix="dali-read") as pool:

            def submit(batch: int) -> List[Future]:
                chunk = indices[batch * size : (batch + 1) * size]
                return [pool.submit(self._read_batch, chunk[part::parts]) for part in range(parts)]

            pending = deque(submit(batch) for batch in range(min(READ_AHEAD, count)))
            for batch in range(count):
                strided = [future.result() for future in pending.popleft()]
                if batch + READ_AHEAD < count:
                    pending.append(submit(batch + READ_AHEAD))
                read = [None] * sum(len(part) for part in strided)
                for part, files in enumerate(strided):
                    read[part::parts] = files
                yield self._fed_batch(read, self._rng(batch), fed)

    def _fed_batch(self, read: List[Any], rng: np.random.Generator, fed: List[List[str]]) -> Tuple[List[Any], ...]:
        """One batch as the graph's external source takes it: files, labels and every random draw."""
        augment = self.augment
        widths, heights = (np.array([size[axis] for *_, size in read]) for axis in (0, 1))
        anchors, sizes = draw_crops(rng, heights, widths, augment.scale, CROP_RATIO)
        flips = (rng.random(len(read)) < augment.hflip).astype(np.int32)
        if augment.policy is not None:
            ops, bins, signs = draw_rand_augment(rng, augment.policy, len(read))
        else:
            ops = bins = signs = np.zeros((len(read), 1), dtype=np.int32)
        filters = draw_interpolations(rng, augment.interpolation, len(read))
        fed.append([path for path, *_ in read])
        return (
            [data for _, data, _, _ in read],
            [np.array([target], dtype=np.int64) for _, _, target, _ in read],
            list(anchors),
            list(sizes),
            list(flips),
            list(ops),
            list(bins),
            list(signs),
            list(filters),
        )

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        fed: List[List[str]] = []
        self._source.batches = self._batches(fed)
        if self._ready:  # the last epoch ran to its end
            self._iterator.reset()
        elif not self._fresh:  # the last epoch was left midway: a fresh pipeline
            self._start()
        self._ready, self._fresh, consumed = False, False, 0
        while True:
            try:
                out = next(self._iterator)[0]
            except StopIteration:
                self._ready = True
                return
            except RuntimeError as err:
                raise undecodable(fed[consumed:], err) from None
            consumed += 1
            images, labels = out["images"], out["labels"].view(-1)
            if self.erase is not None:
                images = self.erase(images)
            yield images, labels

    def __repr__(self) -> str:
        threads = f"{max(1, self.threads)} CPU thread(s)"
        if self.device.type == "cuda":
            where = "the GPU (nvJPEG)" if self.decode_on_gpu else f"{threads}, augmenting on the GPU"
        else:
            where = threads
        policy = self.augment.policy
        return (
            f"DALI, decoding on {where}: random resized crop {self.augment.size} px (scale {self.augment.scale}, "
            f"{self.augment.interpolation}), flip {self.augment.hflip:g}"
            + (f", timm's RandAugment {policy.config}" if policy else "")
            + (f", {self.erase}" if self.erase is not None else "")
        )


def undecodable(batches: List[List[str]], err: BaseException) -> UndecodableImageError:
    """The error for a DALI failure in ``batches``: the first of their files PIL cannot decode either, by name."""
    from PIL import Image

    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for paths in batches:
        for path in paths:
            try:
                with Image.open(path) as image:
                    image.load()
            except Exception as pil_err:  # noqa: BLE001 - PIL raises several types for a file it cannot decode
                return UndecodableImageError(
                    f"{path} cannot be decoded ({type(pil_err).__name__}: {pil_err}); remove it, or train with "
                    "train.pipeline=pil, whose reader skips it with a warning"
                )
    return UndecodableImageError(f"DALI failed on a training batch: {first[:500]}")
