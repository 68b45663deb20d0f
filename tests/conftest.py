from pathlib import Path
from typing import List

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

# Two epochs over the first two ToE stages of a small ViT on digits: every path of a run in a few seconds.
TINY_RUN = [
    "logger=none",
    "schedule.epochs=2",
    "schedule.length=${schedule.epochs}",
    "schedule.stage_starts=[0,1,2]",
    "model.kwargs.depth=2",
]


def toe_train_cli(run_dir: Path, *extra: str, epochs: int = 3, length: int = 3) -> List[str]:
    """The command line of a tiny ``toe-train`` run (2 blocks, stages at 0/1/2 of ``length`` epochs) into
    ``run_dir``, for tests that run the real command."""
    import sys

    return [
        sys.executable,
        "-m",
        "toe.cli.train",
        "logger=none",
        f"schedule.epochs={epochs}",
        f"schedule.length={length}",
        "schedule.stage_starts=[0,1,2]",
        "model.kwargs.depth=2",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def compose_cfg(overrides: List[str]) -> DictConfig:
    with initialize_config_module(config_module="toe.conf", version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture
def tiny_cfg():
    return lambda *extra: compose_cfg(TINY_RUN + list(extra))


def write_image_folder(root: Path, classes=("cat", "dog"), per_split=6, size=40) -> Path:
    """A tiny ImageNet-layout folder of real PNG files: class 0 dark images, class 1 bright ones."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_split):
                base = 40 if label == 0 else 200
                pixels = np.clip(rng.normal(base, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """The run dir of one full-token training of the default model on digits (2 epochs), trained once for the whole
    test session: pretrained weights for fine-tuning and the experiments that start from them, and the teacher of
    token labeling's label maps."""
    from toe.train.task import train

    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    train(compose_cfg(["logger=none", "method=baseline", "schedule.epochs=2", "schedule.length=2"]), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def digits_label_maps(digits_teacher) -> Path:
    """Label maps of the digits training set written from :func:`digits_teacher` by ``toe-label-maps``."""
    from toe.cli.label_maps import main as write_label_maps

    out = digits_teacher.parent / "label_maps"
    assert write_label_maps([str(digits_teacher), str(out)]) == 0
    return out


def assert_checkpointing_keeps_gradients(model, images) -> None:
    """Gradients of ``model`` (in training mode, its token-reduction stage set) with timm's grad checkpointing equal
    those without: the blocks run again in backward and must reduce the same tokens."""
    import torch

    model(images).sum().backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(images).sum().backward()
    for plain, checkpointed in zip(plain_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)


def assert_bf16_autocast_trains_close_to_fp32(model, images) -> None:
    """Under CPU bf16 autocast ``model`` (in training mode) gives outputs close to fp32 and gradients that reach
    its last block."""
    import torch

    with torch.no_grad():
        full_precision = model(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), full_precision, rtol=0.05, atol=0.05)  # bf16 keeps ~3 digits
    out.float().sum().backward()
    assert model.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def interrupt_after_first_checkpoint(run_dir: Path):
    """SIGTERM to this process once the run's first checkpoint is written (a daemon thread, returned for its
    join): the run ends interrupted, as a scheduler's preemption ends it."""

    import os
    import signal
    import threading
    import time

    def watch():
        deadline = time.time() + 240
        while time.time() < deadline and not (run_dir / "checkpoint.pth").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
