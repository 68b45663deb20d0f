"""The backbone of the embedded detection run: a digits classifier that ``toe-train task=detection`` trains first
when no ``finetune.path`` is given (YOLOS fine-tunes a classification checkpoint, ``--pre_trained``).

It is the run ``toe-train data=digits method=baseline`` with the detection run's backbone (``model.*``), seed and
``detection.backbone_epochs``, trained in a child process (a Hydra app of its own) into a cache folder that any
later detection run with the same settings reuses: ``$TOE_CACHE`` or ``~/.cache/toe``, never the working directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List

from toe.config.schema import ConfigError, plain
from toe.train.record import CHECKPOINT_FILE, SUMMARY_FILE

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("TOE_CACHE") or Path.home() / ".cache" / "toe").expanduser()


def backbone_overrides(cfg: Any) -> List[str]:
    """The ``toe-train`` overrides of the backbone run."""
    model = cfg.model
    kwargs = ",".join(f"{key}:{json.dumps(value)}" for key, value in sorted(plain(model.kwargs).items()))
    return [
        "data=digits",
        "method=baseline",
        "logger=none",
        "train.progress=false",
        f"train.device={cfg.train.device}",
        f"seed={cfg.seed}",
        f"schedule.epochs={cfg.detection.backbone_epochs}",
        f"model.name={model.name}",
        f"model.label={model.label or model.name}_backbone",
        f"model.img_size={model.img_size}",
        f"model.patch_size={model.patch_size}",
        f"model.drop_path={model.drop_path}",
        f"model.kwargs={{{kwargs}}}",
    ]


def digits_backbone(cfg: Any, info: Any = None) -> Path:
    """The checkpoint of the digits backbone for ``cfg``, trained now if the cache does not hold it."""
    overrides = backbone_overrides(cfg)
    key = hashlib.sha256("\n".join(o for o in overrides if not o.startswith("train.")).encode()).hexdigest()[:12]
    run_dir = cache_root() / "backbones" / f"digits-{cfg.model.label or 'vit'}-s{cfg.seed}-{key}"
    checkpoint = run_dir / CHECKPOINT_FILE
    if _completed(run_dir):
        log.info("detection backbone: %s (trained before, cached)", checkpoint)
        return checkpoint
    if info is not None and info.enabled:
        raise ConfigError(
            "task=detection without finetune.path in a distributed run: train the digits backbone first with "
            f"`toe-train {' '.join(overrides)} hydra.run.dir={run_dir}`, then pass finetune.path={checkpoint}"
        )
    log.info(
        "detection backbone: none given (finetune.path), training one on data=digits for %d epochs into %s "
        "(once; later runs reuse it)",
        cfg.detection.backbone_epochs,
        run_dir,
    )
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "toe.train", *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0 or not _completed(run_dir):
        tail = " | ".join(result.stdout.strip().splitlines()[-3:])
        raise RuntimeError(f"training the detection backbone into {run_dir} failed: {tail}")
    return checkpoint


def _completed(run_dir: Path) -> bool:
    try:
        return (
            json.loads((run_dir / SUMMARY_FILE).read_text()).get("status") == "completed"
            and (run_dir / CHECKPOINT_FILE).is_file()
        )
    except (OSError, ValueError):
        return False
