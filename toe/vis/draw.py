"""Pictures of what a token-reduction op keeps: per image and stage, which patches ToE took as seeds, which each
expansion sub-step added, and which it merged into which kept token (Token Merging: the merged groups; PatchDropout:
the kept patches). The layouts are computed by the ops' own functions (:func:`toe.ops.expansion.select_tokens`,
:func:`toe.ops.merging.merge_destinations`, timm's dropping), then drawn with matplotlib.

Reading a picture: every kept token and the patches merged into it share one fill colour (a kept token that took
nothing in is not filled); a kept token has a thick border whose colour says how it was chosen (seed, expansion
sub-step 1, 2, ...); a patch without a border was merged into the kept token of its colour, or (grey) dropped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from toe.ops.expansion import TokenExpansion, random_seeds, select_tokens, spatial_seeds
from toe.ops.merging import TokenMerging, merge_destinations
from toe.ops.patch_dropout import ScheduledPatchDropout
from toe.ops.schedule import ExpansionSchedule

MERGED, DROPPED = -1, -2  # categories of patches that are not kept tokens


@dataclass(frozen=True)
class Layout:
    """What one op did to the ``n`` patches of one image in one stage.

    - category ``[n]``: how each kept token was chosen (0 seed, ``k`` expansion sub-step ``k``; for Token Merging 0
      for every resulting token), :data:`MERGED` or :data:`DROPPED` for the others;
    - group ``[n]``: the patch whose token each patch ended in (a kept token: itself; dropped: -1).
    - names: what each category >= 0 is called, in order.
    """

    grid: Tuple[int, int]
    category: np.ndarray
    group: np.ndarray
    names: Tuple[str, ...]
    title: str = ""

    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.category >= 0)


def toe_layout(
    patches: torch.Tensor,
    schedule: ExpansionSchedule,
    stage: int,
    grid: Tuple[int, int],
    seeds: Optional[torch.Tensor] = None,
) -> Layout:
    """ToE's choice for the patch tokens ``patches`` ``[n, D]`` of one image (after the first block) at ``stage``,
    as :func:`toe.ops.expansion.expand_tokens` makes it: seeds, each sub-step's additions (earlier stages' replayed
    first), and the kept token each other patch is merged into (or dropped, with ``merge="drop"``)."""
    n = patches.shape[0]
    if seeds is None:
        seeds = (
            spatial_seeds(n, schedule.init_keep_rate, patches.device)
            if schedule.init == "spatial"
            else random_seeds(1, n, schedule.num_seeds(n), patches.device)[0]
        )
    substeps = schedule.substeps(n, stage) if not schedule.is_identity(stage) else []
    keep, rest, nearest = select_tokens(
        patches.unsqueeze(0).float(), seeds, substeps, schedule.distance, schedule.expand
    )
    keep, rest, nearest = keep[0].cpu().numpy(), rest[0].cpu().numpy(), nearest[0].cpu().numpy()
    if schedule.is_identity(stage):
        return full_layout(grid, f"stage {stage}: all {n} tokens")
    category = np.full(n, MERGED if schedule.merge == "mean" else DROPPED)
    sizes = [len(seeds)] + [s for s in substeps if s > 0]
    bounds = np.cumsum([0] + sizes)
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        category[keep[start:end]] = index
    group = np.full(n, -1)
    group[keep] = keep
    if schedule.merge == "mean":
        group[rest] = keep[nearest[rest]]
    names = ("seed",) + tuple(f"expansion {k}" for k in range(1, len(sizes)))
    return Layout(grid, category, group, names, f"stage {stage}: {len(keep)} of {n} kept")


def full_layout(grid: Tuple[int, int], title: str) -> Layout:
    """Every token kept (a full-token stage): drawn as the plain image."""
    n = grid[0] * grid[1]
    return Layout(grid, np.zeros(n, dtype=int), np.arange(n), (), title)


def merging_layout(source: np.ndarray, grid: Tuple[int, int], title: str = "") -> Layout:
    """Token Merging: ``source`` ``[n]`` the output token of each patch; each token's group is drawn from its first
    patch, which counts as the kept one."""
    n = len(source)
    first = {}
    for patch, token in enumerate(source):
        first.setdefault(int(token), patch)
    group = np.array([first[int(t)] for t in source])
    category = np.where(group == np.arange(n), 0, MERGED)
    if len(first) == n:
        return full_layout(grid, title or f"all {n} tokens")
    return Layout(grid, category, group, ("token",), title or f"{len(first)} tokens of {n}")


def dropout_layout(kept: np.ndarray, n: int, grid: Tuple[int, int], title: str = "") -> Layout:
    if len(kept) == n:
        return full_layout(grid, title or f"all {n} tokens")
    category = np.full(n, DROPPED)
    category[kept] = 0
    group = np.where(category == 0, np.arange(n), -1)
    return Layout(grid, category, group, ("kept",), title or f"{len(kept)} of {n} kept")


@contextlib.contextmanager
def _reducing_in_eval(model: nn.Module, op: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout, drop-path) with its op reducing as in training."""
    was_training, sparse = model.training, getattr(op, "sparse_eval", None)
    model.eval()
    if sparse is not None:
        op.sparse_eval = True
    try:
        yield
    finally:
        model.train(was_training)
        if sparse is not None:
            op.sparse_eval = sparse


@torch.no_grad()
def capture_layouts(model: nn.Module, images: torch.Tensor, grid: Tuple[int, int]) -> List[List[Layout]]:
    """Layouts ``[image][stage]`` of ``model``'s token-reduction op (ToE, Token Merging or PatchDropout) for every
    stage of its schedule; ``images`` are the model's normalised inputs."""
    from toe.hosts import reduction_op

    op = reduction_op(model)
    if op is None:
        raise ValueError("the model has no token-reduction op (method=baseline?): nothing to draw")
    stage_before = op.stage
    stages = range(1, op.schedule.num_stages + 1)
    layouts: List[List[Layout]] = [[] for _ in range(images.shape[0])]
    try:
        for stage in stages:
            op.stage = stage
            for index, layout in enumerate(_stage_layouts(model, op, images, grid, stage)):
                layouts[index].append(layout)
    finally:
        op.stage = stage_before
    return layouts


def _stage_layouts(
    model: nn.Module, op: nn.Module, images: torch.Tensor, grid: Tuple[int, int], stage: int
) -> List[Layout]:
    n, p = grid[0] * grid[1], op.num_prefix_tokens
    if isinstance(op, ScheduledPatchDropout):
        rate = op.schedule.keep_rate(stage)
        with _reducing_in_eval(model, op):
            op.train()
            _, kept = op.forward_with_indices(torch.zeros(images.shape[0], p + n, 1))
        kept = kept if kept is not None else torch.arange(n).expand(images.shape[0], -1)
        return [dropout_layout(k.numpy(), n, grid, f"stage {stage}: kept rate {rate:g}") for k in kept]
    captured: List = []
    if isinstance(op, TokenExpansion):
        hook = op.register_forward_hook(lambda module, args, output: captured.append(args[0]))
    elif isinstance(op, TokenMerging):
        hook = op.register_forward_hook(lambda module, args, output: captured.append(output[2]))
    else:
        raise ValueError(f"no picture for {type(op).__name__}")
    try:
        with _reducing_in_eval(model, op):
            model(images)
    finally:
        hook.remove()
    if isinstance(op, TokenExpansion):
        tokens = captured[0][:, p:]
        return [toe_layout(t, op.schedule, stage, grid) for t in tokens]
    source = torch.arange(p + n).expand(images.shape[0], -1)
    for matching in captured:
        if matching is not None:
            source = merge_destinations(matching).gather(1, source)
    r = op.schedule.r(stage)
    return [
        merging_layout((s[p:] - p).numpy(), grid, f"stage {stage}: r {r:g}, {len(torch.unique(s)) - p} tokens")
        for s in source
    ]


def _palette(count: int) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return np.array([cmap(i % 20)[:3] for i in range(count)])


CATEGORY_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def draw_grid(pictures: Sequence[np.ndarray], layouts: Sequence[Sequence[Layout]], title: str = ""):
    """A matplotlib figure: one row per image (``pictures``: ``[H, W]`` or ``[H, W, 3]`` in 0..1), one column per
    stage. Fill colour: the kept token a patch went into; thick border: a kept token, coloured by how it was chosen
    (legend); grey: dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    rows, cols = len(pictures), max(len(row) for row in layouts)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows + 0.8), squeeze=False)
    names: Tuple[str, ...] = ()
    for r, (picture, row) in enumerate(zip(pictures, layouts)):
        height, width = picture.shape[:2]
        for c, layout in enumerate(row):
            ax = axes[r][c]
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(layout.title, fontsize=9)
            if not layout.names:  # every token kept: nothing to mark
                continue
            gh, gw = layout.grid
            ph, pw = height / gh, width / gw
            members = np.bincount(layout.group[layout.group >= 0], minlength=gh * gw)
            groups = [g for g in range(gh * gw) if members[g] > 1]  # kept tokens something was merged into
            colours = dict(zip(groups, _palette(len(groups))))
            for patch in range(gh * gw):
                y, x = divmod(patch, gw)
                group, category = int(layout.group[patch]), int(layout.category[patch])
                if category == DROPPED or group in colours:
                    face = (0.5, 0.5, 0.5) if category == DROPPED else colours[group]
                    ax.add_patch(
                        Rectangle(
                            (x * pw - 0.5, y * ph - 0.5),
                            pw,
                            ph,
                            facecolor=face,
                            alpha=0.75 if category == DROPPED else 0.45,
                            edgecolor="none",
                        )
                    )
                if category >= 0:
                    edge = CATEGORY_COLOURS[category % len(CATEGORY_COLOURS)]
                    ax.add_patch(
                        Rectangle(
                            (x * pw - 0.5 + 0.6, y * ph - 0.5 + 0.6),
                            pw - 1.2,
                            ph - 1.2,
                            facecolor="none",
                            edgecolor=edge,
                            linewidth=2.2,
                        )
                    )
            if len(layout.names) > len(names):
                names = layout.names
        for c in range(len(row), cols):
            axes[r][c].axis("off")
    handles = [
        Line2D([], [], color=CATEGORY_COLOURS[i % len(CATEGORY_COLOURS)], linewidth=3, label=name)
        for i, name in enumerate(names)
    ]
    present = {int(c) for row in layouts for layout in row for c in np.unique(layout.category)}
    if MERGED in present:
        handles.append(
            Patch(
                facecolor="none",
                edgecolor="black",
                linewidth=0.5,
                label="no border: merged into the kept token of its fill colour",
            )
        )
    if DROPPED in present:
        handles.append(Patch(facecolor=(0.5, 0.5, 0.5), alpha=0.75, label="grey: dropped"))
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def load_model(run_dir: Optional[Path], overrides: Optional[List[str]], use_ema: bool = False) -> Tuple[Any, Any, Any]:
    """The run's model with its op and trained weights (or an untrained one from ``overrides``), its config and its
    validation set (built once: the class count sizes the model, the images are drawn)."""
    from omegaconf import OmegaConf
    from timm.models import clean_state_dict

    from toe.config.compose import compose_config
    from toe.config.validate import checked_config
    from toe.data.datasets import build_datasets
    from toe.train.build import apply_token_reduction, create_model
    from toe.train.checkpoint import load_checkpoint
    from toe.train.record import CHECKPOINT_FILE, CONFIG_FILE

    cfg = compose_config(overrides or [])
    if run_dir is not None:
        config = run_dir / CONFIG_FILE
        if not config.is_file():
            raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE} (not a toe-train run dir)")
        # the run's resolved config over today's defaults: a run written before a key existed gets its default
        cfg = OmegaConf.merge(cfg, OmegaConf.load(config))
    cfg, plan = checked_config(cfg, devices=False)
    train_set, val_set = build_datasets(cfg)
    model = create_model(cfg, cfg.data.num_classes or len(train_set.classes))
    apply_token_reduction(model, cfg, plan)
    if run_dir is not None:
        state = load_checkpoint(run_dir / CHECKPOINT_FILE)
        if state is None:
            raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT_FILE} to draw the trained model from")
        weights = state["model_ema"] if use_ema and state.get("model_ema") else state["model"]
        model.load_state_dict(clean_state_dict(weights))  # DDP's and torch.compile's prefixes off
    return model.eval(), cfg, val_set


def load_images(cfg: Any, model: Any, folder: Optional[Path], count: int, val_set: Any):
    """``count`` images as the model's normalised eval inputs ``[B, 3, H, W]`` and as pictures ``[H, W, 3]`` in 0..1
    (the same crop, so the patch grid lines up): from ``folder``, else from ``val_set`` (the run's)."""
    import numpy as np
    import torch
    from PIL import Image

    from toe.data.datasets import build_transforms
    from toe.train.build import model_data_config

    data_config = model_data_config(model, cfg)
    _, transform = build_transforms(data_config, cfg.recipe)
    if folder is not None:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
        if not files:
            raise FileNotFoundError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        images = [Image.open(p).convert("RGB") for p in files]
    else:
        val_set.transform = None
        images = [val_set[i][0] for i in range(min(count, len(val_set)))]
    inputs = torch.stack([transform(image) for image in images])
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    pictures = (inputs * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return inputs, [np.ascontiguousarray(p) for p in pictures]


def draw_run(
    out: Path,
    run_dir: Optional[Path] = None,
    overrides: Optional[List[str]] = None,
    images: Optional[Path] = None,
    count: int = 4,
    use_ema: bool = False,
) -> Tuple[int, int]:
    """Draw a run's (or an untrained config's) token-reduction op on ``count`` images into the PNG ``out``;
    returns (images, stages)."""
    from toe.hosts import reduction_op

    model, cfg, val_set = load_model(run_dir, overrides, use_ema)
    inputs, pictures = load_images(cfg, model, images, count, val_set)
    grid = tuple(model.patch_embed.grid_size)
    layouts = capture_layouts(model, inputs, grid)
    title = (
        f"{cfg.method_name} on {cfg.model.label or cfg.model.name} ({grid[0]}x{grid[1]} patches): "
        f"{type(reduction_op(model)).__name__}"
    )
    figure = draw_grid(pictures, layouts, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return len(pictures), len(layouts[0])
