"""The config schema: one typed dataclass per node of ``conf/train.yaml``, registered in Hydra's ConfigStore.

``conf/train.yaml`` starts its defaults list with ``toe_schema``, so Hydra composes every option file onto these
types: an unknown key or a value of the wrong type is refused while the config is composed. What types cannot say
(ranges, choices, an image size the patch size must divide, a device that must exist) is checked by
:func:`validate` right after, before anything is written; the sweep check runs the same function for every job.

The values live in the YAML files, never here (every field is ``???`` until a config sets it): this module holds
types, ranges and choices only.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf

from .schedule import DISTANCES, EXPAND_MODES, INIT_MODES, MERGE_MODES, scale_epoch

SCHEMA_NAME = "toe_schema"
# Top-level keys that only some experiments set (and read through interpolations): missing is fine elsewhere.
# They are inputs rather than defaults because a YAML ``???`` cannot replace a value already set, e.g. null.
EXPERIMENT_INPUTS = ("label_maps", "pretrained")
DATASETS = ("digits", "imagefolder", "imagenet", "cifar10", "cifar100")
PIPELINES = ("auto", "tensor", "pil")
AMP_MODES = ("auto", "bf16", "fp16", "off")
WANDB_MODES = ("online", "offline", "disabled")
RANDOM_ERASE_MODES = ("pixel", "rand", "const")
INTERPOLATIONS = ("random", "bilinear", "bicubic", "nearest")
# timm's schedulers that toe's epoch loop can drive (plateau needs the eval metric at every step, which it is not given)
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant")
REDUCTION_NODES = ("toe", "patch_dropout", "tome")  # the token-reduction methods whose stages follow `schedule`


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line that names the key and the value."""


def _spec(
    default: Any = MISSING,
    *,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
    choices: Optional[Sequence[Any]] = None,
) -> Any:
    """A field whose value (each element, for a list) must satisfy the bounds and choices given."""
    rules = {
        name: value
        for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices))
        if value is not None
    }
    return field(default=default, metadata=rules)


@dataclass
class PatchDropoutConfig:
    """PatchDropout with a kept-rate schedule (toe.patch_dropout); the stage start epochs come from ``schedule``."""

    enabled: bool = False
    # one per stage of `schedule`; null: per stage the rate whose train FLOPs match the `toe:` operator's (toe.plan)
    keep_rates: Optional[List[float]] = _spec(None, gt=0.0, le=1.0)


@dataclass
class MergingConfig:
    """Token Merging (toe.merging) with ``r`` per stage; the stage start epochs come from ``schedule``."""

    enabled: bool = False
    # tokens merged in every block, one per stage of `schedule`; null: per stage the r whose train FLOPs match the
    # `toe:` operator's (toe.plan)
    r: Optional[List[float]] = _spec(None, ge=0.0)  # a fractional r spreads over the blocks (toe.merging.block_r)
    prop_attn: bool = True  # size-weighted (proportional) attention, as the paper
    sparse_eval: bool = False  # merge at evaluation too


@dataclass
class ToEConfig:
    """The operator (toe.ExpansionSchedule); the stage start epochs come from ``schedule``."""

    enabled: bool = MISSING
    keep_rates: List[float] = _spec(gt=0.0, le=1.0)
    init_keep_rate: float = _spec(gt=0.0, lt=1.0)
    repeats: int = _spec(ge=1)
    distance: str = _spec(choices=DISTANCES)
    init: str = _spec(choices=INIT_MODES)
    expand: str = _spec(choices=EXPAND_MODES)
    merge: str = _spec(choices=MERGE_MODES)
    sparse_eval: bool = MISSING


@dataclass
class ScheduleConfig:
    epochs: int = _spec(ge=1)
    length: int = _spec(ge=1)
    stage_starts: List[int] = _spec(ge=0)
    min_lr: Optional[float] = _spec(None, ge=0.0)


@dataclass
class ModelConfig:
    name: str = MISSING
    label: Optional[str] = None  # the model= option that set it (vit_cpu): what reports call the model
    img_size: int = _spec(ge=1)
    patch_size: int = _spec(ge=1)
    drop_path: float = _spec(ge=0.0, lt=1.0)
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: str = _spec(choices=DATASETS)
    root: Optional[str] = MISSING  # null for digits; the option files of the other data sets ask for it (???)
    num_classes: Optional[int] = _spec(None, ge=2)
    val_fraction: Optional[float] = _spec(None, gt=0.0, lt=1.0)
    split_seed: Optional[int] = _spec(None, ge=0, le=2**32 - 1)  # scikit-learn's random_state
    train_split: Optional[str] = None
    val_split: Optional[str] = None
    download: bool = False


@dataclass
class RecipeConfig:
    batch_size: int = _spec(ge=1)
    lr: float = _spec(gt=0.0)
    lr_base_batch: int = _spec(ge=1)
    opt: str = MISSING
    opt_eps: float = _spec(gt=0.0)
    momentum: float = _spec(ge=0.0, le=1.0)
    weight_decay: float = _spec(ge=0.0)
    sched: str = _spec(choices=SCHEDULERS)
    sched_on_updates: bool = MISSING
    warmup_epochs: int = _spec(ge=0)
    warmup_lr: float = _spec(ge=0.0)
    min_lr: float = _spec(ge=0.0)
    clip_grad: Optional[float] = _spec(None, gt=0.0)
    smoothing: float = _spec(ge=0.0, lt=1.0)
    mixup: float = _spec(ge=0.0)
    cutmix: float = _spec(ge=0.0)
    mixup_prob: float = _spec(ge=0.0, le=1.0)
    mixup_switch_prob: float = _spec(ge=0.0, le=1.0)
    auto_augment: Optional[str] = None
    color_jitter: Optional[float] = _spec(None, ge=0.0)
    reprob: float = _spec(ge=0.0, le=1.0)
    remode: str = _spec(choices=RANDOM_ERASE_MODES)
    hflip: float = _spec(ge=0.0, le=1.0)
    scale: List[float] = _spec(gt=0.0, le=1.0)
    train_interpolation: Optional[str] = _spec(None, choices=INTERPOLATIONS)
    eval_crop_pct: Optional[float] = _spec(None, gt=0.0, le=1.0)
    ema: bool = MISSING
    ema_decay: float = _spec(ge=0.0, le=1.0)
    repeated_aug: bool = MISSING


@dataclass
class PhaseConfig:
    epochs: float = _spec(gt=0.0)
    img_size: int = _spec(ge=2)
    magnitude: int = _spec(ge=0)
    accumulation: int = _spec(ge=1)


@dataclass
class CurriculumConfig:
    """EfficientTrain's phases, each given for a ``length``-epoch run of a ``reference_img_size`` px model."""

    enabled: bool = MISSING
    length: float = _spec(gt=0.0)
    reference_img_size: int = _spec(ge=1)
    auto_augment: str = MISSING
    phases: List[PhaseConfig] = MISSING


@dataclass
class TokenLabelConfig:
    root: Optional[str] = None
    dense_weight: float = _spec(ge=0.0)
    cls_weight: float = _spec(ge=0.0)
    ground_truth: bool = MISSING
    box_order: str = _spec(choices=("official", "xy"))


@dataclass
class TrainConfig:
    device: str = MISSING  # auto | cpu | cuda | cuda:N | any torch device string, checked by validate()
    amp: str = _spec(choices=AMP_MODES)
    compile: bool = MISSING
    workers: Any = "auto"  # DataLoader worker processes: auto (from the cores, the device and the pipeline) or N >= 0
    # how training images are loaded and augmented: auto (tensor where it can run the recipe) | tensor | pil
    pipeline: str = _spec("auto", choices=PIPELINES)
    progress: Any = _spec(choices=("auto", True, False))  # a tqdm bar per epoch; auto: only on a terminal
    eval_every: int = _spec(ge=1)


@dataclass
class WandbConfig:
    mode: str = _spec(choices=WANDB_MODES)
    project: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class FinetuneConfig:
    path: Optional[str] = MISSING
    use_ema: bool = MISSING


@dataclass
class ResumeConfig:
    allow_changes: bool = MISSING  # resume although the config differs from the checkpoint's (noted in the record)


@dataclass
class RunConfig:
    """The whole config of one ``toe-train`` run (the ``hydra`` node is Hydra's own)."""

    task_name: str = MISSING
    seed: int = _spec(ge=0, le=2**32 - 1)  # what numpy and timm's random_seed take
    budget: Optional[float] = _spec(None, gt=0.0)  # hparams_search: the least train-FLOP speed-up of a trial
    method_name: str = MISSING
    smoke_model: str = MISSING
    smoke_recipe: str = MISSING
    smoke_epochs: int = _spec(ge=1)
    toe: ToEConfig = field(default_factory=ToEConfig)
    patch_dropout: PatchDropoutConfig = field(default_factory=PatchDropoutConfig)
    tome: MergingConfig = field(default_factory=MergingConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    token_label: TokenLabelConfig = field(default_factory=TokenLabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    # Inputs that experiment files ask for (experiments/table3_lvvit.yaml, experiments/finetune_cifar.yaml) and use
    # through interpolations; left unset (???) elsewhere, which is not an error (see EXPERIMENT_INPUTS).
    label_maps: Optional[str] = MISSING
    pretrained: Dict[str, Optional[str]] = field(default_factory=dict)
    pretrained_from: Optional[str] = None


def register() -> None:
    """Put the schema into Hydra's ConfigStore (``conf/train.yaml`` names it first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


# --- checks that types cannot express ----------------------------------------------------------------------------
def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _check_rules(key: str, value: Any, rules: Dict[str, Any], shown: Any) -> None:
    if value is None:
        return
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{key}={_show(shown)}: expected one of {', '.join(map(str, rules['choices']))}")
    bounds = (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    )
    for name, holds, _ in bounds:
        if name in rules and not (math.isfinite(value) and holds(value, rules[name])):
            wanted = " and ".join(f"{s} {rules[n]:g}" for n, _, s in bounds if n in rules)
            raise ConfigError(f"{key}={_show(shown)}: must be {wanted}")


def _check_node(schema: type, node: Any, prefix: str) -> None:
    hints = typing.get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        key, kind = f"{prefix}{spec.name}", hints[spec.name]
        value = node.get(spec.name) if isinstance(node, dict) else None
        if dataclasses.is_dataclass(kind):
            _check_node(kind, value, key + ".")
            continue
        item_kind = (typing.get_args(kind) or (None,))[0]
        if dataclasses.is_dataclass(item_kind):
            for i, item in enumerate(value or []):
                _check_node(item_kind, item, f"{key}[{i}].")
            continue
        if spec.metadata:
            for item in value if isinstance(value, list) else [value]:
                _check_rules(key, item, dict(spec.metadata), value)


def check_device(name: str) -> None:
    """``train.device`` must name a device this machine has (``auto`` always does)."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device={name}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"train.device={name}: this machine has no CUDA device; use train.device=cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device={name}: this machine has {count} CUDA device(s)")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"train.device={name}: toe trains on cpu or cuda (or auto)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name}: MPS is not available on this machine")


def validate(cfg: DictConfig, devices: bool = True) -> "SchedulePlan":
    """Every range, choice and cross-key rule of a composed run config; raises :class:`ConfigError` (one line).
    Returns the run's :class:`SchedulePlan`, which the checks computed anyway.

    ``devices=False`` skips the check that ``train.device`` exists here (a sweep checked on a login node runs on
    other machines). Missing values (``???``) are named as such.
    """
    values = _resolved(cfg)
    missing = [
        key for key in sorted(OmegaConf.missing_keys(cfg)) if key.split(".")[0] not in ("hydra",) + EXPERIMENT_INPUTS
    ]
    if missing:
        raise ConfigError(f"missing value for {missing[0]}: set it on the command line, e.g. {missing[0]}=<value>")
    if OmegaConf.is_missing(cfg, "label_maps"):
        values["label_maps"] = None
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(RunConfig)})
    if unknown:
        raise ConfigError(f"{unknown[0]}={_show(values[unknown[0]])}: no such key in the run config (toe/schema.py)")
    _check_node(RunConfig, values, "")
    if cfg.model.img_size % cfg.model.patch_size:
        raise ConfigError(
            f"model.img_size={cfg.model.img_size}: the patch size {cfg.model.patch_size} "
            f"(model.patch_size) does not divide it"
        )
    if cfg.token_label.root and (cfg.recipe.mixup > 0 or cfg.recipe.cutmix > 0):
        raise ConfigError(
            f"token_label.root={cfg.token_label.root} with recipe.mixup={cfg.recipe.mixup} / "
            f"recipe.cutmix={cfg.recipe.cutmix}: MixToken replaces Mixup and CutMix in LV-ViT "
            "(recipe=lvvit sets both to 0)"
        )
    if cfg.finetune.path is not None:
        from pathlib import Path

        from .finetune import looks_like_weights

        if not Path(str(cfg.finetune.path)).expanduser().is_file():
            raise ConfigError(f"finetune.path={cfg.finetune.path}: no such file")
        why = looks_like_weights(Path(str(cfg.finetune.path)))
        if why:
            raise ConfigError(f"finetune.path={cfg.finetune.path}: {why}")
    enabled = [f"{node}.enabled=true" for node in REDUCTION_NODES if cfg[node].enabled]
    if len(enabled) > 1:
        raise ConfigError(
            f"{' and '.join(enabled)}: one token-reduction method per run (method=toe, "
            "method=patchdropout or method=tome)"
        )
    for key, values in (("patch_dropout.keep_rates", cfg.patch_dropout.keep_rates), ("tome.r", cfg.tome.r)):
        if cfg[key.split(".")[0]].enabled and values is not None and len(values) != len(cfg.schedule.stage_starts):
            raise ConfigError(
                f"{key}={_show(list(values))}: one value per stage of "
                f"schedule.stage_starts={_show(list(cfg.schedule.stage_starts))} (or null: matched to "
                "the ToE operator's train FLOPs)"
            )
    scale = list(cfg.recipe.scale)
    if len(scale) != 2 or scale[0] > scale[1]:
        raise ConfigError(
            f"recipe.scale={_show(scale)}: the crop's area share as [low, high], low <= high "
            "(the DeiT recipe: [0.08,1.0])"
        )
    if (cfg.recipe.mixup > 0 or cfg.recipe.cutmix > 0) and cfg.recipe.batch_size % 2:
        raise ConfigError(
            f"recipe.batch_size={cfg.recipe.batch_size} with recipe.mixup={cfg.recipe.mixup} / "
            f"recipe.cutmix={cfg.recipe.cutmix}: timm's Mixup mixes a batch with its reverse and needs "
            "an even batch"
        )
    _check_digits_split(cfg)
    workers = cfg.train.workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"train.workers={_show(workers)}: expected auto or a number of processes >= 0")
    _check_timm_names(cfg)
    plan = plan_schedule(cfg)
    check_model(cfg, plan)
    if devices:
        check_device(cfg.train.device)
    return plan


DIGITS_IMAGES, DIGITS_CLASSES = 1797, 10  # scikit-learn's load_digits


def _check_digits_split(cfg: DictConfig) -> None:
    """The embedded digits set is split with stratification: each side needs an image of every class."""
    if cfg.data.name != "digits" or cfg.data.val_fraction is None:
        return
    val = math.ceil(cfg.data.val_fraction * DIGITS_IMAGES)
    if min(val, DIGITS_IMAGES - val) < DIGITS_CLASSES:
        raise ConfigError(
            f"data.val_fraction={cfg.data.val_fraction}: {val} of the {DIGITS_IMAGES} digits for "
            f"validation leaves a side with fewer images than the {DIGITS_CLASSES} classes"
        )


MIN_PATCH_TOKENS = 4  # a 2 x 2 grid: ToE keeps a share of the patches, ToMe merges pairs of them


def check_model(cfg: DictConfig, plan: "SchedulePlan") -> None:
    """Build the run's model on the ``meta`` device (no memory, no weights: well under a second for a ViT-B), so
    that a model timm cannot build with these settings is refused naming its key before any data is read."""
    import timm
    import torch

    import toe.models  # noqa: F401 - registers LV-ViT with timm

    name, kwargs = cfg.model.name, OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    if plan.phases and "dynamic_img_size" in kwargs:
        raise ConfigError(
            f"model.kwargs.dynamic_img_size={kwargs['dynamic_img_size']}: method={cfg.method_name} "
            "sets it itself (the curriculum's changing resolution); leave it out"
        )
    extra = {"dynamic_img_size": True} if plan.phases else {}
    settings = dict(
        num_classes=cfg.data.num_classes or 2,
        img_size=cfg.model.img_size,
        patch_size=cfg.model.patch_size,
        drop_path_rate=cfg.model.drop_path,
        **kwargs,
        **extra,
    )
    try:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, **settings)
        except (RuntimeError, NotImplementedError) as err:
            if "meta" not in str(err):
                raise
            model = timm.create_model(name, **settings)  # an init that copies real data (LV-ViT): build it here
    except Exception as err:  # noqa: BLE001 - timm and the model classes raise any type for a bad argument
        raise ConfigError(_model_error(cfg, kwargs, err)) from None
    blocks, grid = getattr(model, "blocks", None), getattr(getattr(model, "patch_embed", None), "num_patches", None)
    if blocks is None or grid is None:
        raise ConfigError(f"model.name={name}: not a vision transformer toe can train (no blocks or patch_embed)")
    if len(blocks) < (2 if plan.toe_enabled else 1):
        depth = f"model.kwargs.depth={kwargs['depth']}" if "depth" in kwargs else f"model.name={name}"
        raise ConfigError(
            f"{depth}: {len(blocks)} block(s); "
            + (
                f"method={cfg.method_name} reduces the tokens after the first block and needs at least two"
                if plan.toe_enabled
                else "a model needs at least one"
            )
        )
    if grid < MIN_PATCH_TOKENS:
        raise ConfigError(
            f"model.patch_size={cfg.model.patch_size} with model.img_size={cfg.model.img_size}: "
            f"{grid} patch token(s); toe needs at least {MIN_PATCH_TOKENS} (a 2 x 2 grid)"
        )


def _model_error(cfg: DictConfig, kwargs: Dict[str, Any], err: BaseException) -> str:
    """One line for a model timm cannot build, naming the key that most likely caused it."""
    name, text = cfg.model.name, str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Unknown model" in text:
        return f"model.name={name}: not one of timm's models ({text})"
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", text)
    if unexpected and unexpected.group(1) == "dynamic_img_size" and "dynamic_img_size" not in kwargs:
        return (
            f"model.name={name} has a fixed position embedding and does not take the changing resolution of "
            f"method={cfg.method_name}'s curriculum (timm's dynamic_img_size)"
        )
    if unexpected and unexpected.group(1) in kwargs:
        key = unexpected.group(1)
        return f"model.kwargs.{key}={_show(kwargs[key])}: model.name={name} takes no such argument"
    if unexpected:
        return (
            f"model.name={name}: not a vision transformer toe can train (it takes no "
            f"{unexpected.group(1)}; toe sets img_size, patch_size and drop_path_rate)"
        )
    named = (
        [key for key in kwargs if key in text]
        or [
            key
            for key, value in kwargs.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0
        ]
        or [key for key, value in kwargs.items() if isinstance(err, TypeError) and isinstance(value, str)]
    )
    subject = ", ".join(f"model.kwargs.{key}={_show(kwargs[key])}" for key in named) or f"model.name={name}"
    return f"{subject}: timm cannot build the model ({text})"


def _check_timm_names(cfg: DictConfig) -> None:
    """The optimizer and RandAugment strings timm will parse, parsed now rather than after the data is loaded."""
    import timm.optim
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    list_optimizers = getattr(timm.optim, "list_optimizers", None)
    if list_optimizers is not None and cfg.recipe.opt.lower() not in list_optimizers():
        raise ConfigError(f"recipe.opt={cfg.recipe.opt}: not one of timm's optimizers (timm.optim.list_optimizers())")
    policies = [("recipe.auto_augment", cfg.recipe.auto_augment)]
    if cfg.curriculum.enabled:
        policies += [
            ("curriculum.auto_augment", cfg.curriculum.auto_augment.format(magnitude=p.magnitude))
            for p in cfg.curriculum.phases
        ]
    for key, policy in policies:
        if not policy:
            continue
        build = (
            rand_augment_transform
            if policy.startswith("rand")
            else augment_and_mix_transform
            if policy.startswith("augmix")
            else auto_augment_transform
        )
        try:
            build(policy, {})
        except (AssertionError, ValueError, KeyError, IndexError) as err:
            raise ConfigError(f"{key}={policy}: timm cannot parse this augmentation policy ({err})") from None
        # timm skips a part without a number (rand-m9-foo trains as rand-m9): refuse it rather than ignore it
        ignored = [
            part
            for part in policy.split("-")[1:]
            if not re.search(r"\d", part) and not (policy.startswith("rand") and part.startswith("t"))
        ]
        if ignored:
            raise ConfigError(
                f"{key}={policy}: timm would ignore {ignored[0]!r} (each part after the policy's name "
                "is a setting and its number, e.g. m9, mstd0.5, inc1)"
            )


def _resolved(cfg: DictConfig) -> Dict[str, Any]:
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except OmegaConfBaseException as err:  # an interpolation to a missing value: token_label.root: ${label_maps}
        reason = str(err).splitlines()[0]
        missing = re.search(r"Missing mandatory value: (\S+)", reason)
        if missing:
            raise ConfigError(
                f"missing value for {missing.group(1)} (used by {err.full_key}): set it on the "
                f"command line, e.g. {missing.group(1)}=<value>"
            ) from None
        raise ConfigError(f"{err.full_key}: {reason}") from None


# --- what the schedule keys mean, computed in one place ------------------------------------------------------------
@dataclass(frozen=True)
class SchedulePlan:
    """The run's epochs, the ToE stage start epochs (scaled to ``schedule.epochs``) and the EfficientTrain phases."""

    epochs: int
    stage_starts: List[int]
    phases: List[Any]  # toe.curriculum.Phase, empty without a curriculum
    toe_enabled: bool = False  # a token-reduction method with stages runs (ToE or PatchDropout)

    @property
    def unreached_stages(self) -> List[int]:
        """Stages (1-based) that start at or after the last epoch, so they never run (e.g. 0/100/400 of 300)."""
        if not self.toe_enabled:
            return []
        return [stage for stage, start in enumerate(self.stage_starts, 1) if start >= self.epochs]


def stage_start_epochs(cfg: DictConfig, check: bool = True) -> List[int]:
    """``schedule.stage_starts`` are epochs of a ``schedule.length``-epoch run, scaled to ``schedule.epochs`` and
    rounded half up (the official 0/100/200 of 300 gives 0/10/20 over 30 epochs); ``check``: refuse starts that
    are not strictly increasing after the scaling."""
    epochs, length = int(cfg.schedule.epochs), float(cfg.schedule.length)
    starts = [scale_epoch(s, epochs, length) for s in cfg.schedule.stage_starts]
    if check and any(b <= a for a, b in zip(starts, starts[1:])):
        raise ConfigError(
            f"schedule.stage_starts={_show(list(cfg.schedule.stage_starts))}: a {length:g}-epoch split gives start "
            f"epochs {starts} over schedule.epochs={epochs}, which are not strictly increasing: run more epochs"
        )
    return starts


def plan_schedule(cfg: DictConfig) -> SchedulePlan:
    """The schedule of a run, with the ToE schedule and curriculum checked; raises :class:`ConfigError`."""
    from .curriculum import build_phases

    staged = any(cfg[node].enabled for node in REDUCTION_NODES)
    # a run without stages (baseline, EfficientTrain alone) has no stage split that could fail to fit its epochs
    starts = stage_start_epochs(cfg, check=staged)
    if cfg.toe.enabled:
        build_expansion_schedule(cfg, starts)
    phases: List[Any] = []
    if cfg.curriculum.enabled:
        try:
            phases = build_phases(
                cfg.curriculum, int(cfg.schedule.epochs), int(cfg.model.img_size), int(cfg.model.patch_size)
            )
        except ValueError as err:
            raise ConfigError(f"curriculum.phases: {err}") from None
    if (cfg.patch_dropout.enabled and cfg.patch_dropout.keep_rates is None) or (
        cfg.tome.enabled and cfg.tome.r is None
    ):
        build_expansion_schedule(cfg, starts, matching=True)  # the settings they are matched to must work
    return SchedulePlan(int(cfg.schedule.epochs), starts, phases, staged)


def build_expansion_schedule(cfg: DictConfig, starts: Optional[List[int]] = None, matching: bool = False):
    """The run's :class:`toe.ExpansionSchedule`, or ``None`` with ToE off; with ``matching``, the schedule of the
    ``toe:`` node even with ToE off (PatchDropout and Token Merging match its train FLOPs)."""
    from .schedule import ExpansionSchedule

    if not (cfg.toe.enabled or matching):
        return None
    node = cfg.toe
    try:
        return ExpansionSchedule(
            expansion_steps=starts if starts is not None else stage_start_epochs(cfg),
            keep_rates=list(node.keep_rates),
            init_keep_rate=node.init_keep_rate,
            repeats=node.repeats,
            distance=node.distance,
            init=node.init,
            expand=node.expand,
            merge=node.merge,
        )
    except ValueError as err:
        if "expansion_steps" in str(err):
            raise ConfigError(f"schedule.stage_starts={_show(list(cfg.schedule.stage_starts))}: {err}") from None
        key = next((k for k in ("init_keep_rate", "keep_rates", "repeats") if k in str(err)), "keep_rates")
        raise ConfigError(f"toe.{key}={_show(OmegaConf.to_container(node, resolve=True)[key])}: {err}") from None


# --- what a resume may change --------------------------------------------------------------------------------------
# Keys that do not change what is trained: where and how fast it runs, what is logged, how often it is evaluated.
RESUMABLE_CHANGES = (
    "logger.",
    "train.device",
    "train.workers",
    "train.progress",
    "train.eval_every",
    "train.compile",
    "data.root",
    "data.download",
    "task_name",
    "smoke_",
    "resume.",
)


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: node}
    return {prefix[:-1]: node}


# Nodes whose keys the user adds (the model's own keyword arguments): a key there that the checkpoint's config
# lacks was added for this start, not by a newer toe, and changes what is trained.
FREE_FORM = ("model.kwargs.",)


def config_changes(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, List[Any]]:
    """``{key: [before, after]}`` for every resolved key that differs and that changes the training (everything
    but :data:`RESUMABLE_CHANGES`). Two kinds of difference change nothing and are left out: a key the checkpoint's
    config does not have (a newer toe added it; the run trained with what it did before) unless it is one of
    :data:`FREE_FORM`'s (``+model.kwargs.proj_drop_rate=0.5`` is a change), and the settings of a
    token-reduction method that is off in both (``patch_dropout``, ``tome``)."""
    old, new = _flat(before), _flat(after)
    off = tuple(
        f"{node}." for node in REDUCTION_NODES[1:] if not old.get(f"{node}.enabled") and not new.get(f"{node}.enabled")
    )
    return {
        key: [old.get(key), new.get(key)]
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
        and not key.startswith(RESUMABLE_CHANGES)
        and (key in old or key.startswith(FREE_FORM))
        and not key.startswith(off)
    }


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The config ``toe-train <overrides>`` trains with, composed outside a Hydra app from the package's configs
    (``toe.conf``), for tools that build a run in their own process (``toe-bench``, ``toe-vis``)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="toe.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# --- one line for what Hydra refuses while composing ---------------------------------------------------------------
def config_error_message(err: BaseException) -> Optional[str]:
    """What to say of a config that cannot work: a :class:`ConfigError`'s text, or Hydra's or OmegaConf's
    composition error in one line (:func:`compose_error_line`); ``None`` for any other error, to be raised."""
    from .data import DataRootError

    if isinstance(err, (ConfigError, DataRootError)):
        return str(err)
    return compose_error_line(err) if is_compose_error(err) else None


def is_compose_error(err: BaseException) -> bool:
    """Whether ``err`` comes from composing a config (a bad override, option, key, type or value)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(err, (HydraException, OmegaConfBaseException, ConfigError))


def compose_error_line(err: BaseException) -> str:
    """One line for a composition error: the override or key, its value and what is wrong, without Hydra's advice
    on stack traces."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    chain, current = [], err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    head = lines[0] if lines else type(err).__name__
    if isinstance(err, OverrideParseException):
        override = getattr(err, "override", None) or (head.split("'")[1] if "'" in head else "")
        return (
            f"cannot read the override {override!r}: {head.split(' See https')[0]} (close every bracket and "
            "quote; quote the whole override for the shell: 'toe.keep_rates=[0.5,0.75,1.0]', and a value with "
            "spaces or other special characters inside it: 'data.root=\"/data/my images\"')"
        )
    if isinstance(err, MissingConfigException) and "Available options" in str(err):
        options = [line.strip() for line in str(err).splitlines() if line.startswith("\t") and "=" not in line]
        return f"{head} (available: {', '.join(options)})"
    append = re.search(r"use (\+\S+)", str(err))
    cause = next((e for e in chain if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None)), None)
    if cause is not None:
        reason = (getattr(cause, "msg", None) or str(cause)).strip().splitlines()[0]
        override = re.search(r"override '?([^' ]+)'?", head)
        subject = override.group(1).rstrip(".") if override else cause.full_key
        if append:  # an override of a key the schema does not have
            subject = append.group(1)[1:]
            return f"{subject}: {reason}" + (
                " (to add a key to model.kwargs, use +" + subject + ")" if subject.startswith("model.kwargs.") else ""
            )
        if override and "=" not in subject and getattr(cause, "value", None) is not None:
            subject = f"{subject}={cause.value}"
        return f"{subject}: {reason}"
    return " ".join(lines[:3])
