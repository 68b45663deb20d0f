"""The training step: gradient accumulation with a trailing partial window, and DDP's no_sync between updates."""

import copy
import socket

import pytest
import torch
from timm.scheduler import StepLRScheduler

from toe.engine import StepConfig, train_one_epoch


def _batches(count: int):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, generator=generator), torch.randint(0, 2, (4,), generator=generator))
            for _ in range(count)]


def _step(model: torch.nn.Module, accumulation: int) -> StepConfig:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return StepConfig(torch.nn.CrossEntropyLoss(), optimizer, StepLRScheduler(optimizer, decay_t=1000),
                      torch.device("cpu"), accumulation=accumulation)


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

    from toe.engine import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 7))
    inputs, targets = torch.randn(50, 3, 2, 2), torch.randint(0, 7, (50,))
    batches = [(inputs[i:i + 16], targets[i:i + 16]) for i in range(0, 50, 16)]  # 16, 16, 16, 2
    top1, top5 = evaluate(model, batches, torch.device("cpu"))
    expected1, expected5 = accuracy(model(inputs), targets, topk=(1, 5))
    assert top1 == pytest.approx(float(expected1) / 100) and top5 == pytest.approx(float(expected5) / 100)
    assert 0.0 < top1 < top5 < 1.0  # a random model: neither trivially right nor wrong
