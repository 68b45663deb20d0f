"""The training step: gradient accumulation with a trailing partial window, and DDP's no_sync between updates."""

import copy
import socket

import pytest
import torch
from timm.scheduler import StepLRScheduler

from toe.train.step import StepConfig, train_one_epoch


def _batches(count: int):
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 3, generator=generator), torch.randint(0, 2, (4,), generator=generator)) for _ in range(count)
    ]


def _step(model: torch.nn.Module, accumulation: int) -> StepConfig:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return StepConfig(
        torch.nn.CrossEntropyLoss(),
        optimizer,
        StepLRScheduler(optimizer, decay_t=1000),
        torch.device("cpu"),
        accumulation=accumulation,
    )


def test_an_odd_batch_count_steps_its_trailing_window_with_the_loss_of_its_own_size():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    by_hand = copy.deepcopy(model)
    data = _batches(5)
    result = train_one_epoch(model, data, _step(model, accumulation=2), num_updates=0)
    assert result.num_updates == 3 and result.images == 20  # windows (0, 1), (2, 3) and the trailing (4)

    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    for window in ([0, 1], [2, 3], [4]):
        optimizer.zero_grad()
        for i in window:
            (torch.nn.functional.cross_entropy(by_hand(data[i][0]), data[i][1]) / len(window)).backward()
        optimizer.step()
    for trained, expected in zip(model.parameters(), by_hand.parameters()):
        torch.testing.assert_close(trained, expected)


def test_ddp_skips_the_all_reduce_on_every_micro_batch_but_the_last_of_a_window():
    from torch.nn.parallel import DistributedDataParallel

    class CountingDDP(DistributedDataParallel):
        skipped = 0

        def no_sync(self):
            CountingDDP.skipped += 1
            return super().no_sync()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Linear(3, 2)
        ddp = CountingDDP(copy.deepcopy(plain))
        data = _batches(7)
        result = train_one_epoch(ddp, data, _step(ddp, accumulation=3), num_updates=0)
        train_one_epoch(plain, data, _step(plain, accumulation=3), num_updates=0)
    finally:
        torch.distributed.destroy_process_group()
    assert result.num_updates == 3 and CountingDDP.skipped == 4  # windows of 3, 3, 1: two skips, two skips, none
    for trained, expected in zip(ddp.module.parameters(), plain.parameters()):
        torch.testing.assert_close(trained, expected)


def test_evaluation_counts_top1_and_top5_as_timm_does_over_uneven_batches():
    from timm.utils import accuracy

    from toe.train.step import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    inputs, targets = torch.randn(50, 3, 2, 2), torch.randint(0, 7, (50,))
    batches = [(inputs[i : i + 16], targets[i : i + 16]) for i in range(0, 50, 16)]  # 16, 16, 16, 2
    top1, top5 = evaluate(model, batches, torch.device("cpu"))
    expected1, expected5 = accuracy(model(inputs), targets, topk=(1, 5))
    assert top1 == pytest.approx(float(expected1) / 100) and top5 == pytest.approx(float(expected5) / 100)
    assert 0.0 < top1 < top5 < 1.0  # a random model: neither trivially right nor wrong


def _three_steps(optimizer_fn, recipe_overrides=()):
    """A small model after three steps of the optimizer that ``optimizer_fn(model, recipe)`` builds."""
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    recipe = OmegaConf.create(
        dict({"opt": "adamw", "weight_decay": 0.05, "momentum": 0.9, "opt_eps": 1e-8}, **dict(recipe_overrides))
    )
    optimizer = optimizer_fn(model, recipe)
    inputs, targets = _batches(1)[0][0].repeat(1, 2), torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_adamw_runs_torchs_fused_kernel_on_cpu_with_the_same_update_and_other_optimizers_as_timm_builds_them():
    from timm.optim import create_optimizer_v2

    from toe.train.build import create_optimizer

    fused_model, fused = _three_steps(lambda m, r: create_optimizer(m, r, 1e-2))
    plain_model, plain = _three_steps(
        lambda m, r: create_optimizer_v2(m, opt=r.opt, lr=1e-2, weight_decay=r.weight_decay, eps=r.opt_eps)
    )
    try:  # torch has a fused AdamW on CPU from 2.4
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
        cpu_kernel = True
    except RuntimeError:
        cpu_kernel = False
    assert bool(fused.defaults.get("fused")) is cpu_kernel and not plain.defaults.get("fused")
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _, sgd = _three_steps(lambda m, r: create_optimizer(m, r, 1e-2), {"opt": "sgd"})
    assert isinstance(sgd, torch.optim.SGD) and not sgd.defaults.get("fused")


def test_a_checkpoint_of_a_fused_optimizer_resumes_into_one_built_without_the_kernel():
    """A run checkpointed where torch has a fused kernel (a GPU) and resumed where it has none (an older torch's
    CPU): torch would take the checkpoint's fused flag and fail at the first step; the resumed optimizer keeps its
    own, and steps on from the checkpoint's moments."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from toe.train.build import create_optimizer
    from toe.train.checkpoint import TrainState

    model, fused = _three_steps(lambda m, r: create_optimizer(m, r, 1e-2))
    scheduler, _ = create_scheduler_v2(fused, sched="cosine", num_epochs=4)
    checkpoint = TrainState(model, fused, scheduler).state_dict()
    plain = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05)
    TrainState(model, plain, create_scheduler_v2(plain, sched="cosine", num_epochs=4)[0]).load_state_dict(checkpoint)
    assert [group["fused"] for group in plain.param_groups] == [False] * len(plain.param_groups)
    moments = [plain.state[p]["exp_avg"].clone() for p in model.parameters()]
    assert all(m.abs().sum() > 0 for m in moments)  # the checkpoint's, not a fresh optimizer's
    torch.nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 1])).backward()
    plain.step()
    assert all(plain.state[p]["step"].item() == 4 for p in model.parameters())


@pytest.mark.parametrize("mixup", [0.0, 0.8])
def test_recipe_loss_bce_is_binary_cross_entropy_on_the_same_targets_as_deit_iii_trains(mixup):
    """DeiT III's --bce-loss: ``BCEWithLogitsLoss`` on the (mixed) one-hot targets, averaged over every logit."""
    from omegaconf import OmegaConf

    from toe.train.build import build_loss_and_mixup

    fields = dict(mixup=mixup, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.0, loss="bce")
    criterion, mixer = build_loss_and_mixup(OmegaConf.create(fields), num_classes=5)
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 5, generator=generator), torch.tensor([0, 3, 3, 1])
    targets = torch.nn.functional.one_hot(labels, 5).float()
    if mixer is not None:  # the step hands the loss Mixup's soft targets
        _, targets = mixer(torch.randn(4, 3, 8, 8, generator=generator), labels)
        assert ((targets > 0) & (targets < 1)).any()
    expected = torch.nn.BCEWithLogitsLoss()(logits, targets)
    torch.testing.assert_close(criterion(logits, targets if mixer is not None else labels), expected)
