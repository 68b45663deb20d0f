import copy

import pytest
import timm
import torch

import toe
import toe.models.lvvit  # noqa: F401 - registers lvvit_t / lvvit_s with timm
from toe import ExpansionSchedule

LVVIT_SCRIPT = ExpansionSchedule([0, 100, 200], [0.4, 0.7, 1.0], 0.2, repeats=2)  # the LV-ViT-S run script


@pytest.mark.parametrize("name, millions", [("lvvit_t", 8.53), ("lvvit_s", 26.15)])
def test_published_sizes(name, millions):
    model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
    assert model.patch_embed.num_patches == 196 and model.num_prefix_tokens == 1


def test_flops_count_the_conv_stem_and_dense_head_and_match_the_published_figure():
    from toe.cost.flops import ViTShape

    shape = ViTShape.from_model(timm.create_model("lvvit_s"))
    assert round(shape.forward_macs() / 1e9, 1) == 6.6  # TokenLabeling README: LV-ViT-S 6.6G
    # the stem (7x7 s2 + two 3x3 at 112x112, 64 channels) and the dense head run on every position under ToE too
    stem = 112 * 112 * 64 * (3 * 49 + 2 * 64 * 9)
    assert shape.patch_macs * 196 == pytest.approx(stem + 196 * (64 * 64 * 384 + 384 * 1000))


def _small(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("lvvit_t", img_size=64, num_classes=7, depth=3, **kwargs)


def test_training_returns_cls_dense_and_box_and_eval_combines_them():
    model = _small(mix_token=False)
    images = torch.randn(2, 3, 64, 64)
    cls_logits, dense, box = model.train()(images)
    assert cls_logits.shape == (2, 7) and dense.shape == (2, 16, 7) and box == (0, 0, 0, 0)
    model.eval()
    with torch.no_grad():
        x = model.forward_tokens(
            model.pos_drop(
                torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(images).flatten(2).transpose(1, 2)], 1)
                + model.pos_embed
            )
        )
        expected = model.head(x[:, 0]) + 0.5 * model.aux_head(x[:, 1:]).max(1)[0]
        torch.testing.assert_close(model(images), expected)


def test_mixtoken_swaps_a_box_of_the_feature_map_and_unmixes_the_dense_output():
    import numpy as np

    mixing, plain = _small(), _small(mix_token=False)
    plain.load_state_dict(mixing.state_dict())
    images = torch.randn(4, 3, 64, 64)  # four different images: the flipped batch differs from the batch
    for seed in range(20):  # a box neither empty nor the whole 4 x 4 grid
        np.random.seed(seed)
        cls_mixed, dense_mixed, box = mixing.train()(images)
        y1, x1, y2, x2 = box
        if 0 < (y2 - y1) * (x2 - x1) < 16:
            break
    # By hand: the box of each image's feature map comes from the image mirrored in the batch; the dense output is
    # mixed back, so each position's prediction lines up with its own image.
    with torch.no_grad():
        features = plain.patch_embed(images)
        mixed = features.clone()
        mixed[:, :, y1:y2, x1:x2] = features.flip(0)[:, :, y1:y2, x1:x2]
        tokens = plain._encode(mixed)
        grid = plain.aux_head(tokens[:, 1:]).reshape(4, 4, 4, -1)
        unmixed = grid.clone()
        unmixed[:, y1:y2, x1:x2] = grid.flip(0)[:, y1:y2, x1:x2]
        cls_unmixed = plain.head(plain.forward_features(images)[:, 0])
    torch.testing.assert_close(cls_mixed, plain.head(tokens[:, 0]))
    torch.testing.assert_close(dense_mixed, unmixed.reshape(4, 16, -1))
    assert not torch.allclose(cls_mixed, cls_unmixed, atol=1e-4)  # mixing changed what the class token saw


def test_toe_patch_keeps_weights_and_eval_and_restores_zero_padded_positions():
    model = _small(mix_token=False)
    plain = copy.deepcopy(model).eval()
    keys = set(model.state_dict())
    toe.patch(model, LVVIT_SCRIPT)
    assert set(model.state_dict()) == keys and toe.expansion_op(model) is model.token_expansion
    images = torch.randn(2, 3, 64, 64)
    toe.set_epoch(model, 50)
    torch.testing.assert_close(model.eval()(images), plain(images))  # full tokens at evaluation

    model.train()
    tokens = torch.randn(2, 17, 240)
    restored = model.forward_tokens(tokens)
    assert restored.shape == (2, 17, 240)
    kept = LVVIT_SCRIPT.kept_tokens(16, 1)  # 6 of 16 patches (3 seeds + 3 expanded)
    zero_rows = restored.abs().sum(-1) == 0
    assert zero_rows.sum(1).tolist() == [16 - kept] * 2 and not zero_rows[:, 0].any()
    # the non-zero rows are exactly the reduced run, placed at the kept positions
    reduced, index = model.token_expansion(model.blocks[0](tokens))
    for block in model.blocks[1:]:
        reduced = block(reduced)
    reduced = model.norm(reduced)
    torch.testing.assert_close(restored.gather(1, index.unsqueeze(-1).expand(-1, -1, 240)), reduced)
    cls_logits, dense, _ = model(images)
    assert dense.shape == (2, 16, 7)
    # positions merged away reach the dense head as zero vectors: their logits are its bias alone
    is_bias = torch.isclose(dense, model.aux_head.bias.expand_as(dense)).all(-1)
    assert is_bias.sum(1).tolist() == [16 - kept] * 2


def test_patching_lvvit_twice_replaces_the_schedule_and_the_model_stays_toe_agnostic():
    from toe.hosts import expansion_ops
    from toe.models.lvvit import LVViT

    model = _small(mix_token=False)
    assert not hasattr(model, "token_expansion")  # the host knows nothing of ToE
    toe.patch(model, LVVIT_SCRIPT)
    patched_class = type(model)
    other = ExpansionSchedule([0, 1], [0.5, 1.0], 0.25)
    toe.patch(model, other)
    assert type(model) is patched_class and isinstance(model, LVViT) and type(model).__name__ == "ToELVViT"
    assert toe.expansion_op(model).schedule is other and len(list(expansion_ops(model))) == 1
    clone = copy.deepcopy(model)  # what ModelEmaV3 does
    assert type(clone) is patched_class and toe.expansion_op(clone).schedule == other
