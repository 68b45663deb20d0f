import numpy as np
import pytest
import torch

import toe
from toe.ops.merging import bipartite_soft_matching, merge_destinations
from toe.vis.draw import MERGED, draw_grid, merging_layout, toe_layout

SCHED = toe.ExpansionSchedule((0, 10, 20), (0.5, 0.75, 1.0), 0.25, repeats=2)


def test_toe_layout_is_what_the_operator_kept_and_merged():
    torch.manual_seed(0)
    x = torch.randn(1, 1 + 16, 8)
    for stage in (1, 2):
        y, idx = toe.expand_tokens(x, SCHED, stage)
        layout = toe_layout(x[0, 1:], SCHED, stage, (4, 4))
        kept = (idx[0, 1:] - 1).tolist()
        assert sorted(layout.kept().tolist()) == sorted(kept)
        # seeds: every int(1 // 0.25) = 4th patch
        assert sorted(np.flatnonzero(layout.category == 0).tolist()) == [0, 4, 8, 12]
        # the operator's output token of each kept patch is the mean of the patches drawn in its colour
        for position, patch in enumerate(kept, start=1):
            members = np.flatnonzero(layout.group == patch)
            torch.testing.assert_close(y[0, position], x[0, 1 + members].mean(0))
        # sub-steps in the order the schedule adds them, earlier stages replayed
        sizes = [np.sum(layout.category == k) for k in range(len(layout.names))]
        assert sizes == [4] + [s for s in SCHED.substeps(16, stage) if s]
    assert toe_layout(x[0, 1:], SCHED, 3, (4, 4)).names == ()  # full tokens: nothing to mark


def test_merging_layout_groups_the_patches_of_each_merged_token():
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 16, 8)
    matching = bipartite_soft_matching(x, 5)
    source = merge_destinations(matching)
    layout = merging_layout((source[0, 1:] - 1).numpy(), (4, 4))
    assert len(layout.kept()) == 16 - 5 and (layout.category == MERGED).sum() == 5
    for patch in range(16):
        assert source[0, 1 + patch] == source[0, 1 + layout.group[patch]]


def test_drawn_borders_and_fills_follow_the_layout():
    torch.manual_seed(0)
    x = torch.randn(1, 1 + 16, 8)
    layout = toe_layout(x[0, 1:], SCHED, 1, (4, 4))
    figure = draw_grid([np.zeros((32, 32))], [[layout]])
    rectangles = figure.axes[0].patches
    borders = [r for r in rectangles if r.get_linewidth() > 1]  # kept tokens: a thick border, no fill
    fills = [r for r in rectangles if r.get_linewidth() <= 1 or r.get_edgecolor()[3] == 0]
    merged_into = {int(g) for g in layout.group[layout.category == MERGED]}
    assert len(borders) == len(layout.kept())
    assert len(fills) == sum(int(np.sum(layout.group == g)) for g in merged_into)  # groups of two or more
    at = {(round(r.get_x() + 0.5), round(r.get_y() + 0.5)): r for r in fills}
    bordered = sorted((int(round(b.get_y() - 0.1)) // 8) * 4 + int(round(b.get_x() - 0.1)) // 8 for b in borders)
    assert bordered == sorted(layout.kept().tolist())
    for patch in np.flatnonzero(layout.category == MERGED):  # filled with the colour of the token it went into
        y, x_ = divmod(int(patch), 4)
        kept_y, kept_x = divmod(int(layout.group[patch]), 4)
        assert at[(x_ * 8, y * 8)].get_facecolor() == at[(kept_x * 8, kept_y * 8)].get_facecolor()


def test_toe_vis_draws_a_run_an_image_folder_and_an_untrained_config(tiny_cfg, tmp_path, capsys):
    from conftest import write_image_folder

    from toe.cli.vis import main
    from toe.train.task import train

    run = tmp_path / "run"
    train(tiny_cfg(), run)
    assert main([str(run)]) == 0 and (run / "token_vis.png").read_bytes()[:4] == b"\x89PNG"
    assert "(4 images x 3 stages)" in capsys.readouterr().out
    folder = write_image_folder(tmp_path / "images", size=40)
    assert main([str(run), "--images", str(folder / "val"), "-n", "2", "-o", str(tmp_path / "f.png")]) == 0
    assert "(2 images x 3 stages)" in capsys.readouterr().out
    assert main(["--config", "method=tome", "model.kwargs.depth=2", "-n", "1", "-o", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").stat().st_size > 5_000


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give a run dir or --config"),
        (["--config", "method=baseline"], "nothing to draw"),
        (["no_such_run"], "no config.yaml"),
    ],
)
def test_toe_vis_refuses_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from toe.cli.vis import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
