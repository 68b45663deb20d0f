"""Start a run from pretrained weights: a ``checkpoint.pth`` of toe-train or any timm / torch state-dict file.

The classifier head is replaced when the class count differs, the position (and patch) embedding is resampled
when the patch grid differs (fine-tuning at another resolution: timm's ``checkpoint_filter_fn``), and any other
shape that does not fit is an error naming the keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")
MODEL_KEYS = ("model", "state_dict")  # toe-train and DeiT; timm's train.py
EMA_KEYS = ("model_ema", "state_dict_ema", "ema")  # toe-train and DeiT; timm's train.py; toe-train before 0.2


class CheckpointMismatchError(ValueError):
    """The pretrained weights do not fit the model; the message lists the keys and shapes."""


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else "empty"


def looks_like_weights(path: Path) -> Optional[str]:
    """Why the file at ``path`` cannot be a weights file (empty; neither torch's zip format, its legacy pickle, nor
    safetensors), read from its first bytes only; None if it may be one. Cheap, so the config check can run it."""
    import zipfile

    path = Path(path).expanduser()
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    if path.suffix == ".safetensors":
        return None
    with open(path, "rb") as f:
        head = f.read(2)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # torch.save's zip archive; the legacy pickle format
        return None
    return "not a file torch.save wrote (no zip archive, cut short or another format)"


def read_state_dict(path: Path, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights in ``path``: toe-train's checkpoint (``model``, or ``model_ema`` with ``use_ema``), DeiT and
    timm checkpoints (``model``/``model_ema``, ``state_dict``/``state_dict_ema``), or a plain state dict (``.pth``
    or ``.safetensors``); DDP and ``torch.compile`` prefixes removed (timm's ``clean_state_dict``).

    The key is chosen here rather than by timm's ``load_state_dict``, which quietly falls back to the raw weights
    when ``use_ema`` finds no EMA: asking for EMA weights that are not there is an error.
    """
    from timm.models import clean_state_dict

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"finetune.path={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch and safetensors raise RuntimeError, EOFError, UnpicklingError...
        raise CheckpointMismatchError(
            f"finetune.path={path}: not a weights file torch can read ({type(err).__name__}: {_first_line(err)})"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointMismatchError(f"finetune.path={path}: holds a {type(payload).__name__}, not weights")
    keys = EMA_KEYS if use_ema else MODEL_KEYS
    for key in keys:
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            return clean_state_dict(payload[key])
    if use_ema:
        raise CheckpointMismatchError(f"finetune.use_ema=true but {path} holds no EMA weights (none of {keys})")
    return clean_state_dict(payload)


def _fit_host(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm's ``checkpoint_filter_fn`` for its ViTs (position and patch embeddings resampled to the model, CLIP,
    DINOv2 and other layouts converted); for other hosts (LV-ViT) the absolute position embedding is resampled with
    timm's ``resample_abs_pos_embed``."""
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):
        return checkpoint_filter_fn(state, model)
    own = model.state_dict()
    if (
        "pos_embed" in state
        and "pos_embed" in own
        and state["pos_embed"].shape != own["pos_embed"].shape
        and hasattr(model, "patch_embed")
    ):
        state = dict(
            state,
            pos_embed=resample_abs_pos_embed(
                state["pos_embed"],
                new_size=list(model.patch_embed.grid_size),
                num_prefix_tokens=model.num_prefix_tokens,
            ),
        )
    return state


def adapt_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Fit ``state`` to ``model``: resample the embeddings to its grid, drop a head of another class count.

    Returns the adapted state and a list of what was changed; raises :class:`CheckpointMismatchError` on any
    other shape mismatch or on missing/unexpected keys outside the head.
    """
    own = model.state_dict()
    fitted = dict(_fit_host(model, state))
    notes = [
        f"resampled {key} {tuple(state[key].shape)} -> {tuple(value.shape)}"
        for key, value in fitted.items()
        if key in state and state[key].shape != value.shape
    ]
    mismatched = []
    if not any(k.startswith(HEAD_PREFIXES) for k in own):  # a backbone built without a head (YOLOS's)
        for key in [k for k in fitted if k.startswith(HEAD_PREFIXES)]:
            del fitted[key]
            notes.append(f"left out {key} (the model has no classifier head)")
    for key, value in list(fitted.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        if key.startswith(HEAD_PREFIXES):
            del fitted[key]
            notes.append(f"replaced {key} {tuple(value.shape)} -> {tuple(own[key].shape)}")
        else:
            mismatched.append(f"{key}: checkpoint {tuple(state.get(key, value).shape)}, model {tuple(own[key].shape)}")
    missing = [k for k in own if k not in fitted and not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in fitted if k not in own]
    if mismatched or missing or unexpected:
        lines = [f"shape mismatch {m}" for m in mismatched] + [f"missing in checkpoint: {k}" for k in missing]
        lines += [f"not in model: {k}" for k in unexpected]
        shown = "; ".join(lines[:12]) + (f"; ... {len(lines) - 12} more" if len(lines) > 12 else "")
        raise CheckpointMismatchError(f"the pretrained weights do not fit {type(model).__name__}: {shown}")
    return fitted, notes


def load_pretrained(model: nn.Module, path: Path, use_ema: bool = False) -> List[str]:
    """Load the weights of ``path`` into ``model`` (head replaced when needed); returns what was adapted."""
    state, notes = adapt_state_dict(model, read_state_dict(path, use_ema))
    model.load_state_dict(state, strict=False)
    for note in notes:
        log.info("finetune: %s", note)
    return notes
