import json
import math

import pytest
import torch
from conftest import compose_cfg

from toe.config.stages import build_expansion_schedule as build_schedule
from toe.cost.flops import ViTShape, schedule_average_macs
from toe.data.curriculum import build_phases, fourier_crop, phase_at
from toe.train.task import train


def _grid(freq: float, size: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64)
    return torch.cos(2 * math.pi * freq * x / size)[None, :].expand(size, size)


def test_fourier_crop_keeps_low_frequencies_and_intensity_and_drops_high_ones():
    images = torch.full((2, 3, 32, 32), 0.7, dtype=torch.float64)
    torch.testing.assert_close(fourier_crop(images, 16), torch.full((2, 3, 16, 16), 0.7, dtype=torch.float64))
    low = _grid(2, 32)[None, None]
    torch.testing.assert_close(fourier_crop(low, 16)[0, 0], _grid(2, 16))  # the same wave on the coarser grid
    high = _grid(12, 32)[None, None]  # above the new Nyquist (8 cycles)
    assert fourier_crop(high, 16).abs().max() < 1e-12
    mixed = fourier_crop((low + _grid(14, 32)[None, None]).float(), 24)  # 24 px keeps bins -12..11
    assert mixed.dtype == torch.float32 and mixed.shape == (1, 1, 24, 24)
    torch.testing.assert_close(mixed[0, 0].double(), _grid(2, 24), atol=1e-5, rtol=0)
    assert fourier_crop(images, 32) is images


def test_official_phases_give_resolution_magnitude_and_accumulation_per_epoch():
    cfg = compose_cfg(["method=efficienttrain_toe", "schedule=official", "model=deit_small"])
    phases = build_phases(cfg.curriculum, 300, 224, 16)
    assert [(p.start, p.img_size, p.magnitude, p.accumulation) for p in phases] == [
        (0, 160, 1, 1),
        (60, 160, 3, 1),
        (120, 160, 5, 1),
        (180, 192, 7, 1),
        (240, 224, 9, 2),
    ]
    sizes = [phase_at(phases, e).img_size for e in range(300)]
    assert sizes == [160] * 180 + [192] * 60 + [224] * 60


def test_et_toe_token_counts_per_epoch_follow_resolution_and_global_stage():
    """ET_training.py's global-epoch stages: 0-99 60/100, 100-179 80/100, 180-199 114/144, 200-239 all 144,
    240-299 all 196."""
    cfg = compose_cfg(["method=efficienttrain_toe", "schedule=official", "model=deit_small"])
    sched, phases = build_schedule(cfg), build_phases(cfg.curriculum, 300, 224, 16)
    kept = [sched.kept_tokens((phase_at(phases, e).img_size // 16) ** 2, sched.stage_at(e)) for e in range(300)]
    assert kept == [60] * 100 + [80] * 80 + [114] * 20 + [144] * 40 + [196] * 60
    # and the schedule-averaged FLOPs of the official schedule (DeiT-S, ET + ToE: 2.375 linear-only, 2.511 with
    # attention)
    phases_epochs = [(p2.start - p1.start, p1.img_size) for p1, p2 in zip(phases, phases[1:])]
    phases_epochs.append((300 - phases[-1].start, phases[-1].img_size))
    shape = ViTShape.deit(384)
    assert round(schedule_average_macs(shape, phases_epochs, sched, attention=False) / 1e9, 3) == 2.375
    assert round(schedule_average_macs(shape, phases_epochs, sched) / 1e9, 3) == 2.511


# 5 epochs: phases start at 0, 1, 2, 3, 4 (24, 24, 24, 28, 32 px = 36, 36, 36, 49, 64 patches); ToE stages at
# 0, 2, 3 (0/100/200 of 300), the last one full.
@pytest.mark.parametrize(
    "method, tokens", [("efficienttrain_toe", [21, 21, 28, 50, 65]), ("efficienttrain", [37, 37, 37, 50, 65])]
)
def test_efficienttrain_runs_through_every_phase(tmp_path, method, tokens):
    cfg = compose_cfg(["logger=none", f"method={method}", "schedule.epochs=5", "model.kwargs.depth=2"])
    summary = train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["img_size"] for r in rows] == [24, 24, 24, 28, 32]
    assert [r["tokens_after_first_block"] for r in rows] == tokens
    assert all(r["images_seen"] == (e + 1) * 22 * 64 for e, r in enumerate(rows))  # 2 x 32 in the last phase
    assert rows[-1]["lr"] == pytest.approx(1e-5)  # the same number of optimiser steps in every phase
    assert summary.status == "completed"


def test_a_run_too_short_for_the_phases_is_stopped_before_it_starts(tmp_path):
    from toe.config.schema import ConfigError

    with pytest.raises(ConfigError, match="curriculum phases start at epochs"):
        train(compose_cfg(["logger=none", "method=efficienttrain", "schedule.epochs=3"]), tmp_path)


def test_randaugment_at_the_top_magnitude_runs_with_the_installed_pillow():
    """timm's increasing posterize keeps 0 bits at magnitude 10; Pillow 13 rejects that (hence pillow<13)."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    transform = create_transform(32, is_training=True, auto_augment="rand-m10-n4-mstd0-inc1")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert all(transform(image).shape == (3, 32, 32) for _ in range(200))
