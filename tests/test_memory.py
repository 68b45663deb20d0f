"""The activation memory of a step (toe.cost.memory): counted exactly, without changing what the step computes."""

import pytest
import timm
import torch

from toe.cost.memory import SavedActivations
from toe.hosts import patch, set_epoch
from toe.ops.schedule import ExpansionSchedule


def test_the_count_is_the_bytes_autograd_saves_each_storage_once_and_no_parameter():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    x = torch.randn(32, 64, requires_grad=True)
    with SavedActivations(linear.parameters()) as saved:
        qkv = linear(x)  # saves x (its weight is a parameter: not counted)
        q, k, v = qkv.split(32, dim=1)  # three views of one storage
        out = (q * k * v).tanh()  # q*k saves q and k, (q*k)*v saves q*k and v, tanh its output
    out.sum().backward()
    floats = 32 * 64 + 32 * 96 + 32 * 32 + 32 * 32  # x, qkv (once for its three views), q*k, the tanh output
    assert saved.bytes == 4 * floats and saved.mib == pytest.approx(4 * floats / 2**20)


def test_counting_changes_neither_the_loss_nor_the_gradients():
    def step(counted: bool):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, drop_path_rate=0.1)
        x = torch.randn(4, 3, 32, 32)
        with (
            SavedActivations(model.parameters())
            if counted
            else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        ):
            loss = model(x).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    (loss_a, grads_a), (loss_b, grads_b) = step(True), step(False)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def _activations(model: torch.nn.Module, batch: int, compiled: bool = False) -> float:
    net = torch.compile(model) if compiled else model
    with SavedActivations(model.parameters()) as saved:
        loss = net(torch.randn(batch, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    return saved.mib


def _vit(depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=depth).train()


def test_the_count_grows_with_the_batch_and_falls_with_toes_tokens():
    full = _activations(_vit(), 8)
    assert _activations(_vit(), 16) == pytest.approx(2 * full, rel=0.01)
    model = patch(_vit(), ExpansionSchedule([0, 1, 2], [0.25, 0.5, 1.0], 0.125))
    reduced = {}
    for epoch in (0, 1, 2):
        set_epoch(model, epoch)
        reduced[epoch] = _activations(model, 8)
    # stage 1 keeps 16 of 64 patches after the first block, stage 2 32; the last stage every token
    assert reduced[0] < reduced[1] < full and reduced[2] == pytest.approx(full, rel=0.02)
    # blocks 2-4 hold 17 tokens in place of 65: the saving is most of theirs (3 of 4 blocks)
    assert 0.4 < 1 - reduced[0] / full < 0.75


def test_a_compiled_model_is_counted_as_the_eager_one():
    eager = _activations(_vit(2), 4)
    compiled = _activations(_vit(2), 4, compiled=True)
    assert compiled > 0.3 * eager  # the compiled graph saves fewer, fused intermediates, but is counted
    assert compiled <= eager * 1.05
