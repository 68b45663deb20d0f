"""``toe-label-maps <run dir> <out dir>``: TokenLabeling's label maps for the training set of a run's data, from
the run's model as teacher (its EMA weights with ``--ema``); the work is
:func:`toe.data.label_maps.write_label_maps`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import List, Optional

from toe.cli.args import positive_int, torch_device

log = logging.getLogger("toe.data.label_maps")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="toe-label-maps", description=__doc__.split("; the work")[0])
    parser.add_argument("run", type=Path, help="a toe-train run directory (config.yaml + checkpoint.pth)")
    parser.add_argument("out", type=Path, help="label-map root to write (<out>/<class>/<image stem>.pt)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("--topk", type=positive_int, default=5, help="logits kept per position (official: 5)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--device", type=torch_device, default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from omegaconf import OmegaConf

    from toe.config.compose import compose_config
    from toe.config.schema import typed_config
    from toe.data.datasets import build_datasets, build_transforms
    from toe.data.label_maps import write_label_maps
    from toe.models.pretrained import CheckpointMismatchError, load_pretrained
    from toe.train.build import create_model, model_data_config
    from toe.train.record import CHECKPOINT_FILE, CONFIG_FILE

    if not args.run.exists():
        parser.error(f"{args.run} does not exist (a toe-train run dir, or its checkpoint.pth)")
    run_dir = args.run if args.run.is_dir() else args.run.parent
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / CHECKPOINT_FILE).is_file():
        parser.error(f"{args.run} is not a toe-train run directory (config.yaml and checkpoint.pth)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out}: a file, not a directory for the label maps")
    try:
        # the run's resolved config over today's defaults: a run written before a key existed gets its default
        cfg = typed_config(OmegaConf.merge(compose_config([]), OmegaConf.load(run_dir / CONFIG_FILE)))
    except Exception as err:  # noqa: BLE001 - OmegaConf and YAML raise several types
        parser.error(f"{run_dir / CONFIG_FILE}: not a toe-train run config ({str(err).splitlines()[0]})")
    train_set, _ = build_datasets(cfg)
    num_classes = cfg.data.num_classes or len(train_set.classes)
    if args.topk > num_classes:
        parser.error(f"--topk {args.topk}: the run's data has only {num_classes} classes")
    model = create_model(cfg, num_classes)
    try:
        load_pretrained(model, run_dir / CHECKPOINT_FILE, use_ema=args.ema)
    except (CheckpointMismatchError, RuntimeError, OSError, EOFError, ValueError) as err:
        parser.error(
            f"{run_dir / 'checkpoint.pth'} is unreadable or does not fit the run's model: {str(err).splitlines()[0]}"
        )
    data_config = model_data_config(model, cfg)
    # The whole image, resized (official generator: --crop-pct 1.0)
    train_set.transform = build_transforms(
        dict(data_config, crop_pct=1.0), dataclasses.replace(cfg.recipe, eval_crop_pct=1.0)
    )[1]
    written = write_label_maps(
        model, train_set, args.out, args.topk, args.batch_size, args.device, progress=sys.stderr.isatty()
    )
    log.info("wrote %d label maps to %s", written, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
