"""YOLOS (toe.models.yolos) with ToE and PatchDropout (toe.hosts.yolos), DETR's loss (toe.models.detr) and COCO box
AP (toe.train.detection), against forwards written out here the way the official YOLOS code computes them."""

import math
from itertools import permutations

import pytest
import torch
from torch.nn import functional as F

import toe
from toe import ExpansionSchedule
from toe.models.detr import LossWeights, SetCriterion, hungarian_match, postprocess
from toe.models.yolos import Yolos, create_yolos, resample_grid
from toe.ops.reference import reference_expand_tokens

SCHEDULE = ExpansionSchedule([5, 50, 100], [0.5, 0.75, 1.0], 0.25, repeats=2)  # YOLOS-S's --expansion-step 5 50 100


def _yolos(mid: bool = True, det: int = 6, img: int = 32, **kwargs) -> Yolos:
    torch.manual_seed(0)
    return create_yolos(
        "vit_tiny_patch16_224",
        num_classes=11,
        det_tokens=det,
        init_pe_size=(img, img),
        mid_pe_size=(img, img) if mid else None,
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
        **kwargs,
    )


def _official_forward(model: Yolos, images: torch.Tensor, stage: int = 0) -> torch.Tensor:
    """The DET tokens as ToE/YOLOS/models/backbone_expansion.py computes them: [CLS, patches, DET] plus the
    interpolated position embedding; ToE before block 1 on [CLS, patches] (the DET tokens split off and appended);
    after every block but the last the mid position embedding, its [CLS, patches] part gathered at the kept
    indices."""
    bb, det = model.backbone, model.det_token_num
    batch, _, height, width = images.shape
    grid = (height // model.patch_size, width // model.patch_size)
    x = bb.patch_embed.proj(images).flatten(2).transpose(1, 2)
    pos = bb.pos_embed
    pos = torch.cat([pos[:, :1], resample_grid(pos[:, 1:-det], model.pe_grid, grid), pos[:, -det:]], dim=1)
    x = torch.cat([bb.cls_token.expand(batch, -1, -1), x, bb.det_token.expand(batch, -1, -1)], dim=1) + pos
    mids = model.mid_position_embeddings(grid)
    select = None
    for i, block in enumerate(bb.blocks):
        if i == 1:
            kept, select = reference_expand_tokens(x[:, :-det], SCHEDULE, stage, 1)
            x = torch.cat([kept, x[:, -det:]], dim=1)
        x = block(x)
        if mids is not None and i < len(bb.blocks) - 1:
            mid = mids[i]
            if select is not None:
                part = mid[:, :-det].expand(batch, -1, -1)
                part = part.gather(1, select[..., None].expand(-1, -1, part.shape[-1]))
                mid = torch.cat([part, mid[:, -det:].expand(batch, -1, -1)], dim=1)
            x = x + mid
    return bb.norm(x)[:, -det:]


@pytest.mark.parametrize("mid", [True, False])
def test_full_token_forward_is_yolos(mid):
    model = _yolos(mid).eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(images), _official_forward(model, images))
    out = model(images)
    assert out["pred_logits"].shape == (2, 6, 12) and out["pred_boxes"].shape == (2, 6, 4)
    assert out["pred_boxes"].min() >= 0 and out["pred_boxes"].max() <= 1


@pytest.mark.parametrize("mid", [True, False])
@pytest.mark.parametrize("stage", [1, 2])
def test_toe_on_yolos_is_the_official_split_reduce_append_with_gathered_mid_embeddings(mid, stage):
    model = _yolos(mid)
    images = torch.randn(3, 3, 32, 40)  # not the init grid: the embeddings are resampled to 8 x 10
    expected = _official_forward(model.eval(), images, stage)
    toe.patch(model, SCHEDULE).train()
    model.backbone.pos_drop.eval()
    for block in model.blocks:  # no dropout or drop-path in this model: train mode changes only the op
        assert not any(m.training and isinstance(m, torch.nn.Dropout) and m.p > 0 for m in block.modules())
    toe.set_epoch(model, {1: 5, 2: 50}[stage])
    torch.testing.assert_close(model.forward_features(images), expected, rtol=1e-5, atol=1e-5)
    assert model.token_expansion.num_suffix_tokens == 6
    assert model.state_dict().keys() == _yolos(mid).state_dict().keys()  # the op adds no parameter
    model.eval()  # full tokens at evaluation, as the official code
    torch.testing.assert_close(model.forward_features(images), _official_forward(model, images))


def test_toe_stage_zero_and_the_last_stage_are_full_tokens():
    model = toe.patch(_yolos(), SCHEDULE).train()
    images = torch.randn(2, 3, 32, 32)
    for epoch in (0, 4, 100):  # YOLOS starts ToE after 5 full-token epochs
        toe.set_epoch(model, epoch)
        torch.testing.assert_close(model.forward_features(images), _official_forward(model, images))


def test_patch_dropout_keeps_the_detection_tokens_and_gathers_mid_embeddings():
    from toe.ops.patch_dropout import KeptRateSchedule

    model = _yolos()
    toe.patch_dropout(model, KeptRateSchedule((0, 10), (0.5, 1.0))).train()
    toe.set_epoch(model, 0)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    out = model(torch.randn(2, 3, 32, 32))
    assert seen == [1 + 32 + 6] and out["pred_boxes"].shape == (2, 6, 4)
    kept = model._toe_kept
    assert kept.shape == (2, 1 + 32 + 6) and torch.equal(kept[:, -6:], torch.arange(65, 71).expand(2, -1))
    out["pred_boxes"].sum().backward()
    assert model.backbone.mid_pos_embed.grad is not None


def test_token_merging_is_refused_on_yolos():
    with pytest.raises(TypeError, match="Token Merging is not supported on YOLOS"):
        toe.patch_method(_yolos(), "tome", SCHEDULE, rs=[2, 1, 0])


def test_a_backbone_it_cannot_take_is_refused_in_one_line():
    import timm

    with pytest.raises(TypeError, match="class token"):
        Yolos(timm.create_model("vit_tiny_patch16_224", num_classes=0, class_token=False, global_pool="avg"), 11)


def test_the_detection_position_embedding_starts_from_the_backbones_resampled():
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2
    )
    table = backbone.pos_embed.detach().clone()
    model = Yolos(backbone, 11, det_tokens=5, init_pe_size=(48, 64))
    pos = model.backbone.pos_embed
    assert pos.shape == (1, 1 + 12 * 16 + 5, 32)
    torch.testing.assert_close(pos[:, :1], table[:, :1])
    grid = table[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(12, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:-5], expected.flatten(2).transpose(1, 2))
    assert model.position_embedding((12, 16)).shape == pos.shape
    assert model.position_embedding((6, 7)).shape == (1, 1 + 42 + 5, 32)


def test_hungarian_matching_is_the_cheapest_assignment():
    gen = torch.Generator().manual_seed(0)
    weights = LossWeights()
    logits, boxes = torch.randn(1, 5, 4, generator=gen), torch.rand(1, 5, 4, generator=gen) * 0.5 + 0.25
    target = {"labels": torch.tensor([0, 2, 1]), "boxes": torch.rand(3, 4, generator=gen) * 0.5 + 0.25}
    ((rows, cols),) = hungarian_match(logits, boxes, [target], weights)
    from torchvision.ops import box_convert, generalized_box_iou

    def cost(q, t):
        prob = logits[0, q].softmax(-1)[target["labels"][t]]
        l1 = (boxes[0, q] - target["boxes"][t]).abs().sum()
        xyxy = [box_convert(b[None], "cxcywh", "xyxy") for b in (boxes[0, q], target["boxes"][t])]
        return 5 * l1 - prob - 2 * generalized_box_iou(*xyxy)[0, 0]

    best = min(permutations(range(5), 3), key=lambda qs: sum(cost(q, t) for t, q in enumerate(qs)))
    assert sorted(zip(cols.tolist(), rows.tolist())) == list(enumerate(best))


def test_set_loss_is_zero_for_boxes_on_target_and_learns_no_object_elsewhere():
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1], [0.7, 0.6, 0.2, 0.4]]])
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 1] = 10.0  # class 3 = no object for the middle token
    target = {"labels": torch.tensor([1, 2]), "boxes": boxes[0, [2, 0]]}
    criterion = SetCriterion(3)
    loss = criterion({"pred_logits": logits, "pred_boxes": boxes}, [target])
    assert float(loss) < 1e-4
    assert all(float(v) < 1e-4 for v in criterion.parts.values())
    logits[0, 1, 3], logits[0, 1, 0] = -10.0, 10.0  # the unmatched token now claims an object
    # cross-entropy 20 at "no object"'s weight 0.1, in a mean weighted 1 + 1 + 0.1
    loss = float(criterion({"pred_logits": logits, "pred_boxes": boxes}, [target]))
    assert loss == pytest.approx(0.1 * 20 / 2.1, rel=1e-3)


def test_an_image_without_objects_only_learns_no_object():
    criterion = SetCriterion(3)
    logits = torch.randn(2, 4, 4, requires_grad=True)
    boxes = torch.rand(2, 4, 4, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    loss = criterion({"pred_logits": logits, "pred_boxes": boxes}, [empty, empty])
    loss.backward()
    assert math.isfinite(float(loss)) and float(criterion.parts["loss_bbox"]) == 0.0
    assert logits.grad.abs().sum() > 0


def test_postprocess_gives_pixel_boxes_of_the_original_size():
    outputs = {"pred_logits": torch.tensor([[[0.0, 5.0, 0.0]]]), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.25]]])}
    (found,) = postprocess(outputs, torch.tensor([[40, 80]]))
    assert found["labels"].tolist() == [1]
    torch.testing.assert_close(found["boxes"], torch.tensor([[20.0, 15.0, 60.0, 25.0]]))


def test_an_image_that_is_no_whole_number_of_patches_loses_its_last_rows_as_in_yolos():
    model = _yolos().eval()
    images = torch.randn(2, 3, 35, 42)
    torch.testing.assert_close(model.forward_features(images), _official_forward(model, images[..., :32, :40]))
