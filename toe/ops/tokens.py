"""How many tokens each block of a ViT sees under a token reducer: what the reducers report and the analytic FLOPs
(:mod:`toe.cost.flops`) and the run record count."""

from __future__ import annotations

from typing import Any, List, Tuple

BlockTokens = List[Tuple[int, int]]  # (tokens into the attention, tokens into the MLP) of each block, prefix included


def reduced_block_tokens(
    num_prefix_tokens: int, num_patches: int, kept_patches: int, depth: int, first_block_reduced: bool = False
) -> BlockTokens:
    """Blocks 2..L (all blocks with ``first_block_reduced``, as under PatchDropout) on ``kept_patches`` patch
    tokens, the first block (ToE: the op runs on its output) on all of them."""
    full, reduced = num_prefix_tokens + num_patches, num_prefix_tokens + kept_patches
    first = reduced if first_block_reduced else full
    return [(first, first)] + [(reduced, reduced)] * (depth - 1)


def tokens_after_first_block(block_tokens: BlockTokens) -> int:
    """The tokens the first block hands on (what the run record calls ``tokens_after_first_block``)."""
    return block_tokens[1][0] if len(block_tokens) > 1 else block_tokens[0][1]


def prefix_tokens(model: Any) -> int:
    """The tokens a reducer keeps aside in ``model``'s blocks: its own prefix tokens (class, registers,
    ``num_prefix_tokens``) and the prompt tokens of visual prompt tuning (``num_prompt_tokens``, set by
    :func:`toe.hosts.prompts.add_prompts`), which come right after them."""
    return int(getattr(model, "num_prefix_tokens", 1)) + int(getattr(model, "num_prompt_tokens", 0))
