"""PatchDropout (Liu et al., WACV 2023; FLIP, Li et al., CVPR 2023) with a kept-rate schedule: in training, each
image keeps a random ``int(n * r)`` of its ``n`` patch tokens before the first block, ``r`` the kept rate of the
stage; evaluation sees every token. The stage comes from the epoch as ToE's does (:class:`KeptRateSchedule`).

The dropping is timm's ``PatchDropout`` (timm's ViTs call it from their ``patch_drop`` slot, after the position
embedding); only its drop probability is set per stage here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from timm.layers import PatchDropout

from toe.ops.schedule import StageValues
from toe.ops.tokens import BlockTokens, reduced_block_tokens

try:  # timm >= 1.0.20: the dropping as a function that also returns the kept positions
    from timm.layers.patch_dropout import patch_dropout_forward
except ImportError:  # older timm: PatchDropout returns them itself when its return_indices is set
    patch_dropout_forward = None


class KeptRateSchedule(StageValues):
    """Stages that keep ``keep_rates`` of the patch tokens; stage 0 keeps all of them."""

    name = "keep_rates"

    def check(self, values: Tuple[float, ...]) -> None:
        if any(not 0.0 < r <= 1.0 for r in values):
            raise ValueError(f"keep_rates {list(values)} must lie in (0, 1]")

    @property
    def keep_rates(self) -> Tuple[float, ...]:
        return self.values

    def keep_rate(self, stage: int) -> float:
        return self.value(stage, 1.0)

    def kept_tokens(self, n: int, stage: int) -> int:
        """Patch tokens kept of ``n`` at ``stage``, as timm's PatchDropout counts them."""
        rate = self.keep_rate(stage)
        return n if rate == 1.0 else max(1, int(n * (1.0 - (1.0 - rate))))


class ScheduledPatchDropout(PatchDropout):
    """timm's ``PatchDropout`` whose drop probability follows a :class:`KeptRateSchedule` through
    :meth:`set_epoch`; parameter-free, like :class:`toe.TokenExpansion`."""

    def __init__(self, schedule: KeptRateSchedule, num_prefix_tokens: int = 1, num_suffix_tokens: int = 0):
        super().__init__(prob=0.0, num_prefix_tokens=num_prefix_tokens)
        self.schedule = schedule
        self.num_suffix_tokens = num_suffix_tokens  # trailing tokens kept whole (YOLOS's detection tokens)
        self.stage = 0

    @property
    def stage(self) -> int:
        return self._stage

    @stage.setter
    def stage(self, stage: int) -> None:
        self._stage = stage
        self.prob = 1.0 - self.schedule.keep_rate(stage)

    def set_epoch(self, epoch: int) -> int:
        self.stage = self.schedule.stage_at(epoch)
        return self.stage

    def kept_tokens(self, n: int) -> int:
        """Patch tokens after the op for ``n`` input patch tokens, in the current stage and mode."""
        return self.schedule.kept_tokens(n, self.stage) if self.training else n

    def block_tokens(self, num_patches: int, depth: int) -> BlockTokens:
        """(tokens into the attention, tokens into the MLP) of each block, prefix included, now: it runs before
        the first block, so every block sees the kept tokens."""
        aside = self.num_prefix_tokens + self.num_suffix_tokens
        return reduced_block_tokens(aside, num_patches, self.kept_tokens(num_patches), depth, first_block_reduced=True)

    def forward_with_indices(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The kept tokens and their patch positions ``[B, m]`` (``None`` when nothing is dropped), by timm's
        dropping, for hosts that put the tokens back (LV-ViT's dense head) or read positions (YOLOS's mid position
        embeddings). Suffix tokens are split off before the dropping and appended after it."""
        s = self.num_suffix_tokens
        if s:
            kept, indices = self._drop_with_indices(x[:, :-s])
            return torch.cat([kept, x[:, -s:]], dim=1), indices
        return self._drop_with_indices(x)

    def _drop_with_indices(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if patch_dropout_forward is not None:
            return patch_dropout_forward(x, self.prob, self.num_prefix_tokens, self.ordered, self.training)
        self.return_indices = True
        try:
            return super().forward(x)
        finally:
            self.return_indices = False

    def extra_repr(self) -> str:
        return f"stage={self.stage}, prob={self.prob:g}, schedule={self.schedule}"
