"""The config schema: one typed dataclass per node of ``conf/train.yaml``, registered in Hydra's ConfigStore.

``conf/train.yaml`` starts its defaults list with ``toe_schema``, so Hydra composes every option file onto these
types: an unknown key or a value of the wrong type is refused while the config is composed. What types cannot say
(ranges, choices, an image size the patch size must divide, a device that must exist) is checked by
:func:`toe.config.validate.validate` right after, before anything is written; the sweep check runs the same function
for every job. The ranges and choices are field metadata here, read by that check, because OmegaConf's structured
configs check types only (they have no value validators).

The values live in the YAML files, never here (every field is ``???`` until a config sets it): this module holds
types, ranges and choices only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import MISSING

from toe.ops.schedule import DISTANCES, EXPAND_MODES, INIT_MODES, MERGE_MODES

SCHEMA_NAME = "toe_schema"
# Top-level keys that only some experiments set (and read through interpolations): missing is fine elsewhere.
# They are inputs rather than defaults because a YAML ``???`` cannot replace a value already set, e.g. null.
EXPERIMENT_INPUTS = ("label_maps", "pretrained")
DATASETS = ("digits", "imagefolder", "imagenet", "cifar10", "cifar100", "vtab", "coco", "digits_detection")
DETECTION_DATASETS = ("coco", "digits_detection")
TASKS = ("classification", "detection")
PIPELINES = ("auto", "tensor", "pil", "dali")
DALI_DECODE = ("gpu", "cpu")
AMP_MODES = ("auto", "bf16", "fp16", "off")
WANDB_MODES = ("online", "offline", "disabled")
RANDOM_ERASE_MODES = ("pixel", "rand", "const")
INTERPOLATIONS = ("random", "bilinear", "bicubic", "nearest")
# timm's schedulers that toe's epoch loop can drive (plateau needs the eval metric at every step, which it is not given)
LOSSES = ("ce", "bce")  # cross-entropy (soft targets under Mixup/CutMix); binary cross-entropy, DeiT III's
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant")


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
    """PatchDropout with a kept-rate schedule (toe.ops.patch_dropout); the stage start epochs come from ``schedule``."""

    enabled: bool = False
    # one per stage of `schedule`; null: per stage the rate whose train FLOPs match the `toe:` operator's
    # (toe.cost.plan)
    keep_rates: Optional[List[float]] = _spec(None, gt=0.0, le=1.0)


@dataclass
class MergingConfig:
    """Token Merging (toe.ops.merging) with ``r`` per stage; the stage start epochs come from ``schedule``."""

    enabled: bool = False
    # tokens merged in every block, one per stage of `schedule`; null: per stage the r whose train FLOPs match the
    # `toe:` operator's (toe.cost.plan)
    r: Optional[List[float]] = _spec(None, ge=0.0)  # a fractional r spreads over the blocks (toe.ops.merging.block_r)
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
    # data=digits only: the digits to keep (relabelled 0..K-1 in this order), e.g. a backbone trained on some
    # digits and prompts tuned on the others (data=digits_pretrain, data=digits_transfer); null: all ten
    classes: Optional[List[int]] = _spec(None, ge=0, le=9)
    task: Optional[str] = None  # data=vtab: the VTAB-1k task folder under data.root (toe.data.vtab)
    # data=digits_detection only (toe.data.detection.DigitsDetection; split_seed seeds the draw): train and val
    # images, the canvas side in px, the least and most digits per image, the least and largest digit side in px
    images: Optional[List[int]] = _spec(None, ge=1)
    canvas: Optional[int] = _spec(None, ge=8)
    digits_per_image: Optional[List[int]] = _spec(None, ge=0)
    digit_sizes: Optional[List[int]] = _spec(None, ge=4)


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
    # the warm-up comes before the schedule's decay (timm's warmup_prefix): the cosine runs over the epochs after it,
    # as VPT's WarmupCosineSchedule; false (DeiT): over the whole run, the warm-up overriding its start
    warmup_prefix: bool = MISSING
    decay_epochs: float = _spec(gt=0.0)  # sched=step: the lr is multiplied by decay_rate every decay_epochs
    decay_milestones: List[int] = _spec(ge=0)  # sched=multistep: the epochs at which it is
    decay_rate: float = _spec(gt=0.0)
    warmup_lr: float = _spec(ge=0.0)
    min_lr: float = _spec(ge=0.0)
    clip_grad: Optional[float] = _spec(None, gt=0.0)
    smoothing: float = _spec(ge=0.0, lt=1.0)
    loss: str = _spec(choices=LOSSES)
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


def phase_policies(curriculum: Any) -> List[str]:
    """The RandAugment policy of each curriculum phase (``auto_augment`` at the phase's magnitude), which replaces
    the recipe's in training; empty when the curriculum is off. ``curriculum``: a CurriculumConfig or its node."""
    if not curriculum.enabled:
        return []
    return [str(curriculum.auto_augment).format(magnitude=phase.magnitude) for phase in curriculum.phases]


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
    # how training images are loaded and augmented: auto (tensor where it can run the recipe, dali for image folders
    # on CUDA where DALI is installed, else pil) | tensor | pil | dali
    pipeline: str = _spec("auto", choices=PIPELINES)
    dali_decode: str = _spec("gpu", choices=DALI_DECODE)  # the DALI pipeline on CUDA: decode JPEGs on the GPU or CPU
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
class PromptConfig:
    """Visual prompt tuning (toe.hosts.prompts): prompt tokens on a frozen pre-trained ViT."""

    enabled: bool = MISSING
    length: int = _spec(ge=1)  # prompt tokens per set
    deep: bool = MISSING  # VPT-deep (a new set before every block) or VPT-shallow (one set at the input)
    dropout: float = _spec(ge=0.0, lt=1.0)


@dataclass
class DetectionConfig:
    """YOLOS (toe.models.yolos) and DETR's set loss (toe.models.detr), read when ``task=detection``; the values of
    the official runs are YOLOS's (hustvl/YOLOS and ToE/YOLOS main.py, datasets/coco.py, run/*.sh)."""

    det_tokens: int = _spec(ge=1)  # detection tokens after the patch tokens (--det_token_num)
    init_pe_size: List[int] = _spec(ge=1)  # [H, W] px of the detection position embedding's grid (--init_pe_size)
    mid_pe_size: Optional[List[int]] = _spec(None, ge=1)  # [H, W] of the mid position embeddings; null: none
    scales: List[int] = _spec(ge=1)  # training: the shortest side is drawn from these
    max_size: int = _spec(ge=1)  # training: the longest side at most this
    eval_size: int = _spec(ge=1)  # evaluation: the shortest side (--eval_size; longest at most eval_size * 1333/800)
    crop: bool = MISSING  # DETR's random-size crop, half of the time
    cost_class: float = _spec(ge=0.0)  # Hungarian matching costs (--set_cost_*)
    cost_bbox: float = _spec(ge=0.0)
    cost_giou: float = _spec(ge=0.0)
    loss_ce: float = _spec(ge=0.0)  # loss weights (1, --bbox_loss_coef, --giou_loss_coef)
    loss_bbox: float = _spec(ge=0.0)
    loss_giou: float = _spec(ge=0.0)
    eos_coef: float = _spec(ge=0.0, le=1.0)  # the "no object" class's cross-entropy weight
    # data=digits_detection without finetune.path: the epochs of the digits-classification backbone that the run
    # trains first (cached, toe.train.backbone)
    backbone_epochs: int = _spec(ge=1)


@dataclass
class ResumeConfig:
    allow_changes: bool = MISSING  # resume although the config differs from the checkpoint's (noted in the record)


@dataclass
class RunConfig:
    """The whole config of one ``toe-train`` run (the ``hydra`` node is Hydra's own)."""

    task_name: str = MISSING
    task: str = _spec(choices=TASKS)  # what the run trains: a classifier, or a detector (YOLOS, task=detection)
    seed: int = _spec(ge=0, le=2**32 - 1)  # what numpy and timm's random_seed take
    budget: Optional[float] = _spec(None, gt=0.0)  # hparams_search: the least train-FLOP speed-up of a trial
    method_name: str = MISSING
    smoke_model: str = MISSING
    smoke_recipe: str = MISSING
    smoke_data: str = _spec(choices=DATASETS)
    smoke_epochs: int = _spec(ge=1)
    smoke_tasks: str = MISSING
    vtab_tasks: str = MISSING  # the VTAB-1k tasks experiments/vpt_vtab.yaml sweeps, comma-separated
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
    prompts: PromptConfig = field(default_factory=PromptConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    # Inputs that experiment files ask for (experiments/table3_lvvit.yaml, experiments/finetune_cifar.yaml) and use
    # through interpolations; left unset (???) elsewhere, which is not an error (see EXPERIMENT_INPUTS).
    label_maps: Optional[str] = MISSING
    pretrained: Dict[str, Optional[str]] = field(default_factory=dict)
    pretrained_from: Optional[str] = None


def typed_config(cfg: Any) -> RunConfig:
    """The composed config as the schema's dataclasses (``OmegaConf.to_object``), every interpolation resolved: what
    the code below the entry reads, once :func:`toe.config.validate.validate` has accepted ``cfg``. An experiment
    input left unset (``???``, see :data:`EXPERIMENT_INPUTS`) is ``None``."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, RunConfig):
        return cfg
    if not isinstance(cfg, DictConfig) or OmegaConf.get_type(cfg) is not RunConfig:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)  # a config read from a file, not composed
    cfg = cfg.copy()
    for key in EXPERIMENT_INPUTS:
        if OmegaConf.is_missing(cfg, key):
            cfg[key] = None
    return OmegaConf.to_object(cfg)


def plain(node: Any) -> Any:
    """A config node as plain Python values (a resolved container, or a schema dataclass as dicts and lists)."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return dataclasses.asdict(node)
    return node


def register() -> None:
    """Put the schema into Hydra's ConfigStore (``conf/train.yaml`` names it first in its defaults)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


def show_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show_value(v) for v in value) + "]"
    return "null" if value is None else str(value)
