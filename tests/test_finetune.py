import pytest
import timm
import torch
from conftest import write_image_folder

from toe.config.schema import ConfigError
from toe.models.pretrained import CheckpointMismatchError, load_pretrained
from toe.train.task import train

VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)  # the default model, conf/model/vit_cpu.yaml


@pytest.fixture
def digits_checkpoint(digits_teacher):
    return digits_teacher / "checkpoint.pth"


def test_loading_a_toe_checkpoint_replaces_the_head_and_keeps_the_backbone(digits_checkpoint):
    saved = torch.load(digits_checkpoint, weights_only=True)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **VIT)
    fresh_head = model.head.weight.clone()
    notes = load_pretrained(model, digits_checkpoint)
    assert notes == ["replaced head.weight (10, 64) -> (3, 64)", "replaced head.bias (10,) -> (3,)"]
    assert torch.equal(model.blocks[1].attn.qkv.weight, saved["model"]["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.head.weight, fresh_head)
    ema = timm.create_model("vit_tiny_patch16_224", num_classes=10, **VIT)
    load_pretrained(ema, digits_checkpoint, use_ema=True)
    assert torch.equal(ema.pos_embed, saved["model_ema"]["module.pos_embed"])


def test_position_embedding_is_resampled_for_another_resolution(digits_checkpoint):
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, **dict(VIT, img_size=48))
    notes = load_pretrained(model, digits_checkpoint)
    assert notes == ["resampled pos_embed (1, 65, 64) -> (1, 145, 64)"]


def test_weights_that_do_not_fit_name_the_mismatched_keys(digits_checkpoint):
    wider = timm.create_model("vit_tiny_patch16_224", num_classes=10, **dict(VIT, embed_dim=96, num_heads=3))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"shape mismatch cls_token: checkpoint \(1, 1, 64\), model "
        r"\(1, 1, 96\)",
    ):
        load_pretrained(wider, digits_checkpoint)
    deeper = timm.create_model("vit_tiny_patch16_224", num_classes=10, **dict(VIT, depth=5))
    with pytest.raises(CheckpointMismatchError, match="missing in checkpoint: blocks.4.norm1.weight"):
        load_pretrained(deeper, digits_checkpoint)


def test_fine_tuning_run_from_a_digits_checkpoint_on_another_class_count(digits_checkpoint, tiny_cfg, tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"))
    cfg = tiny_cfg(
        "model.kwargs.depth=4",
        "finetune=checkpoint",
        f"finetune.path={digits_checkpoint}",
        "data=imagefolder",
        f"data.root={root}",
        "recipe.batch_size=6",
        "schedule.epochs=1",
        "method=baseline",
    )
    summary = train(cfg, tmp_path / "ft")
    assert summary.status == "completed"
    assert torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)["model"]["head.weight"].shape == (3, 64)
    with pytest.raises(ConfigError, match="no such file"):
        train(tiny_cfg("finetune=checkpoint", "finetune.path=/nonexistent.pth"), tmp_path / "missing")
    assert not (tmp_path / "missing").exists()  # refused before anything is written


def test_timm_reads_a_toe_checkpoint_and_its_ema_weights(digits_checkpoint):
    from timm.models import load_state_dict

    saved = torch.load(digits_checkpoint, weights_only=True)
    weights, ema = load_state_dict(str(digits_checkpoint), use_ema=False), load_state_dict(str(digits_checkpoint))
    assert set(weights) == set(ema) == set(saved["model"])
    assert torch.equal(ema["pos_embed"], saved["model_ema"]["module.pos_embed"])
    assert not torch.equal(ema["pos_embed"], weights["pos_embed"])  # the EMA, not the raw weights
