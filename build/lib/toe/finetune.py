"""Start a run from pretrained weights: a ``checkpoint.pth`` of toe-train or any timm / torch state-dict file.

The classifier head is replaced when the class count differs, the absolute position embedding is resampled
(timm's ``resample_abs_pos_embed``) when only the patch grid differs (fine-tuning at another resolution), and any
other shape that does not fit is an error naming the keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("head.", "head_dist.", "fc.", "classifier.")


class CheckpointMismatchError(ValueError):
    """The pretrained weights do not fit the model; the message lists the keys and shapes."""


def read_state_dict(path: Path, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights in ``path``: toe-train's checkpoint (``model``, or ``ema`` with ``use_ema``), DeiT-style
    ``{"model": ...}``/``{"state_dict": ...}`` files, or a plain state dict (``.pth`` or ``.safetensors``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"finetune.path={path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if use_ema:
        if not isinstance(payload, dict) or not payload.get("ema"):
            raise CheckpointMismatchError(f"finetune.use_ema=true but {path} holds no EMA weights")
        return {k.removeprefix("module."): v for k, v in payload["ema"].items()}
    for key in ("model", "state_dict", "model_state"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            return payload[key]
    return payload


def adapt_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Fit ``state`` to ``model``: drop a head of another class count, resample the position embedding.

    Returns the adapted state and a list of what was changed; raises :class:`CheckpointMismatchError` on any
    other shape mismatch or on missing/unexpected keys outside the head.
    """
    own = model.state_dict()
    state, notes, mismatched = dict(state), [], []
    for key, value in list(state.items()):
        if key not in own or own[key].shape == value.shape:
            continue
        if key.startswith(HEAD_PREFIXES):
            del state[key]
            notes.append(f"replaced {key} {tuple(value.shape)} -> {tuple(own[key].shape)}")
        elif key == "pos_embed" and hasattr(model, "patch_embed"):
            from timm.layers import resample_abs_pos_embed

            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            state[key] = resample_abs_pos_embed(value, new_size=list(model.patch_embed.grid_size),
                                                num_prefix_tokens=prefix)
            if state[key].shape != own[key].shape:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}")
            else:
                notes.append(f"resampled {key} {tuple(value.shape)} -> {tuple(own[key].shape)}")
        else:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}")
    missing = [k for k in own if k not in state and not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        lines = [f"shape mismatch {m}" for m in mismatched] + [f"missing in checkpoint: {k}" for k in missing]
        lines += [f"not in model: {k}" for k in unexpected]
        shown = "; ".join(lines[:12]) + (f"; ... {len(lines) - 12} more" if len(lines) > 12 else "")
        raise CheckpointMismatchError(f"the pretrained weights do not fit {type(model).__name__}: {shown}")
    return state, notes


def load_pretrained(model: nn.Module, path: Path, use_ema: bool = False) -> List[str]:
    """Load the weights of ``path`` into ``model`` (head replaced when needed); returns what was adapted."""
    state, notes = adapt_state_dict(model, read_state_dict(path, use_ema))
    model.load_state_dict(state, strict=False)
    for note in notes:
        log.info("finetune: %s", note)
    return notes
