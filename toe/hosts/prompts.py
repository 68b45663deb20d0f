"""Visual Prompt Tuning (VPT; Jia et al., ECCV 2022) in a timm ``VisionTransformer``, as the VPT code builds it
(KMnP/vpt, ``src/models/vit_prompt/vit.py``, ``src/models/vit_models.py``):

- ``length`` learnable prompt tokens go after the class token (after any register tokens too), once the position
  embedding has been added: they have no position. VPT-shallow has one set, at the input; VPT-deep a new set before
  every later block, replacing the previous block's prompt outputs (``forward_deep_prompt``).
- Prompt dropout (``prompt_dropout``) on every set; the prompts' initialisation is VPT's "random" one, uniform in
  +-sqrt(6 / (3 * patch area + dim)) (its Xavier-style bound for a patch's pixels and a token's width).
- The backbone is frozen and, in training, kept in eval mode (VPT's ``train()``: no dropout or drop-path in it);
  the prompts, their dropout and a new head (VPT's ``MLP`` head with no hidden layer: kaiming-normal fan-out
  weights, its bias at -log(99)) are what trains. The head reads what timm's ``forward_head`` reads, with the
  prompt outputs left out (a class-token head reads the class token, as VPT's).

To a token reducer the prompts are prefix tokens (``model.num_prompt_tokens``, which
:func:`toe.ops.tokens.prefix_tokens` adds to timm's ``num_prefix_tokens``), so ToE reduces only the patch
tokens after the first block (and the replaced prompts of VPT-deep stay prefix tokens in every block), Token
Merging never merges them and PatchDropout never drops them. Add the prompts before the reducer is patched.

timm has no prompt tuning to build on: its register tokens (``reg_tokens``, Darcet et al.) are learnable tokens in
the same place, but they belong to the pre-trained model (a DeiT checkpoint has none, and with class-token
position embeddings timm gives them a position embedding too), are not replaced per block and have no dropout.
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import torch
from torch import nn

from toe.hosts.swap import add_mixin
from toe.ops.expansion import TokenExpansion
from toe.ops.merging import TokenMerging
from toe.ops.patch_dropout import ScheduledPatchDropout

# modules whose training mode a prompted model keeps when its backbone goes to eval mode: the token reducers
# reduce in training mode only
_REDUCERS = (TokenExpansion, TokenMerging, ScheduledPatchDropout)
# the head's parts in timm's VisionTransformer that train with the prompts (fc_norm and the norm stay frozen)
_HEAD_PARTS = ("head", "head_drop")


class Prompts(nn.Module):
    """``sets`` sets of ``length`` prompt tokens of width ``dim`` (1: VPT-shallow; one per block: VPT-deep)."""

    def __init__(self, sets: int, length: int, dim: int, patch_pixels: int, dropout: float = 0.0):
        super().__init__()
        bound = math.sqrt(6.0 / float(patch_pixels + dim))
        # one tensor for VPT's prompt_embeddings [1, length, dim] and deep_prompt_embeddings [sets - 1, ...]: the
        # same uniform draws in the same order
        self.tokens = nn.Parameter(torch.empty(sets, length, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def deep(self) -> bool:
        return self.tokens.shape[0] > 1

    def forward(self, index: int, batch: int) -> torch.Tensor:
        return self.dropout(self.tokens[index].expand(batch, -1, -1))

    def extra_repr(self) -> str:
        kind = "deep" if self.deep else "shallow"
        return f"{kind}, {self.tokens.shape[0]} set(s) of {self.length} tokens"


def prompt_slice(x: torch.Tensor, start: int, prompts: torch.Tensor, replace: bool) -> torch.Tensor:
    """``x`` with ``prompts`` [B, P, D] at token ``start``: inserted, or replacing the P tokens there."""
    rest = x[:, start + prompts.shape[1] :] if replace else x[:, start:]
    return torch.cat([x[:, :start], prompts, rest], dim=1)


class PromptedViT(nn.Module):
    """Mixin for timm's ``VisionTransformer``: VPT's prompts after the position embedding, left out of the head;
    in training mode the frozen backbone stays in eval mode."""

    prompts: Prompts

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = super()._pos_embed(x)
        return prompt_slice(x, self.num_prefix_tokens, self.prompts(0, x.shape[0]), replace=False)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        start = self.num_prefix_tokens
        x = torch.cat([x[:, :start], x[:, start + self.prompts.length :]], dim=1)
        return super().forward_head(x, pre_logits=pre_logits)

    def train(self, mode: bool = True) -> "PromptedViT":
        super().train(mode)
        if mode:  # VPT's train(): the backbone in eval mode; the prompts, the head and the reducers training
            trained = {id(m) for part in ("prompts", *_HEAD_PARTS) for m in getattr(self, part).modules()}
            for module in self.modules():  # the model itself says it is training (a reducer patched later reads it)
                module.training = module is self or id(module) in trained or isinstance(module, _REDUCERS)
        return self


class DeepPrompt:
    """A forward pre-hook of block ``index`` (>= 1) of a VPT-deep model: the block's input gets the ``index``-th
    set of prompts in place of the previous block's prompt outputs. A hook rather than a block subclass so that
    it runs before whatever block subclass a token reducer adds (Token Merging's runs the block's layers itself);
    an object rather than a closure so that ``copy.deepcopy`` (the EMA's copy) points it at the copy's prompts."""

    def __init__(self, prompts: Prompts, index: int, start: int):
        self.prompts, self.index, self.start = prompts, index, start

    def __call__(self, block: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x = args[0]
        return (prompt_slice(x, self.start, self.prompts(self.index, x.shape[0]), replace=True), *args[1:])


def _is_vision_transformer(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def add_prompts(model: nn.Module, length: int, deep: bool, dropout: float = 0.0, num_classes: int = 0) -> nn.Module:
    """Make ``model`` (a timm ``VisionTransformer`` with pre-trained weights) a VPT model in place and return it:
    every weight frozen, ``length`` prompt tokens (per block if ``deep``), and a new head of ``num_classes``
    (0: of the model's class count). Add prompts before a token reducer is patched."""
    if not _is_vision_transformer(model):
        raise TypeError(
            f"visual prompt tuning needs a timm VisionTransformer (DeiT, DeiT III, ViT); got {type(model).__name__}"
        )
    if isinstance(model, PromptedViT):
        raise TypeError("this model has prompts already")
    if any(isinstance(m, _REDUCERS) for m in model.modules()):
        raise TypeError("add the prompts before the token reducer: it must count them as prefix tokens")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    dim, (patch_h, patch_w) = model.embed_dim, model.patch_embed.patch_size
    blocks = len(model.blocks)
    model.reset_classifier(num_classes or model.num_classes)
    if isinstance(model.head, nn.Linear):  # VPT's head: kaiming-normal (fan-out) weights, bias -log((1 - p) / p)
        nn.init.kaiming_normal_(model.head.weight, a=0, mode="fan_out")
        nn.init.constant_(model.head.bias, -math.log((1 - 0.01) / 0.01))
    prompts = Prompts(blocks if deep else 1, length, dim, 3 * patch_h * patch_w, dropout)
    prompts.to(model.cls_token.device if model.cls_token is not None else next(model.parameters()).device)
    add_mixin(model, PromptedViT)
    model.prompts = prompts
    model.num_prompt_tokens = length
    if deep:
        for index in range(1, blocks):
            model.blocks[index].register_forward_pre_hook(DeepPrompt(prompts, index, model.num_prefix_tokens))
    model.train(model.training)
    return model


def trained_parameters(model: nn.Module) -> Tuple[int, int]:
    """(parameters that train, all parameters) of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
