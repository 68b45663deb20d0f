import copy
import json

import pytest
import timm
import torch

import toe
from toe.config.schema import ConfigError
from toe.cost.flops import TRAIN_TO_FORWARD, ViTShape
from toe.ops.patch_dropout import KeptRateSchedule, ScheduledPatchDropout
from toe.train.task import train

SCHEDULE = KeptRateSchedule((0, 10, 20), (0.5, 0.75, 1.0))


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10, **kwargs
    )


def test_each_image_keeps_its_own_random_share_of_patches_and_the_class_token():
    op = ScheduledPatchDropout(SCHEDULE, num_prefix_tokens=1).train()
    x = torch.arange(3 * 17, dtype=torch.float32).view(3, 17, 1).expand(-1, -1, 4).clone()
    assert op.set_epoch(5) == 1 and op.prob == pytest.approx(0.5) and op.kept_tokens(16) == 8
    torch.manual_seed(0)
    y = op(x)
    assert y.shape == (3, 1 + 8, 4)
    assert torch.equal(y[:, 0], x[:, 0])  # the class token is never dropped
    kept = [set(int(v) % 17 for v in row[1:, 0]) for row in y]
    assert all(len(k) == 8 and 0 not in k for k in kept)  # 8 distinct patches of 1..16
    assert len({frozenset(k) for k in kept}) == 3  # each image its own draw
    assert op.set_epoch(15) == 2 and op.kept_tokens(16) == 12 and op(x).shape == (3, 13, 4)
    assert op.set_epoch(25) == 3 and op.kept_tokens(16) == 16 and torch.equal(op(x), x)  # kept rate 1.0
    op.set_epoch(5)
    assert torch.equal(op.eval()(x), x) and op.kept_tokens(16) == 16  # full tokens at evaluation


def test_kept_counts_are_timms_own_for_awkward_rates():
    from timm.layers import PatchDropout

    for rate in (0.3, 0.35, 0.7, 0.9):
        op = ScheduledPatchDropout(KeptRateSchedule((0,), (rate,))).train()
        op.set_epoch(0)
        reference = PatchDropout(prob=1.0 - rate, num_prefix_tokens=1).train()
        x = torch.randn(2, 1 + 196, 8)
        assert op(x).shape[1] == reference(x).shape[1] == 1 + op.kept_tokens(196)


def test_patch_dropout_sits_in_timms_slot_keeps_weights_and_survives_deepcopy():
    model, plain = _vit(), _vit()
    keys = set(model.state_dict())
    toe.patch_dropout(model, SCHEDULE)
    assert isinstance(model.patch_drop, ScheduledPatchDropout) and set(model.state_dict()) == keys
    assert toe.set_epoch(model, 12) == 2 and toe.reduction_op(model) is model.patch_drop
    clone = copy.deepcopy(model)  # ModelEmaV3
    assert clone.patch_drop.stage == 2 and clone.patch_drop.prob == pytest.approx(0.25)
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(images), plain.eval()(images))  # evaluation: all tokens
    with pytest.raises(TypeError, match="at least two `blocks`"):
        toe.patch_dropout(torch.nn.Linear(2, 2), SCHEDULE)


def test_flops_count_every_block_on_the_kept_tokens():
    shape = ViTShape(64, 4, 256, 64, 1, 48 * 64, 10)
    # by hand: patch embedding on all 64 patches, then 4 blocks on 1 + 32 tokens, then the head
    block = 33 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 33 * 33 * 64
    expected = 64 * 48 * 64 + 4 * block + 64 * 10
    assert shape.forward_macs(32, first_block_reduced=True) == expected
    assert shape.train_macs(32, first_block_reduced=True) == TRAIN_TO_FORWARD * expected
    # ToE keeps the first block full: more FLOPs at the same kept count
    assert shape.forward_macs(32) == expected - block + 65 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 65 * 65 * 64


def test_kept_rate_schedules_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="one stage start each"):
        KeptRateSchedule((0, 10), (0.5,))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        KeptRateSchedule((0,), (0.0,))
    with pytest.raises(ValueError, match="must increase"):
        KeptRateSchedule((0, 0), (0.5, 1.0))


def test_a_patchdropout_run_records_its_stages_tokens_and_flops(tiny_cfg, tmp_path):
    summary = train(
        tiny_cfg("method=patchdropout", "schedule.epochs=3", "schedule.stage_starts=[0,1,2]", "model.kwargs.depth=4"),
        tmp_path,
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary.method == "patchdropout" and summary.status == "completed"
    # kept rates matched to ToE's train FLOPs per stage (toe.cost.plan): 0.625, 0.8125, 1.0 of 64 patches
    assert [r["stage"] for r in rows] == [1, 2, 3] and [r["tokens_after_first_block"] for r in rows] == [41, 53, 65]
    shape = ViTShape(64, 4, 256, 64, 1, 3 * 4 * 4 * 64, 10)
    assert rows[0]["train_flops_total"] == pytest.approx(
        rows[0]["images_seen"] * shape.train_macs(40, first_block_reduced=True)
    )
    assert shape.train_macs(40, first_block_reduced=True) == pytest.approx(shape.train_macs(32), rel=0.02)
    # 10 classes: a broken run stays near 0.10; three epochs gave 0.21-0.29 over seeds 0-2
    assert summary.final_top1 > 0.16
    with pytest.raises(ConfigError, match="one token-reduction method per run"):
        train(tiny_cfg("method=patchdropout", "toe.enabled=true"), tmp_path / "both")
    with pytest.raises(ConfigError, match="one value per stage"):
        train(tiny_cfg("method=patchdropout", "patch_dropout.keep_rates=[0.5]"), tmp_path / "rates")


def test_suffix_tokens_are_never_dropped_and_stay_last():
    op = ScheduledPatchDropout(SCHEDULE, num_prefix_tokens=1, num_suffix_tokens=3).train()
    x = torch.arange(2 * 20, dtype=torch.float32).view(2, 20, 1).expand(-1, -1, 4).clone()
    op.set_epoch(5)
    torch.manual_seed(0)
    y, kept = op.forward_with_indices(x)
    assert y.shape == (2, 1 + 8 + 3, 4) and kept.shape == (2, 8)
    assert torch.equal(y[:, 0], x[:, 0]) and torch.equal(y[:, -3:], x[:, -3:])
    torch.testing.assert_close(y[:, 1:-3], x.gather(1, (kept + 1)[..., None].expand(-1, -1, 4)))
    assert (kept < 16).all()  # only patches were dropped or kept
    assert op.block_tokens(16, 2) == [(12, 12), (12, 12)]
