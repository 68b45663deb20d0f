import copy

import pytest
import timm
import torch
from conftest import assert_bf16_autocast_trains_close_to_fp32, assert_checkpointing_keeps_gradients
from timm.utils import ModelEmaV3

import toe
from toe import ExpansionSchedule

SCHED = ExpansionSchedule([0, 10, 20], [0.5, 0.75, 1.0], 0.25, repeats=2)


def _pair(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    plain = copy.deepcopy(model).eval()
    return toe.patch(model, SCHED), plain


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("deit_tiny_patch16_224", dict(img_size=64)),
        ("deit3_small_patch16_224", dict(img_size=64)),  # LayerScale
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2)),
        ("vit_small_patch16_224", dict(img_size=64, class_token=False, global_pool="avg", depth=3)),
        ("vit_small_patch16_224", dict(img_size=64, reg_tokens=4, depth=3)),
    ],
)
def test_patched_model_evaluates_exactly_like_the_plain_one(name, kwargs):
    model, plain = _pair(name, **kwargs)
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(3, 3, kwargs["img_size"], kwargs["img_size"])
    toe.set_epoch(model, 5)
    model.eval()
    assert torch.equal(model(x), plain(x))
    # The trained weights load into an unpatched timm model unchanged.
    plain.load_state_dict(model.state_dict())


def test_training_forward_runs_on_fewer_tokens_and_uses_prefix_count():
    model, _ = _pair("vit_small_patch16_224", img_size=64, reg_tokens=4, depth=3)
    op = toe.expansion_op(model)
    assert op.num_prefix_tokens == 5
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    model.train()
    for epoch, tokens in [(0, 5 + 8), (10, 5 + 12), (20, 5 + 16)]:
        assert toe.set_epoch(model, epoch) == SCHED.stage_at(epoch)
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        assert seen[-1] == tokens
    model.eval()
    model(torch.randn(2, 3, 64, 64))
    assert seen[-1] == 5 + 16


def test_patched_model_supports_grad_checkpointing_ema_and_patching_twice():
    model, _ = _pair("deit_tiny_patch16_224", img_size=64)
    model.train()
    toe.set_epoch(model, 0)
    images = torch.randn(2, 3, 64, 64)
    assert_checkpointing_keeps_gradients(model, images)
    ema = ModelEmaV3(model, decay=0.9)
    assert toe.expansion_op(ema.module) is not toe.expansion_op(model)
    assert type(ema.module.blocks[0]).__name__ == "ToEBlock"
    toe.patch(model, ExpansionSchedule([0, 5], [0.5, 1.0], 0.25))
    assert toe.expansion_op(model).schedule.keep_rates == (0.5, 1.0)
    assert len([m for m in model.modules() if isinstance(m, toe.TokenExpansion)]) == 1


def test_torch_compile_traces_the_patched_model_without_graph_breaks():
    model, _ = _pair("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2)
    model.train()
    toe.set_epoch(model, 0)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0


def test_patch_rejects_models_without_blocks():
    with pytest.raises(TypeError, match="at least two `blocks`"):
        toe.patch(torch.nn.Linear(3, 3), SCHED)


def test_patched_model_trains_under_autocast_with_fused_attention():
    model, _ = _pair("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=2)
    assert all(block.attn.fused_attn for block in model.blocks)
    model.train()
    toe.set_epoch(model, 10)
    images = torch.randn(4, 3, 32, 32)
    assert_bf16_autocast_trains_close_to_fp32(model, images)
