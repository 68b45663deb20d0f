"""The EfficientTrain curriculum (Wang et al., ICCV 2023) as the official ToE runs use it
(``ToE/EfficientTrain/ET_training.py`` of Osilly/TokenExpansion).

Five phases over the run: the input keeps only its low frequencies (a Fourier-domain crop of the 224 px batch to
160, 160, 160, 192 and 224 px, also at evaluation) while RandAugment grows (magnitudes 1, 3, 5, 7, 9); the
effective batch stays fixed (4096) by accumulating gradients over more, smaller batches at full resolution. The ToE
stage follows the global epoch across phases, and the token count follows the resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence

import torch

from toe.ops.schedule import scale_epoch


def fourier_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Keep the lowest ``size x size`` frequencies of ``images [B, C, H, W]`` (square), as EfficientTrain's
    ``freq_crop``: ``fft2`` without a shift, the four low-frequency corner blocks of ``size // 2``, intensity kept
    by ``(size / H) ** 2``, ``ifft2`` and the real part. Not a resize: nothing above the new Nyquist survives."""
    height = images.shape[-1]
    if size >= height:
        return images
    band = size // 2
    spectrum = torch.fft.fft2(images if images.dtype == torch.float64 else images.float())
    top = torch.cat([spectrum[..., :band, :band], spectrum[..., :band, -band:]], dim=-1)
    bottom = torch.cat([spectrum[..., -band:, :band], spectrum[..., -band:, -band:]], dim=-1)
    low = torch.cat([top, bottom], dim=-2) * (2 * band / height) ** 2
    return torch.fft.ifft2(low).real.to(images.dtype)


@dataclass(frozen=True)
class Phase:
    index: int
    start: int  # first epoch of the phase (0-based, scaled to the run)
    img_size: int  # pixels, after the Fourier crop
    magnitude: int  # RandAugment magnitude
    accumulation: int  # micro-batches per optimiser step (the official update_freq)


def _scaled_size(reference_px: int, reference_full: int, model_px: int, patch: int) -> int:
    """A phase resolution given for ``reference_full`` px (160 of 224) at the model's size, on the patch grid."""
    size = model_px * reference_px / reference_full
    return max(patch, int(round(size / patch)) * patch)


def build_phases(curriculum: Any, epochs: int, model_img_size: int, patch_size: int) -> List[Phase]:
    """Phases of ``curriculum`` (a config node) over a run of ``epochs`` epochs at the model's image size."""
    specs: Sequence[Any] = curriculum.phases
    length = float(curriculum.length)
    starts, total = [], 0.0
    for spec in specs:
        starts.append(scale_epoch(total, epochs, length))
        total += float(spec.epochs)
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"curriculum phases start at epochs {starts} over {epochs} epochs: run more epochs")
    phases = []
    for i, (spec, start) in enumerate(zip(specs, starts)):
        size = _scaled_size(int(spec.img_size), int(curriculum.reference_img_size), model_img_size, patch_size)
        if size % 2:
            raise ValueError(f"curriculum phase {i}: {size} px is odd; the Fourier crop needs an even size")
        phases.append(Phase(i, start, size, int(spec.magnitude), int(spec.accumulation)))
    return phases


def phase_at(phases: Sequence[Phase], epoch: int) -> Phase:
    current = phases[0]
    for phase in phases:
        if phase.start <= epoch:
            current = phase
    return current
