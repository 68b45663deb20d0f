"""``toe-vis``: a PNG grid of what a run's token-reduction op keeps, per image and stage (the drawing is
:mod:`toe.vis.draw`).

- ``toe-vis runs/train/<run>``                          a trained run (its checkpoint), digits validation images
- ``toe-vis runs/train/<run> --images my_images/ -n 6``  any image folder (files found recursively)
- ``toe-vis --config method=tome model=vit_cpu``        an untrained model from toe-train overrides
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from toe.cli.args import positive_int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toe-vis",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("run_dir", nargs="?", type=Path, help="a toe-train run dir (config.yaml, checkpoint.pth)")
    parser.add_argument(
        "--config",
        nargs="*",
        metavar="OVERRIDE",
        help="instead of a run dir: toe-train overrides of an untrained model",
    )
    parser.add_argument("--images", type=Path, help="a folder of images (default: the run's validation images)")
    parser.add_argument("-n", "--count", type=positive_int, default=4, help="how many images (rows)")
    parser.add_argument("-o", "--out", type=Path, help="the PNG (default: <run dir>/token_vis.png or token_vis.png)")
    parser.add_argument("--ema", action="store_true", help="draw with the run's EMA weights")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.config is None):
        parser.error("give a run dir or --config overrides (one of them)")
    if args.images is not None and not args.images.is_dir():
        parser.error(f"--images {args.images}: no such folder")
    from toe.vis.draw import draw_run

    out = args.out or ((args.run_dir / "token_vis.png") if args.run_dir is not None else Path("token_vis.png"))
    if out.suffix.lower() != ".png":
        out = out.with_name(out.name + ".png")  # what matplotlib writes: say the file it is
    try:
        images, stages = draw_run(out, args.run_dir, args.config, args.images, args.count, args.ema)
    except Exception as err:  # noqa: BLE001 - sorted here: what a bad input raises gets one line
        import yaml

        from toe.config.compose import config_error_message

        message = config_error_message(err)
        if message is None and isinstance(err, (OSError, ValueError, KeyError, RuntimeError, yaml.YAMLError)):
            where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
            message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}{where}"
        if message is None:
            raise
        parser.error(f"{args.run_dir or 'the config'}: {message}")
    print(f"toe-vis: wrote {out} ({images} images x {stages} stages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
