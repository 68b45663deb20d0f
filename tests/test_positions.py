"""ToE, Token Merging and PatchDropout on timm's families whose blocks read token positions: rotary embeddings
(Eva: EVA-02, PE, the rope ViTs) and relative position biases (BEiT, the relpos ViTs). The reduced model must hand
every later part the kept tokens' own positions; these tests hold it to the unpatched model."""

import copy

import pytest
import timm
import torch
from conftest import assert_checkpointing_keeps_gradients

import toe
from toe import ExpansionSchedule
from toe.ops.expansion import gather_tokens
from toe.ops.merging import bipartite_soft_matching, merge_destinations, merged_positions
from toe.ops.patch_dropout import KeptRateSchedule
from toe.ops.positions import gather_pair_bias, gather_rope
from toe.ops.schedule import MergeSchedule

CPU_SIZE = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_classes=10)
FAMILIES = [
    "eva02_tiny_patch14_224",  # rotary embeddings, SwiGLU, no LayerScale
    "vit_pe_core_tiny_patch16_384",  # rotary embeddings in timm's AttentionRope, attention pooling
    "vit_small_patch16_rope_mixed_224",  # mixed RoPE: a rotary embedding per block
    "beit_base_patch16_224",  # a relative position bias table in every attention, q/v biases, LayerScale gammas
    "vit_relpos_small_patch16_224",  # an MLP relative position bias per block, no class token
    "vit_srelpos_small_patch16_224",  # one relative position bias shared by every block
    "vit_relpos_medium_patch16_cls_224",  # relative position bias and a class token
]
FAMILIES = [name for name in FAMILIES if timm.is_model(name)]  # PE and mixed RoPE came after timm 1.0.15
TOE = ExpansionSchedule((0, 1, 2), (0.5, 0.75, 1.0), 0.25, repeats=2)
TOE_DROP = ExpansionSchedule((0, 1, 2), (0.5, 0.75, 1.0), 0.25, repeats=2, merge="drop")
PATCH_DROPOUT = KeptRateSchedule((0, 1, 2), (0.5, 0.75, 1.0))
TOME = MergeSchedule((0, 1, 2), (4.0, 2.0, 0.0))


def _pair(name, method, schedule=None):
    torch.manual_seed(0)
    plain = timm.create_model(name, **CPU_SIZE)
    with torch.no_grad():  # trained-like attention: at init the logits are near zero, BEiT's bias tables zeros and
        for param_name, param in plain.named_parameters():  # LayerScale 1e-5, so a wrong position would pass unseen
            if "relative_position_bias_table" in param_name or "rope" in param_name:
                param.normal_(std=1.0)
            elif "rel_pos" in param_name:  # the relpos ViTs' bias MLP: a bias of std ~1
                param.normal_(std=0.2)
            elif param_name.endswith("qkv.weight"):
                param.mul_(4.0)
            elif param_name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                param.fill_(1.0)
    for module in plain.modules():  # training mode without dropout (the relpos bias MLP has its own, p = 0.125)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = copy.deepcopy(plain)
    if method == "toe":
        toe.patch(model, schedule or TOE)
    elif method == "tome":
        toe.patch_merging(model, schedule or TOME)
    else:
        toe.patch_dropout(model, schedule or PATCH_DROPOUT)
    return model, plain


def _images(batch=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["toe", "tome", "patchdropout"])
@pytest.mark.parametrize("name", FAMILIES)
def test_with_all_tokens_the_patched_model_computes_what_the_unpatched_one_does(name, method):
    """Evaluation (every method), and a training forward at a stage that keeps every token: ToE's and
    PatchDropout's last stage (kept rate 1.0), ToMe's r = 0, whose attention toe computes from the host's layers
    (q/v biases, rotary embedding, relative bias)."""
    model, plain = _pair(name, method)
    images = _images()
    assert model.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        toe.set_epoch(model, 0)  # a reducing stage, but evaluation uses all tokens
        model.eval(), plain.eval()
        assert torch.equal(model(images), plain(images))
        toe.set_epoch(model, 2)  # every token in training
        model.train(), plain.train()  # no dropout or drop-path at these settings
        # close, not equal: in training mode the host's own fused attention differs from run to run by ~1e-7
        torch.testing.assert_close(model(images), plain(images), rtol=1e-5, atol=1e-5)


def _hide_dropped_keys(plain, kept, first_block):
    """Make the unpatched ``plain`` hide every key but those at ``kept`` ``[B, K]`` from blocks ``first_block..``,
    through the additive mask or bias each family's block takes; returns an undo function."""
    tokens = plain.patch_embed.num_patches + plain.num_prefix_tokens
    visible = torch.zeros(kept.shape[0], tokens, dtype=torch.bool).scatter_(1, kept, True)
    mask = torch.zeros(kept.shape[0], 1, tokens, tokens).masked_fill_(~visible[:, None, None, :], float("-inf"))
    undo = []

    def adding(key):
        def hook(module, args, kwargs):
            existing = kwargs.get(key)
            return args, {**kwargs, key: mask if existing is None else existing + mask}

        return hook

    for block in plain.blocks[first_block:]:
        rel_pos = getattr(block.attn, "rel_pos", None)
        if rel_pos is not None:  # relpos: the block's own bias replaces any shared one
            unmasked = rel_pos.get_bias
            rel_pos.get_bias = lambda unmasked=unmasked: unmasked() + mask
            undo.append(lambda rel_pos=rel_pos: delattr(rel_pos, "get_bias"))
            continue
        if isinstance(plain, timm.models.eva.Eva):
            key = "attn_mask"
        elif isinstance(plain, timm.models.beit.Beit):
            key = "shared_rel_pos_bias"
        else:
            key = "shared_rel_pos"
        undo.append(block.register_forward_pre_hook(adding(key), with_kwargs=True).remove)
    return lambda: [u() for u in undo]


@pytest.mark.parametrize("method", ["toe", "patchdropout"])
@pytest.mark.parametrize("name", FAMILIES)
def test_reduced_tokens_compute_what_the_unpatched_model_computes_for_them_with_the_rest_masked(name, method):
    """ToE with ``merge=drop`` keeps a subset after the first block, PatchDropout before it. The unpatched model
    with every other key hidden from those blocks, each token at its own place on the grid, must give the kept
    tokens the same features: the kept tokens saw their own rotary embeddings and relative biases."""
    model, plain = _pair(name, method, TOE_DROP if method == "toe" else None)
    images = _images()
    toe.set_epoch(model, 0)
    model.train(), plain.train()
    with torch.no_grad():
        torch.manual_seed(0)
        reduced = model.forward_features(images)
        first_block = 1 if method == "toe" else 0
        kept = model._toe_positions.at(first_block)
        assert kept is not None and reduced.shape[1] == kept.shape[1] < plain.patch_embed.num_patches
        undo = _hide_dropped_keys(plain, kept, first_block)
        reference = gather_tokens(plain.forward_features(images), kept)
        undo()
        torch.testing.assert_close(reduced, reference, rtol=1e-4, atol=1e-4)  # features of magnitude ~1
        # a naive patch that gave the kept tokens the first K places on the grid fails this test
        state = model._toe_positions
        state.update = lambda index, positions, real=state.update: real(
            index, torch.arange(positions.shape[1]).expand_as(positions)
        )
        torch.manual_seed(0)  # PatchDropout: the same tokens as the first forward
        naive = model.forward_features(images)
        del state.update
        error, naive_error = (reduced - reference).abs().max(), (naive - reference).abs().max()
        assert naive_error > 20 * max(error, 1e-6), (naive_error, error)


@pytest.mark.parametrize("method", ["toe", "tome", "patchdropout"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_reduced_step_gives_a_gradient_to_every_parameter_the_unpatched_model_trains(name, method):
    model, plain = _pair(name, method)
    images = _images()
    toe.set_epoch(model, 0)
    model.train(), plain.train()
    plain(images).logsumexp(-1).sum().backward()
    out = model(images)
    out.logsumexp(-1).sum().backward()
    trained = {n for n, p in plain.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and trained <= reached, sorted(trained - reached)


@pytest.mark.parametrize("method", ["toe", "tome"])
def test_grad_checkpointing_reruns_the_blocks_at_the_same_positions(method):
    """timm's checkpointing runs each block again in backward: it must read the positions it read first."""
    model, _ = _pair("eva02_tiny_patch14_224", method)
    toe.set_epoch(model, 0)
    assert_checkpointing_keeps_gradients(model.train(), _images())


def test_tome_gives_a_merged_token_its_destinations_position_and_every_other_token_its_own():
    torch.manual_seed(0)
    batch, prefix, n = 2, 1, 9
    metric = torch.randn(batch, prefix + n, 8)
    matching = bipartite_soft_matching(metric, 3, prefix)
    positions = torch.arange(prefix + n).expand(batch, -1)
    merged = merged_positions(positions, matching)
    assert merged.shape == (batch, prefix + n - 3)
    # each output token holds the input token at its own position
    assert torch.equal(merge_destinations(matching).gather(1, merged), torch.arange(prefix + n - 3).expand(batch, -1))
    # composed over two blocks, from positions that are not in order
    later = bipartite_soft_matching(torch.randn(batch, merged.shape[1], 8), 2, prefix)
    twice = merged_positions(merged, later)
    held = merge_destinations(later).gather(1, merge_destinations(matching))  # input token -> its token now
    assert torch.equal(held.gather(1, twice), torch.arange(twice.shape[1]).expand(batch, -1))


def test_pair_bias_and_rope_gathers_pick_the_kept_rows_and_columns():
    heads, tokens, batch = 3, 6, 2
    kept = torch.tensor([[0, 4, 2], [0, 1, 5]])
    shared = torch.randn(1, heads, tokens, tokens)
    per_image = torch.randn(batch, heads, tokens, tokens)
    for bias in (shared, shared[0], per_image):
        gathered = gather_pair_bias(bias, kept)
        full = bias.expand(batch, heads, tokens, tokens) if bias.dim() == 3 or bias.shape[0] == 1 else bias
        for b in range(batch):
            for i, row in enumerate(kept[b]):
                for j, col in enumerate(kept[b]):
                    assert torch.equal(gathered[b, :, i, j], full[b, :, row, col])
    assert gather_pair_bias(shared, None) is shared
    rope = torch.randn(tokens - 1, 8)  # patches only
    patches = kept[:, 1:] - 1
    gathered = gather_rope(rope, patches)
    assert gathered.shape == (batch, 1, 2, 8) and torch.equal(gathered[1, 0], rope[patches[1]])
    per_block = torch.randn(heads, tokens - 1, 8)
    assert torch.equal(gather_rope(per_block, patches)[0], per_block[:, patches[0]])


@pytest.mark.parametrize("method", ["toe", "tome", "patchdropout"])
def test_xcit_whose_blocks_convolve_over_the_grid_is_refused_in_one_line_naming_it_and_the_part(method):
    name = "xcit_nano_12_p16_224"
    try:
        with torch.device("meta"):  # the architecture is all that the check reads
            model = timm.create_model(name)
    except RuntimeError as err:  # timm 1.0.15's init calls .item() on its drop-path rates: a real, shallow one
        assert "meta" in str(err), err
        model = timm.create_model(name, depth=2)
    classes = {type(m) for m in model.modules()}
    with pytest.raises(
        TypeError, match=rf"cannot reduce the tokens of {name} \(Xcit\): its blocks use local patch"
    ) as err:
        toe.patch_method(model, method, TOE)
    assert "\n" not in str(err.value) and "whole token grid" in str(err.value)
    assert {type(m) for m in model.modules()} == classes


@pytest.mark.parametrize("method", [None, "toe", "tome", "patchdropout"])
@pytest.mark.parametrize("name", FAMILIES)
def test_analytic_macs_of_each_family_are_what_its_linear_layers_and_patch_embedding_compute(name, method):
    """toe.cost.flops counts each family as a plain ViT (a gated MLP by its own layers), at the token counts each
    reducer reports; torch's FlopCounterMode measures the model's matmuls and convolutions. Left out on both
    sides: the attention matmuls (whether CPU's fused attention is counted depends on the torch version) and the
    relpos bias MLP, which runs once per forward on the grid's offsets, not per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from toe.cost.flops import ViTShape

    model, _ = _pair(name, method) if method else (timm.create_model(name, **CPU_SIZE), None)
    shape = ViTShape.from_model(model)
    toe.set_epoch(model, 0)
    model.train()
    batch = 2
    with FlopCounterMode(display=False) as counter:
        model.forward_features(_images(batch))
    counts = counter.get_flop_counts()
    linear = ("aten.mm", "aten.addmm", "aten.convolution")
    measured = sum(n for op, n in counts["Global"].items() if str(op) in linear)
    with FlopCounterMode(display=False) as bias_counter:  # the relpos bias MLPs, once each, as in a forward
        for module in model.modules():
            if isinstance(module, (timm.layers.pos_embed_rel.RelPosMlp, timm.layers.pos_embed_rel.RelPosBias)):
                module.get_bias()
    measured -= sum(n for op, n in bias_counter.get_flop_counts().get("Global", {}).items() if str(op) in linear)
    op = toe.hosts.reduction_op(model)
    blocks = op.block_tokens(shape.num_patches, shape.depth) if op is not None else shape.full_block_tokens()
    analytic = shape.forward_macs_blocks(blocks, attention=False) - shape.embed_dim * shape.num_classes
    assert measured / (2 * batch) == pytest.approx(analytic, rel=1e-6)
    if method:
        assert analytic < shape.forward_macs(attention=False) - shape.embed_dim * shape.num_classes


@pytest.mark.parametrize("method", ["toe", "tome", "patchdropout"])
@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beit_base_patch16_224", "vit_relpos_small_patch16_224"])
def test_torch_compile_traces_each_family_reduced_without_graph_breaks(name, method):
    """The positions pass through python state between blocks, as ToMe's sizes do: dynamo must trace it whole (no
    host-device sync, no graph break), as for a plain ViT."""
    model, _ = _pair(name, method)
    toe.set_epoch(model, 0)
    model.train()
    torch.manual_seed(0)
    explanation = torch._dynamo.explain(model)(_images(2))
    assert explanation.graph_break_count == 0, explanation.break_reasons
