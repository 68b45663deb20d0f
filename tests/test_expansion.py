from pathlib import Path

import pytest
import torch

from toe import ExpansionSchedule, TokenExpansion, expand_tokens
from toe.ops.expansion import random_seeds
from toe.ops.reference import reference_expand_tokens

# 20 cases produced by the official ToE code (TokenSelect, commit 01e52fe); format in tests/data/golden/README.md.
GOLDEN = Path(__file__).resolve().parent / "data" / "golden" / "toe_official_cases.pt"


def _golden_cases():
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("case_id", range(20))
def test_reproduces_official_golden_cases(case_id):
    case = _golden_cases()[case_id]
    sched = ExpansionSchedule(
        case["expansion_steps"], case["keep_rates"], case["init_keep_rate"], case["repeats"], case["distance"]
    )
    op = TokenExpansion(sched).train()
    op.set_epoch(case["epoch"])
    y, idx = op(case["x"])
    assert torch.equal(idx, case["idx"])
    torch.testing.assert_close(y, case["y"], rtol=0, atol=1e-12)


def _random_schedule(gen: torch.Generator):
    r1 = [0.3, 0.4, 0.5, 0.6][int(torch.randint(4, (1,), generator=gen))]
    last = [1.0, 0.9][int(torch.randint(2, (1,), generator=gen))]
    return dict(
        stage_starts=[0, 10, 20],
        keep_rates=[r1, (r1 + last) / 2, last],
        init_keep_rate=r1 / 2,
        repeats=int(torch.randint(1, 5, (1,), generator=gen)),
    )


@pytest.mark.parametrize("distance", ["cosine", "manhattan", "euclidean"])
@pytest.mark.parametrize("merge", ["mean", "drop"])
def test_matches_loop_reference_on_random_shapes(distance, merge):
    gen = torch.Generator().manual_seed(hash((distance, merge)) % 2**31)
    for _ in range(6):
        n = int(torch.randint(8, 120, (1,), generator=gen))
        prefix = int(torch.randint(0, 3, (1,), generator=gen))
        batch, dim = int(torch.randint(1, 4, (1,), generator=gen)), int(torch.randint(4, 24, (1,), generator=gen))
        sched = ExpansionSchedule(**_random_schedule(gen), distance=distance, merge=merge)
        x = torch.randn(batch, prefix + n, dim, generator=gen, dtype=torch.float64)
        for stage in range(sched.num_stages + 1):
            y, idx = expand_tokens(x, sched, stage, prefix)
            y_ref, idx_ref = reference_expand_tokens(x, sched, stage, prefix)
            assert torch.equal(idx, idx_ref), (n, prefix, sched, stage)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
            assert y.shape == (batch, prefix + sched.kept_tokens(n, stage), dim)


def test_random_init_matches_reference_given_the_same_seeds():
    sched = ExpansionSchedule([0, 10, 20], [0.5, 0.75, 1.0], 0.25, init="random")
    x = torch.randn(3, 1 + 64, 8, dtype=torch.float64)
    torch.manual_seed(7)
    y, idx = expand_tokens(x, sched, 2)
    torch.manual_seed(7)
    seeds = random_seeds(3, 64, sched.num_seeds(64), x.device)
    y_ref, idx_ref = reference_expand_tokens(x, sched, 2, seeds=seeds)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    spatial = ExpansionSchedule([0, 10, 20], [0.5, 0.75, 1.0], 0.25)
    assert not torch.equal(idx[:, 1:17], expand_tokens(x, spatial, 2)[1][:, 1:17])


def test_random_expansion_keeps_seeds_and_the_right_count():
    sched = ExpansionSchedule([0, 10, 20], [0.5, 0.75, 1.0], 0.25, expand="random")
    x = torch.randn(4, 1 + 64, 8)
    torch.manual_seed(0)
    _, idx_a = expand_tokens(x, sched, 2)
    torch.manual_seed(1)
    _, idx_b = expand_tokens(x, sched, 2)
    seeds = torch.arange(0, 64, 4)[:16] + 1
    assert torch.equal(idx_a[:, 1:17], seeds.expand(4, -1))
    assert idx_a.shape == (4, 1 + 48)
    assert all(len(set(row.tolist())) == 49 for row in idx_a)
    assert not torch.equal(idx_a, idx_b)
    widest = expand_tokens(x, ExpansionSchedule([0, 10, 20], [0.5, 0.75, 1.0], 0.25), 2)[1]
    assert not torch.equal(idx_a, widest)


def test_gradients_reach_kept_and_merged_tokens_and_not_dropped_ones():
    x = torch.randn(2, 1 + 64, 16, requires_grad=True)
    sched = ExpansionSchedule([0, 10, 20], [0.5, 0.75, 1.0], 0.25)
    y, idx = expand_tokens(x, sched, 1)
    y.sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all(), "every token is kept or merged, so every token gets a gradient"
    kept_grad = x.grad.gather(1, idx.unsqueeze(-1).expand(-1, -1, 16))
    assert (kept_grad.abs().sum(-1) > 0).all()

    x.grad = None
    dropped = ExpansionSchedule([0, 10, 20], [0.5, 0.75, 1.0], 0.25, merge="drop")
    y, idx = expand_tokens(x, dropped, 1)
    y.sum().backward()
    received = x.grad.abs().sum(-1) > 0
    mask = torch.zeros_like(received)
    mask.scatter_(1, idx, True)
    assert torch.equal(received, mask)


def test_merge_is_a_plain_mean_that_counts_the_kept_token_once():
    # 5 patch tokens, r0 = 0.25: one seed (patch 0); stage 1 (r1 = 0.5) adds int(5 * 0.25) = 1 token, the one
    # least similar to the seed (patch 1, cosine 0). Patches 2 and 4 are nearest patch 0, patch 3 nearest patch 1.
    cls = [5.0, 5.0]
    patches = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.3, 1.0], [1.0, 0.1]]
    x = torch.tensor([[cls] + patches])
    sched = ExpansionSchedule([0, 10], [0.5, 1.0], 0.25, repeats=1)
    y, idx = expand_tokens(x, sched, 1)
    assert idx.tolist() == [[0, 1, 2]]
    p = x[0, 1:]
    torch.testing.assert_close(y[0, 0], x[0, 0])
    torch.testing.assert_close(y[0, 1], (p[0] + p[2] + p[4]) / 3)
    torch.testing.assert_close(y[0, 2], (p[1] + p[3]) / 2)


def test_identity_in_eval_stage0_and_full_last_stage():
    sched = ExpansionSchedule([2, 10, 20], [0.5, 0.75, 1.0], 0.25)
    op = TokenExpansion(sched)
    x = torch.randn(2, 1 + 36, 8)
    for epoch, training in [(0, True), (25, True), (12, False)]:
        op.train(training)
        op.set_epoch(epoch)
        y, idx = op(x)
        assert y is x
        assert torch.equal(idx, torch.arange(37).expand(2, -1))
    op.train()
    op.set_epoch(12)
    assert op(x)[0].shape == (2, 1 + 27, 8)
    sparse = TokenExpansion(sched, sparse_eval=True).eval()
    sparse.set_epoch(12)
    assert sparse(x)[0].shape == (2, 1 + 27, 8)
    assert sparse.kept_tokens(36) == 27 and op.eval().kept_tokens(36) == 36


def test_order_is_prefix_then_ascending_seeds_then_expansion_order():
    sched = ExpansionSchedule([0, 10, 20], [0.5, 0.75, 1.0], 0.25, repeats=2)
    x = torch.randn(2, 3 + 64, 8)
    _, idx = expand_tokens(x, sched, 2, num_prefix_tokens=3)
    assert idx[:, :3].tolist() == [[0, 1, 2]] * 2
    assert torch.equal(idx[:, 3:19], (torch.arange(0, 64, 4) + 3).expand(2, -1))


def test_works_under_autocast():
    sched = ExpansionSchedule([0, 10, 20], [0.5, 0.75, 1.0], 0.25)
    x = torch.randn(2, 1 + 64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, idx = expand_tokens(x, sched, 1)
    assert y.shape == (2, 33, 16) and idx.dtype == torch.long


def test_unexpand_puts_each_kept_token_back_at_its_position_and_zeros_elsewhere():
    from toe.ops.expansion import unexpand

    schedule = ExpansionSchedule([0, 1, 2], [0.5, 0.75, 1.0], 0.25)
    x = torch.randn(3, 1 + 16, 8)
    reduced, idx = expand_tokens(x, schedule, 1)
    restored = unexpand(reduced, idx, x.shape[1])
    assert restored.shape == x.shape
    for b in range(3):
        kept = set(idx[b].tolist())
        for position in range(17):
            if position in kept:
                row = idx[b].tolist().index(position)
                assert torch.equal(restored[b, position], reduced[b, row])
            else:
                assert not restored[b, position].any()
    same, full = expand_tokens(x, schedule, 0)  # identity stage: nothing to put back
    assert unexpand(same, full, 17) is same


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_suffix_tokens_are_kept_whole_after_the_reduced_ones_as_yolos_splits_them(stage):
    """YOLOS's detection tokens: the official code splits them off, reduces ``[CLS, patches]`` and appends them
    again; the operator with ``num_suffix_tokens`` computes that, and its positions point at them."""
    sched = ExpansionSchedule([5, 50, 100], [0.5, 0.75, 1.0], 0.25, repeats=2)
    gen = torch.Generator().manual_seed(stage)
    x = torch.randn(3, 1 + 48 + 10, 16, generator=gen, dtype=torch.float64)
    y, idx = expand_tokens(x, sched, stage, num_prefix_tokens=1, num_suffix_tokens=10)
    y_ref, idx_ref = reference_expand_tokens(x[:, :-10], sched, stage, 1)
    torch.testing.assert_close(y, torch.cat([y_ref, x[:, -10:]], dim=1), rtol=0, atol=1e-12)
    assert torch.equal(idx[:, :-10], idx_ref)
    assert torch.equal(idx[:, -10:], torch.arange(49, 59).expand(3, -1))
    assert torch.equal(y, x.gather(1, idx[..., None].expand(-1, -1, 16))) or stage in (1, 2)  # merged: means
    op = TokenExpansion(sched, num_prefix_tokens=1, num_suffix_tokens=10).train()
    op.set_epoch({0: 0, 1: 5, 2: 50, 3: 100}[stage])
    assert op.block_tokens(48, 3)[1][0] == 1 + sched.kept_tokens(48, op.stage if stage else 0) + 10
    assert torch.equal(op(x)[0], y)
