"""``python -m toe.train`` is toe-train too (an entry point, like :mod:`toe.cli.train`, which is its module form)."""

from toe.cli.train import main

main()
