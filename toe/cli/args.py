"""argparse value types that refuse a bad flag with one line (argparse prints ``error: argument --x: ...``)."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(
    kind: Callable[[str], float],
    name: str,
    low: float,
    inclusive: bool,
    high: float = float("inf"),
    high_inclusive: bool = True,
) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        above = value >= low if inclusive else value > low
        below = value <= high if high_inclusive else value < high
        if not (above and below):
            bounds = f"{'>=' if inclusive else '>'} {low:g}" + (
                f" and {'<=' if high_inclusive else '<'} {high:g}" if high != float("inf") else ""
            )
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}")
        return value

    return parse


positive_int = _number(int, "an integer", 1, True)
non_negative_int = _number(int, "an integer", 0, True)
kept_rate = _number(float, "a number", 0.0, False, 1.0, True)  # (0, 1]
positive_float = _number(float, "a number", 0.0, False)


def torch_device(text: str) -> str:
    """A device this machine has (``cuda`` without a GPU is refused here, not by a traceback later)."""
    from toe.config.schema import ConfigError
    from toe.config.validate import check_device

    try:
        check_device(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None
    return text
