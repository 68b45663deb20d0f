"""Hosts beyond timm's own: importing this package registers them with timm (``timm.create_model("lvvit_s")``)."""

from toe.models import lvvit  # noqa: F401
