import copy

import pytest
import timm
import torch
from conftest import assert_bf16_autocast_trains_close_to_fp32, assert_checkpointing_keeps_gradients
from timm.utils import ModelEmaV3

import toe
from toe.cost.flops import TRAIN_TO_FORWARD, ViTShape
from toe.hosts.merge import attend
from toe.models.lvvit import LVViT
from toe.ops.merging import bipartite_soft_matching, merge_count, merge_destinations, merge_tokens, unmerge
from toe.ops.schedule import MergeSchedule

SCHED = MergeSchedule((0, 10, 20), (8, 4, 0))
SMALL_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, num_classes=10)


def _axis(dim, *hot):
    v = torch.full((dim,), 0.01)
    for i in hot:
        v[i] = 1.0
    return v


def test_matching_merges_the_most_similar_tokens_of_a_into_their_partners_in_b():
    # prefix, then patches 0..5: A = patches 0, 2, 4; B = patches 1, 3, 5
    dim = 6
    tokens = torch.stack(
        [
            _axis(dim, 5),  # CLS: never merged
            _axis(dim, 0),  # A0: the same direction as B(patch 3)
            _axis(dim, 1),  # B0
            _axis(dim, 2, 3),  # A1: half-way between B1 and B2
            _axis(dim, 0) * 3,  # B1: A0's partner
            _axis(dim, 1, 2) * torch.tensor([1, 1, 0.3, 1, 1, 1]),  # A2: near B0's direction, less than A0 to B1
            _axis(dim, 4),  # B2
        ]
    ).unsqueeze(0)
    matching = bipartite_soft_matching(tokens, r=2, num_prefix_tokens=1)
    assert matching.merged.tolist() == [[0, 2]] and matching.into.tolist() == [[1, 0]]
    assert matching.unmerged.tolist() == [[1]]
    merged, size = merge_tokens(tokens, matching)
    assert merged.shape == (1, 5, dim) and size.squeeze(-1).tolist() == [[1, 1, 2, 2, 1]]
    expected = torch.stack(
        [tokens[0, 0], tokens[0, 3], (tokens[0, 2] + tokens[0, 5]) / 2, (tokens[0, 4] + tokens[0, 1]) / 2, tokens[0, 6]]
    )
    torch.testing.assert_close(merged[0], expected)
    assert merge_destinations(matching).tolist() == [[0, 3, 2, 1, 3, 2, 4]]


def test_merges_over_blocks_are_size_weighted_means_of_the_original_tokens():
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 15, 8)
    out, size, source = x, None, None
    for r in (5, 3, 2):
        matching = bipartite_soft_matching(out, r, num_prefix_tokens=1)
        out, size = merge_tokens(out, matching, size)
        dest = merge_destinations(matching)
        source = dest if source is None else dest.gather(1, source)
    assert out.shape[1] == 16 - 10 and size.sum(1).squeeze(-1).tolist() == [16.0] * 3
    for b in range(3):
        for token in range(out.shape[1]):
            members = (source[b] == token).nonzero().flatten()
            assert len(members) == size[b, token, 0]
            torch.testing.assert_close(out[b, token], x[b, members].mean(0))
    torch.testing.assert_close(unmerge(out, source)[:, 0], x[:, 0])


def test_merge_count_is_clamped_and_r0_is_the_identity():
    assert [merge_count(n, 8) for n in (64, 15, 3, 1)] == [8, 7, 1, 0]
    x = torch.randn(2, 9, 4)
    matching = bipartite_soft_matching(x, 0)
    out, size = merge_tokens(x, matching)
    assert matching.r == 0 and out.shape == x.shape and torch.equal(size, torch.ones(2, 9, 1))


def test_gradients_reach_merged_and_kept_tokens():
    x = torch.randn(2, 1 + 8, 4, requires_grad=True)
    out, _ = merge_tokens(x, bipartite_soft_matching(x, 4))
    out.sum().backward()
    assert (x.grad != 0).all()


def test_proportional_attention_treats_a_token_of_size_two_as_two_copies():
    torch.manual_seed(0)
    attn = timm.create_model("vit_tiny_patch16_224", **SMALL_VIT).blocks[0].attn.eval()
    x = torch.randn(2, 5, 64)
    size = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0]).view(1, 5, 1).expand(2, -1, -1)
    duplicated = torch.cat([x, x[:, 2:3]], dim=1)
    weighted, keys = attend(attn, x, size)
    plain, _ = attend(attn, duplicated, None)
    torch.testing.assert_close(weighted, plain[:, :5], rtol=1e-5, atol=1e-6)
    assert keys.shape == (2, 5, 32)
    unweighted, _ = attend(attn, x, None)
    assert not torch.allclose(unweighted, weighted)


def _pair(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **{**SMALL_VIT, **kwargs})
    plain = copy.deepcopy(model)
    return toe.patch_merging(model, SCHED), plain


@pytest.mark.parametrize("kwargs", [{}, dict(init_values=1e-2), dict(reg_tokens=2)])  # LayerScale, registers
def test_at_r0_and_in_evaluation_the_patched_model_computes_what_the_plain_one_does(kwargs):
    model, plain = _pair(**kwargs)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 3, 32, 32)
    model.train(), plain.train()
    toe.set_epoch(model, 25)  # r = 0
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
    toe.set_epoch(model, 0)  # r = 8, but evaluation sees every token
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)
    plain.load_state_dict(model.state_dict())


def test_training_merges_r_tokens_in_every_block():
    model, _ = _pair(reg_tokens=2)
    seen = []
    for block in model.blocks:
        block.mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    model.train()
    toe.set_epoch(model, 0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen == [3 + 64 - 8, 3 + 64 - 16, 3 + 64 - 24]
    assert toe.reduction_op(model).block_tokens(64, 3) == [(67, 59), (59, 51), (51, 43)]


def _training_at_stage_1():
    model, _ = _pair()
    model.train()
    toe.set_epoch(model, 0)
    return model


def test_gradients_equal_with_and_without_grad_checkpointing_and_ema_gets_its_own_op():
    model = _training_at_stage_1()
    assert_checkpointing_keeps_gradients(model, torch.randn(2, 3, 32, 32))
    ema = ModelEmaV3(model, decay=0.9)
    assert toe.reduction_op(ema.module) is not toe.reduction_op(model)
    assert ema.module.blocks[1]._tome_op is toe.reduction_op(ema.module)
    toe.set_epoch(ema.module, 10)
    assert toe.reduction_op(ema.module).stage == 2 and toe.reduction_op(model).r == 8
    assert toe.reduction_op(ema.module).r == 0  # the EMA is evaluated: every token


def test_torch_compile_traces_the_merging_model_without_graph_breaks():
    model = _training_at_stage_1()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0


def test_merging_trains_under_bf16_autocast_close_to_fp32():
    assert_bf16_autocast_trains_close_to_fp32(_training_at_stage_1(), torch.randn(4, 3, 32, 32))


def test_flops_follow_the_tokens_of_each_branch():
    shape = ViTShape.from_model(timm.create_model("vit_tiny_patch16_224", **SMALL_VIT))
    d, h = 64, 256

    def attention(t):
        return t * 4 * d * d + 2 * t * t * d

    blocks = attention(65) + 57 * 2 * d * h + attention(57) + 49 * 2 * d * h + attention(49) + 41 * 2 * d * h
    expected = 64 * (3 * 16 * d) + blocks + d * 10
    tokens = [(65, 57), (57, 49), (49, 41)]
    assert shape.forward_macs_blocks(tokens) == expected
    assert shape.train_macs_blocks(tokens) == TRAIN_TO_FORWARD * expected
    assert shape.forward_macs_blocks([(65, 65)] * 3) == shape.forward_macs()


def test_lvvit_merging_and_patch_dropout_give_every_position_to_the_dense_head():
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2, head_dim=32, num_classes=10)
    plain = LVViT(**kwargs).eval()
    merged = toe.patch_merging(copy.deepcopy(plain), MergeSchedule((0,), (16,)))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(merged(x), plain(x))  # evaluation: every token
    merged.train()
    merged.mix_token = False
    toe.set_epoch(merged, 0)
    cls_logits, dense, _ = merged(x)
    assert dense.shape == (2, 64, 10)
    # positions merged into one token share its dense prediction: 64 positions, 64 - 3 * 16 = 16 tokens
    assert all(len(torch.unique(dense[b], dim=0)) == 16 for b in range(2))

    from toe.ops.patch_dropout import KeptRateSchedule

    dropped = toe.patch_dropout(copy.deepcopy(plain), KeptRateSchedule((0,), (0.25,)))
    dropped.train()
    dropped.mix_token = False
    toe.set_epoch(dropped, 0)
    _, dense, _ = dropped(x)
    bias = dropped.aux_head.bias
    at_bias = torch.isclose(dense, bias.expand_as(dense)).all(-1)  # zero tokens: the dense head gives its bias
    assert at_bias.sum(1).tolist() == [64 - 16, 64 - 16]


def test_a_fractional_r_spreads_its_tokens_over_the_blocks():
    from toe.ops.merging import block_r, merging_block_tokens

    assert [block_r(4, i) for i in range(4)] == [4, 4, 4, 4]
    assert [block_r(4.5, i) for i in range(4)] == [4, 5, 4, 5]
    assert [block_r(round(1 / 3, 6), i) for i in range(6)] == [0, 0, 1, 0, 0, 1]
    assert merging_block_tokens(64, 4, 2.25, 1) == [(65, 63), (63, 61), (61, 59), (59, 56)]
    assert MergeSchedule((0,), (2.0,)).rs == (2,) and MergeSchedule((0,), (1 / 3,)).rs == (0.333333,)


def test_planner_matches_patchdropout_and_tome_to_each_toe_stage_within_two_percent():
    from toe.cost.plan import match_stages

    toe_stages = toe.ExpansionSchedule((0, 100, 200), (0.5, 0.75, 1.0), 0.25)
    for shape in (
        ViTShape.deit(192),
        ViTShape.deit(384),
        ViTShape.deit(768),
        ViTShape(64, 4, 256, 64, 1, 3 * 16 * 64, 10),
    ):  # DeiT-T/S/B, the CPU default
        for match in match_stages(shape, toe_stages):
            assert match.merge_macs == pytest.approx(match.toe_macs, rel=0.02)
            assert match.dropout_macs == pytest.approx(match.toe_macs, rel=0.02)
        assert match.merge_r == 0 and match.kept_rate == 1.0  # the last stage is full-token training
    first = match_stages(ViTShape.deit(384), toe_stages)[0]
    assert first.toe_tokens == 99 and shape.num_prefix_tokens == 1
    # PatchDropout's matched rate keeps the number of tokens whose FLOPs it matched, as timm's PatchDropout counts
    from toe.ops.patch_dropout import KeptRateSchedule

    kept = KeptRateSchedule((0,), (first.kept_rate,)).kept_tokens(196, 1)
    assert kept > 98 and ViTShape.deit(384).train_macs(kept, first_block_reduced=True) == first.dropout_macs


def test_a_tome_run_records_its_stages_tokens_and_matched_flops(tiny_cfg, tmp_path):
    import json

    from toe.config.schema import ConfigError
    from toe.train.task import train

    summary = train(
        tiny_cfg("method=tome", "schedule.epochs=3", "schedule.stage_starts=[0,1,2]", "model.kwargs.depth=4"), tmp_path
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary.method == "tome" and summary.status == "completed"
    shape = ViTShape(64, 4, 256, 64, 1, 3 * 4 * 4 * 64, 10)
    toe_stage = [shape.train_macs(32), shape.train_macs(48), shape.train_macs(64)]
    before = [{"train_flops_total": 0.0, "images_seen": 0}] + rows
    for prev, row, target in zip(before, rows, toe_stage):  # each stage at the ToE stage's train FLOPs (toe.cost.plan)
        per_image = (row["train_flops_total"] - prev["train_flops_total"]) / (row["images_seen"] - prev["images_seen"])
        assert per_image == pytest.approx(target, rel=0.02)
    assert [r["stage"] for r in rows] == [1, 2, 3] and rows[0]["tokens_after_first_block"] < 65
    assert rows[2]["tokens_after_first_block"] == 65
    assert summary.final_top1 > 0.16  # 10 classes: a broken run stays near 0.10
    with pytest.raises(ConfigError, match="one value per stage"):
        train(tiny_cfg("method=tome", "tome.r=[4]"), tmp_path / "r")
    with pytest.raises(ConfigError, match="one token-reduction method per run"):
        train(tiny_cfg("method=tome", "patch_dropout.enabled=true"), tmp_path / "both")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["patchdropout", "tome"])
def test_the_other_token_reducers_learn_the_embedded_default(method, tmp_path):
    from conftest import compose_cfg

    from toe.train.task import train

    summary = train(compose_cfg([f"method={method}", "logger=none"]), tmp_path)
    assert summary.status == "completed" and summary.final_top1 >= 0.90


def test_suffix_tokens_are_never_merged_and_come_last():
    """YOLOS's detection tokens: merging ``[prefix, patches, suffix]`` keeps the suffix whole after the merged
    patches, and merges the patches exactly as without it; destinations and positions agree."""
    from toe.ops.merging import merged_positions

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1 + 15 + 4, 8, generator=gen)
    with_suffix = bipartite_soft_matching(x, 5, num_prefix_tokens=1, num_suffix_tokens=4)
    without = bipartite_soft_matching(x[:, :-4], 5, num_prefix_tokens=1)
    merged, size = merge_tokens(x, with_suffix)
    expected, expected_size = merge_tokens(x[:, :-4], without)
    assert merged.shape == (2, 1 + 10 + 4, 8)
    torch.testing.assert_close(merged, torch.cat([expected, x[:, -4:]], dim=1))
    assert size[:, -4:].eq(1).all() and torch.equal(size[:, :-4], expected_size)
    dest = merge_destinations(with_suffix)
    assert torch.equal(dest[:, -4:], torch.arange(11, 15).expand(2, -1))
    torch.testing.assert_close(unmerge(merged, dest)[:, -4:], x[:, -4:])
    positions = merged_positions(torch.arange(20).expand(2, -1), with_suffix)
    assert torch.equal(positions[:, -4:], torch.arange(16, 20).expand(2, -1))
    op = toe.TokenMerging(MergeSchedule((0,), (5,)), num_prefix_tokens=1, num_suffix_tokens=4).train()
    op.set_epoch(0)
    assert op.block_tokens(15, 2) == [(20, 15), (15, 10)]
    merged_by_op, _, matching = op(x, x, None, 0)
    torch.testing.assert_close(merged_by_op, merged)
