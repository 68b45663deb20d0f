"""Visual prompt tuning (toe.hosts.prompts): what the prompted model computes, what trains, and ToE, ToMe and
PatchDropout keeping the prompts aside."""

import copy
import math

import pytest
import timm
import torch
from conftest import compose_cfg

from toe.config.schema import ConfigError
from toe.config.validate import validate
from toe.cost.flops import ViTShape
from toe.hosts import patch, patch_dropout, patch_merging, reduction_op, set_epoch
from toe.hosts.prompts import add_prompts, trained_parameters
from toe.ops.patch_dropout import KeptRateSchedule
from toe.ops.schedule import ExpansionSchedule, MergeSchedule

PROMPTS = 3


def _vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = dict(img_size=32, patch_size=4, depth=3, embed_dim=48, num_heads=3, num_classes=7)
    return timm.create_model("vit_tiny_patch16_224", **{**settings, **kwargs})


def _reference(model: torch.nn.Module, x: torch.Tensor, deep: bool) -> torch.Tensor:
    """What VPT's code computes, written out by hand: prompts concatenated after the class token, replaced before
    every later block (deep), the head on the class token."""
    tokens = model.patch_embed(x)
    tokens = timm.models.vision_transformer.VisionTransformer._pos_embed(model, tokens)
    batch, prompts = x.shape[0], model.prompts.tokens
    tokens = torch.cat([tokens[:, :1], prompts[0].expand(batch, -1, -1), tokens[:, 1:]], dim=1)
    for index, block in enumerate(model.blocks):
        if deep and index > 0:
            tokens = torch.cat([tokens[:, :1], prompts[index].expand(batch, -1, -1), tokens[:, 1 + PROMPTS :]], 1)
        tokens = timm.models.vision_transformer.Block.forward(block, tokens)
    return model.head(model.fc_norm(model.norm(tokens)[:, 0]))


@pytest.mark.parametrize("deep", [False, True])
def test_with_all_tokens_the_prompted_model_computes_what_vpt_does(deep):
    model = add_prompts(_vit(), PROMPTS, deep, dropout=0.1).eval()
    assert model.prompts.tokens.shape == (3 if deep else 1, PROMPTS, 48)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), _reference(model, x, deep), atol=1e-6)
    # VPT's initialisation: uniform in +-sqrt(6 / (3 * patch area + dim))
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 48))
    assert model.prompts.tokens.abs().max() <= bound and model.prompts.tokens.abs().max() > 0.8 * bound


def test_only_the_prompts_and_the_head_train_and_the_backbone_stays_as_it_was():
    from timm.optim import create_optimizer_v2

    model = add_prompts(_vit(drop_path_rate=0.5), PROMPTS, deep=True, dropout=0.0, num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = create_optimizer_v2(model, "momentum", lr=0.5, weight_decay=1e-4)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in optimized}
    assert names == {"prompts.tokens", "head.weight", "head.bias"} and model.head.out_features == 5
    assert trained_parameters(model) == (3 * PROMPTS * 48 + 48 * 5 + 5, sum(p.numel() for p in model.parameters()))
    model.train()
    # VPT's train(): the backbone in eval mode (no drop-path: two passes agree), the prompts and head training
    assert not model.blocks[0].training and not model.blocks[0].drop_path1.training
    assert model.prompts.training and model.head.training and model.training
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model(x), model(x))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        assert all((p.grad is not None) == (name in names) for name, p in model.named_parameters())
        optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"prompts.tokens", "head.weight", "head.bias"}


def test_the_emas_copy_has_prompts_of_its_own():
    model = add_prompts(_vit(), PROMPTS, deep=True).eval()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        twin.prompts.tokens[1:] += torch.randn_like(twin.prompts.tokens[1:])  # the deep prompts of the copy only
    assert torch.equal(model(x), _reference(model, x, True))
    assert torch.allclose(twin(x), _reference(twin, x, True), atol=1e-6) and not torch.allclose(twin(x), model(x))


def _block_inputs(model: torch.nn.Module, x: torch.Tensor):
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in model.blocks]
    model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("reducer", ["toe", "tome", "patchdropout"])
def test_every_reducer_keeps_the_prompts_whole_in_every_block(reducer):
    model = add_prompts(_vit(), PROMPTS, deep=True, dropout=0.0)
    if reducer == "toe":
        patch(model, ExpansionSchedule([0, 1, 2], [0.25, 0.5, 1.0], 0.125))
    elif reducer == "tome":
        patch_merging(model, MergeSchedule([0, 1, 2], (8, 4, 0)))
    else:
        patch_dropout(model, KeptRateSchedule([0, 1, 2], (0.25, 0.5, 1.0)))
    assert reduction_op(model).num_prefix_tokens == 1 + PROMPTS
    set_epoch(model, 0)
    model.train()
    assert reduction_op(model).training and not model.blocks[1].training
    x = torch.randn(2, 3, 32, 32)
    inputs = _block_inputs(model, x)
    prompts = model.prompts.tokens
    for index, tokens in enumerate(inputs[1:], start=1):
        # the hook that records a block's input runs after the block's prompt hook: each later block sees its set
        assert tokens.shape[1] < 1 + PROMPTS + 64
        assert torch.equal(tokens[:, 1 : 1 + PROMPTS], prompts[index].expand(2, -1, -1))
    if reducer == "toe":  # 16 of the 64 patches after the first block
        assert inputs[1].shape[1] == 1 + PROMPTS + 16
    shape = ViTShape.from_model(model)
    assert shape.num_prefix_tokens == 1 + PROMPTS
    reduced = model(x)
    loss = reduced.logsumexp(-1).mean()
    loss.backward()
    assert model.prompts.tokens.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0


def test_prompts_go_on_before_the_reducer_and_only_on_timms_vit():
    model = patch(_vit(), ExpansionSchedule([0, 1, 2], [0.25, 0.5, 1.0], 0.125))
    with pytest.raises(TypeError, match="before the token reducer"):
        add_prompts(model, PROMPTS, deep=True)
    eva = timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2)
    with pytest.raises(TypeError, match="needs a timm VisionTransformer"):
        add_prompts(eva, PROMPTS, deep=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["prompts.enabled=true"], "without finetune.path"),
        (["data=cifar10", "data.root=/tmp", "data.classes=[0,1]"], "only data=digits selects classes"),
        (["data.classes=[3,3]"], "each once"),
        (["data.classes=[3,12]"], "data.classes"),
    ],
)
def test_a_prompt_or_class_setting_that_cannot_work_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(["logger=none", *overrides]))


def test_vpts_lr_schedule_is_warm_up_then_cosine_over_the_rest():
    """recipe=vpt gives, epoch by epoch, VPT's WarmupCosineSchedule (KMnP/vpt src/solver/lr_scheduler.py)."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    from toe.config.schema import typed_config
    from toe.train.build import decay_epochs, timm_args

    recipe = typed_config(compose_cfg(["logger=none", "recipe=vpt"])).recipe
    assert (recipe.opt, recipe.momentum, recipe.warmup_epochs, recipe.warmup_prefix) == ("momentum", 0.9, 10, True)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    epochs = 100
    scheduler, _ = create_scheduler_v2(
        optimizer, **scheduler_kwargs(timm_args(recipe, epochs=decay_epochs(recipe, epochs))), updates_per_epoch=5
    )
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch + 1)

    def vpt(step: int, warmup: int = 10, total: int = 100) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup))))

    assert lrs == pytest.approx([0.1 * vpt(e) for e in range(epochs)], abs=1e-9)


def test_the_transfer_split_holds_digits_the_backbone_never_saw():
    from toe.config.schema import typed_config
    from toe.data.datasets import build_datasets, class_count

    sets = {}
    for name in ("digits", "digits_pretrain", "digits_transfer"):
        cfg = typed_config(compose_cfg(["logger=none", f"data={name}"]))
        sets[name] = build_datasets(cfg)
        assert class_count(cfg) == len(sets[name][0].classes)
    full_train, _ = sets["digits"]
    pretrain, transfer = sets["digits_pretrain"][0], sets["digits_transfer"][0]
    assert pretrain.classes == ["0", "1", "2", "3", "4"] and transfer.classes == ["5", "6", "7", "8", "9"]
    assert sorted(set(pretrain.targets)) == sorted(set(transfer.targets)) == [0, 1, 2, 3, 4]
    assert not set(pretrain.names) & set(transfer.names)
    assert len(pretrain) + len(transfer) == len(full_train)
    # the same images, split as in data=digits, labels shifted
    index = {name: i for i, name in enumerate(full_train.names)}
    i = index[transfer.names[0]]
    assert full_train.targets[i] == transfer.targets[0] + 5
    assert full_train.images[i].tobytes() == transfer.images[0].tobytes()


@pytest.fixture(scope="module")
def digits_backbone(tmp_path_factory):
    """The embedded transfer task's backbone, built as README says (data=digits_pretrain, full tokens), shorter:
    16 epochs on the digits 0-4 (top-1 0.91 measured)."""
    from toe.train.task import train

    run_dir = tmp_path_factory.mktemp("backbone") / "run"
    summary = train(
        compose_cfg(["logger=none", "data=digits_pretrain", "method=baseline", "schedule.epochs=16"]), run_dir
    )
    assert summary.final_top1 > 0.8
    return run_dir / "checkpoint.pth"


def test_a_toe_vpt_run_on_the_transfer_digits_learns_with_the_backbone_frozen(digits_backbone, tmp_path):
    """finetune=vpt on the embedded transfer task (prompts tuned on the digits 5-9, which the backbone never saw),
    through ToE's three stages: the prompts and head learn, and every backbone weight in the run's checkpoint is
    the backbone's."""
    import json

    from toe.train.task import train

    backbone = torch.load(digits_backbone, weights_only=True)["model"]
    cfg = compose_cfg(
        [
            "logger=none",
            "finetune=vpt",
            f"finetune.path={digits_backbone}",
            "schedule.epochs=12",
            "schedule.length=12",
            "schedule.stage_starts=[0,4,8]",
            "recipe.warmup_epochs=1",
        ]
    )
    summary = train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4
    assert [r["tokens_after_first_block"] for r in rows[::4]] == [1 + 5 + 32, 1 + 5 + 48, 1 + 5 + 64]
    # chance: 0.2; 0.48 measured (0.79 in 30 epochs on README's backbone)
    assert summary.final_top1 > 0.35, summary.final_top1
    assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
    # the ToE stages save activation memory beside the last, full-token one
    assert rows[0]["activation_mib"] < rows[4]["activation_mib"] < rows[8]["activation_mib"]
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    frozen = [k for k in backbone if not k.startswith("head.")]
    assert all(torch.equal(saved[k], backbone[k]) for k in frozen)
    assert saved["prompts.tokens"].shape == (4, 5, 64) and saved["head.weight"].shape == (5, 64)
