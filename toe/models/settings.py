"""The keyword arguments that toe builds a run's timm model with, from the ``model:`` node: one place for the
training build (:func:`toe.train.build.create_model`) and the config check's meta-device build
(:func:`toe.config.validate.check_model`)."""

from __future__ import annotations

from typing import Any, Dict, Mapping


def model_settings(model: Any, num_classes: int, kwargs: Mapping[str, Any], **extra: Any) -> Dict[str, Any]:
    """``timm.create_model(model.name, **model_settings(...))``: the class count, image and patch size, drop-path
    rate, the node's own ``kwargs`` and ``extra`` (what the method sets, e.g. ``dynamic_img_size``)."""
    return dict(
        num_classes=num_classes,
        img_size=model.img_size,
        patch_size=model.patch_size,
        drop_path_rate=model.drop_path,
        **kwargs,
        **extra,
    )
