"""Build a run from its config: the ToE schedule, the model, data, optimizer, scheduler, EMA and loss, in timm's
order (create_model -> toe.patch -> resolve_model_data_config -> create_transform -> .to(device) ->
create_optimizer_v2 -> ModelEmaV3 -> compile -> DDP -> create_scheduler_v2). ``toe.train.task`` drives the epochs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

import torch

import toe.models  # noqa: F401 - registers LV-ViT with timm
from toe.config.schema import ConfigError, RecipeConfig, RunConfig, plain
from toe.config.stages import SchedulePlan, build_expansion_schedule
from toe.cost.flops import ViTShape
from toe.data.augment import (
    BatchAugment,
    TensorImages,
    cached_images,
    uint8_images,
)
from toe.data.datasets import SeededSamples, build_datasets, build_transforms
from toe.data.token_label import LabelMapDataset, LabelMapError, TokenLabelLoss
from toe.hosts import patch_method, reduction_op
from toe.hosts.prompts import add_prompts, trained_parameters
from toe.models.pretrained import CheckpointMismatchError, load_pretrained
from toe.models.settings import model_settings
from toe.ops.methods import REDUCER_METHOD, REDUCTION_NODES
from toe.train.distributed import DistInfo, all_reduce_sum
from toe.train.loaders import (
    TrainLoaders,
    available_cores,
    choose_pipeline,
    collate_settings,
    dali_train_loaders,
    loader_settings,
    own_generator,
    processes_per_node,
    train_sampler,
)
from toe.train.step import StepConfig

log = logging.getLogger(__name__)


CACHE_BYTES = 256 * 2**20  # the most a cached evaluation set may take


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_amp(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.amp`` on ``device`` (None: fp32), logged as the run will train."""
    if name == "auto":
        dtype = None if device.type != "cuda" else torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    log.info(
        "mixed precision (train.amp=%s): %s",
        name,
        {None: "off, fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast with timm's loss scaler"}[
            dtype
        ],
    )
    return dtype


def build_loss_and_mixup(recipe: RecipeConfig, num_classes: int, token_label: Optional[TokenLabelLoss] = None):
    """timm's Mixup/CutMix and loss; LV-ViT hosts (``token_label``) get the token-labeling loss, which takes
    their ``(cls, dense, box)`` training output. ``recipe.loss=bce``: timm's binary cross-entropy on the same
    (mixed, smoothed) targets, as DeiT III trains."""
    from timm.data import Mixup
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=recipe.mixup,
            cutmix_alpha=recipe.cutmix,
            prob=recipe.mixup_prob,
            switch_prob=recipe.mixup_switch_prob,
            label_smoothing=recipe.smoothing,
            num_classes=num_classes,
        )
    if token_label is not None:
        return token_label, mixup
    if recipe.loss == "bce":
        return BinaryCrossEntropy(smoothing=0.0 if mixup is not None else recipe.smoothing), mixup
    if mixup is not None:
        return SoftTargetCrossEntropy(), mixup
    if recipe.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=recipe.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


def create_model(cfg: RunConfig, num_classes: int, **extra: Any) -> torch.nn.Module:
    """The run's model as timm builds it from ``cfg.model`` (LV-ViT included: importing toe.models registers it)."""
    import timm

    try:
        return timm.create_model(cfg.model.name, **model_settings(cfg.model, num_classes, cfg.model.kwargs, **extra))
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise ConfigError(f"model.name={cfg.model.name}: {err}") from None
    except TypeError as err:  # a keyword the model class does not take
        raise ConfigError(f"model.kwargs={dict(cfg.model.kwargs)}: {err}") from None


def model_data_config(model: torch.nn.Module, cfg: RunConfig) -> Dict[str, Any]:
    """timm's data config of ``model`` at the run's image size."""
    from timm.data import resolve_model_data_config

    return dict(resolve_model_data_config(model), input_size=(3, cfg.model.img_size, cfg.model.img_size))


@dataclass
class Run:
    """Everything one run trains with, built in timm's order by :func:`build_run`."""

    model: torch.nn.Module
    net: torch.nn.Module  # the model as called in training (compiled or not)
    ema: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # timm's NativeScaler under fp16 autocast, else None
    criterion: Any
    mixup: Any
    train_loader: Any
    val_loader: Any
    sampler: Any  # set_epoch(epoch) before every epoch, so shuffles depend on the epoch only
    train_loaders: Any  # TrainLoaders (one per curriculum phase), or DaliLoaders
    shape: ViTShape
    device: torch.device
    autocast: Any
    lr: float
    dist: DistInfo
    plan: SchedulePlan  # epochs, ToE stage starts, EfficientTrain phases (empty without a curriculum)
    local_batch: int
    img_size: int
    patch_size: int
    clip_grad: Optional[float]
    pipeline: str  # tensor | pil | dali: how training images load and augment (train.pipeline resolved); detection
    batch_augment: Optional[torch.nn.Module]  # the tensor pipeline's augmentation, on the device; None for pil
    task: str = "classification"  # or detection (toe.train.detection)
    val_coco: Any = None  # detection: the val set's COCO index, for COCOeval
    patch_grid: Optional[Tuple[int, int]] = None  # detection: the grid the record's FLOPs count an image at

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor, self.dist)

    def step_config(self, accumulation: int = 1, batch_transform: Any = None) -> StepConfig:
        """The training step; ``batch_transform`` (the curriculum's crop) or else the tensor pipeline's
        augmentation runs on each batch on the device."""
        return StepConfig(
            self.criterion,
            self.optimizer,
            self.scheduler,
            self.device,
            autocast=self.autocast,
            loss_scaler=self.scaler,
            ema=self.ema,
            mixup=self.mixup,
            clip_grad=self.clip_grad,
            reduce=self.reduce,
            accumulation=accumulation,
            batch_transform=batch_transform or self.batch_augment,
        )


def apply_token_reduction(model: torch.nn.Module, cfg: RunConfig, plan: SchedulePlan) -> None:
    """Patch the run's token-reduction method into ``model`` (ToE, PatchDropout or Token Merging; at most one, as
    :func:`toe.config.validate.validate` checks) through :func:`toe.patch_method`: PatchDropout's kept rates and Token
    Merging's ``r`` left null are matched, stage by stage, to the train FLOPs of the ``toe:`` operator's schedule."""
    node = next((n for n in REDUCTION_NODES if getattr(cfg, n).enabled), None)
    if node is None:
        return
    settings = {
        "toe": {},
        "patch_dropout": {"keep_rates": cfg.patch_dropout.keep_rates},
        "tome": {"rs": cfg.tome.r, "prop_attn": cfg.tome.prop_attn},
    }[node]
    try:
        patch_method(
            model,
            REDUCER_METHOD[node],
            build_expansion_schedule(cfg, plan.stage_starts, matching=True),
            sparse_eval=bool(getattr(getattr(cfg, node), "sparse_eval", False)),
            **settings,
        )
    except TypeError as err:  # a host the method cannot run on (fewer than two blocks, another block type)
        raise ConfigError(f"model.name={cfg.model.name} with method={cfg.method_name}: {err}") from None
    if node != "toe" and None in settings.values():
        log.info("%s matched to the train FLOPs of ToE's stages: %s", cfg.method_name, reduction_op(model).schedule)


# torch's fused (one-kernel) Adam/AdamW: on the embedded default's small model the per-parameter loop of the
# foreach kernels costs about 1.5 ms a step, the fused kernel 0.5 ms, a share that ToE's smaller step makes larger.
# The update is the same; torch has it on CUDA, and on CPU from 2.4.
FUSED_OPTIMIZERS = ("adam", "adamw")


def timm_args(recipe: RecipeConfig, **values: Any) -> SimpleNamespace:
    """The recipe as the argparse namespace of timm's train.py, whose names its keys use, with ``values`` set: what
    timm's ``optimizer_kwargs`` and ``scheduler_kwargs`` read (a key the recipe lacks gets timm's default)."""
    return SimpleNamespace(**{**plain(recipe), **values})


def create_optimizer(model: torch.nn.Module, recipe: RecipeConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer for the recipe, fused where torch has a fused kernel for it on the model's device."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    kwargs = optimizer_kwargs(timm_args(recipe, lr=lr))
    if recipe.opt.lower() in FUSED_OPTIMIZERS:
        try:
            return create_optimizer_v2(model, fused=True, **kwargs)
        except RuntimeError:  # no fused kernel for this device in this torch
            pass
    return create_optimizer_v2(model, **kwargs)


def decay_epochs(recipe: RecipeConfig, epochs: int) -> int:
    """The epochs timm's scheduler is given: the run's, less a warm-up that comes before the decay (VPT's)."""
    return max(1, epochs - recipe.warmup_epochs) if recipe.warmup_prefix else epochs


def optimization(model: torch.nn.Module, cfg: RunConfig, info: DistInfo, device: torch.device):
    """``(global batch, batch per process, lr, optimizer, EMA, net)`` of a model already on its device: the lr
    scaled by the global batch, timm's optimizer, timm's EMA, then ``torch.compile`` and DDP, in timm's order."""
    from timm.utils import ModelEmaV3

    batch_size = int(cfg.recipe.batch_size)  # global, as the DeiT recipe counts it
    if batch_size % info.world_size:
        raise ConfigError(f"recipe.batch_size={batch_size} does not split over {info.world_size} processes")
    lr = cfg.recipe.lr * batch_size / cfg.recipe.lr_base_batch
    optimizer = create_optimizer(model, cfg.recipe, lr)
    log.info(
        "optimizer: %s%s, lr %.3g",
        type(optimizer).__name__,
        " (torch's fused kernel)" if optimizer.defaults.get("fused") else "",
        lr,
    )
    ema = ModelEmaV3(model, decay=cfg.recipe.ema_decay) if cfg.recipe.ema else None
    net = torch.compile(model) if cfg.train.compile else model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    return batch_size, batch_size // info.world_size, lr, optimizer, ema, net


def schedule_and_scaler(
    optimizer: torch.optim.Optimizer,
    cfg: RunConfig,
    plan: SchedulePlan,
    updates_per_epoch: int,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
):
    """timm's LR scheduler for the recipe over the run's epochs, and timm's loss scaler under fp16 autocast."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import NativeScaler

    min_lr = cfg.schedule.min_lr if cfg.schedule.min_lr is not None else cfg.recipe.min_lr
    scheduler, _ = create_scheduler_v2(
        optimizer,
        # timm counts a prefixed warm-up apart from the schedule's epochs
        **scheduler_kwargs(timm_args(cfg.recipe, epochs=decay_epochs(cfg.recipe, plan.epochs), min_lr=min_lr)),
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler, NativeScaler(device=device.type) if amp_dtype == torch.float16 else None


def build_run(cfg: RunConfig, plan: SchedulePlan, info: DistInfo) -> Run:
    """The run of the typed config ``cfg`` (:func:`toe.config.schema.typed_config`) and its schedule ``plan`` (what
    :func:`toe.config.validate.validate` returned), on this process of ``info``."""
    from timm.utils import random_seed

    if cfg.task == "detection":
        from toe.train.detection import build_detection_run

        return build_detection_run(cfg, plan, info)
    device = resolve_device(cfg.train.device, info.local_rank)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext
    random_seed(cfg.seed, info.rank)
    train_set, val_set = build_datasets(cfg)
    num_classes = cfg.data.num_classes or len(train_set.classes)
    if num_classes < len(train_set.classes):
        raise ConfigError(
            f"data.num_classes={num_classes}: data={cfg.data.name} has {len(train_set.classes)} "
            "classes, and a head of fewer cannot score them (leave it null to count them)"
        )
    # Under the curriculum the resolution changes every phase: timm resamples the position embedding to the
    # input's grid on the fly (the official code re-creates the model per phase and interpolates the table).
    dynamic = {"dynamic_img_size": True} if plan.phases else {}
    try:
        model = create_model(cfg, num_classes, **dynamic)
    except ConfigError as err:
        if "dynamic_img_size" not in str(err):
            raise
        raise ConfigError(
            f"model.name={cfg.model.name} has a fixed position embedding and does not take the "
            "EfficientTrain curriculum's changing resolution (timm's dynamic_img_size)"
        ) from None
    if cfg.finetune.path:
        try:
            load_pretrained(model, Path(cfg.finetune.path), use_ema=cfg.finetune.use_ema)
        except (FileNotFoundError, CheckpointMismatchError) as err:
            raise ConfigError(str(err)) from None
    if cfg.prompts.enabled:  # before the reducer, which keeps the prompts aside as prefix tokens
        _add_prompts(model, cfg, num_classes)
    train_set, token_label = _token_labeling(cfg, model, train_set, num_classes)
    apply_token_reduction(model, cfg, plan)
    data_config = model_data_config(model, cfg)
    train_set.transform, val_set.transform = build_transforms(data_config, cfg.recipe)
    images = uint8_images(train_set) if cfg.train.pipeline != "pil" else None
    interpolation = cfg.recipe.train_interpolation or data_config["interpolation"]
    pipeline, batch_augment = choose_pipeline(cfg, images is not None, interpolation, plan, device), None
    if pipeline == "tensor":
        batch_augment = BatchAugment(
            cfg.model.img_size,
            tuple(cfg.recipe.scale),
            (3 / 4, 4 / 3),
            cfg.recipe.hflip,
            interpolation,
            data_config["mean"],
            data_config["std"],
        ).to(device)
        train_set = TensorImages(images, train_set.targets, list(train_set.classes))
    if len(val_set) * 3 * cfg.model.img_size**2 * 4 <= CACHE_BYTES:  # evaluation's transform is deterministic
        val_set = cached_images(val_set)
    model.to(device)

    batch_size, local_batch, lr, optimizer, ema, net = optimization(model, cfg, info, device)
    sampler = train_sampler(train_set, cfg, info)
    if pipeline in ("pil", "dali"):  # their draws seeded per sample, or per batch (SeededSamples: its epoch)
        sampler = SeededSamples(sampler, cfg.seed, info.rank)
    loader_kwargs = loader_settings(cfg.train.workers, pipeline, device, processes_per_node(info))
    if pipeline == "dali":
        train_loaders = dali_train_loaders(
            train_set, sampler, cfg, data_config, interpolation, device, local_batch, info
        )
        how = f": {train_loaders.loader!r}"
    else:
        train_loaders = TrainLoaders(
            train_set, sampler, data_config, cfg.recipe, cfg.curriculum.auto_augment, **loader_kwargs
        )
        how = f": {batch_augment}" if batch_augment is not None else ": timm's per-image PIL transforms"
    log.info("training images: %s pipeline (train.pipeline=%s)%s", pipeline, cfg.train.pipeline, how)
    log.info(
        "data loading: %d worker(s)%s, pin_memory=%s (train.workers=%s, %d cores)%s",
        loader_kwargs["num_workers"],
        ", persistent, prefetch %d" % loader_kwargs["prefetch_factor"] if loader_kwargs["num_workers"] else "",
        loader_kwargs["pin_memory"],
        cfg.train.workers,
        available_cores(),
        "; training images through DALI's threads instead" if pipeline == "dali" else "",
    )
    train_loader = train_loaders.get(local_batch)
    if plan.phases:
        if any(local_batch % p.accumulation for p in plan.phases):
            raise ConfigError(
                f"recipe.batch_size={batch_size} per process ({local_batch}) does not split into "
                f"the curriculum's accumulation steps {[p.accumulation for p in plan.phases]}"
            )
    # Every process evaluates its own slice of the val set; the counts are summed, so top-1 is exact.
    val_shard = torch.utils.data.Subset(val_set, range(info.rank, len(val_set), info.world_size))
    val_loader = torch.utils.data.DataLoader(
        val_shard,
        batch_size=local_batch,
        shuffle=False,
        **collate_settings(val_shard),
        generator=own_generator(),
        **loader_kwargs,
    )
    if len(train_loader) == 0:
        raise ConfigError(f"recipe.batch_size={batch_size} is larger than the training set ({len(train_set)} images)")
    scheduler, scaler = schedule_and_scaler(optimizer, cfg, plan, len(train_loader), device, amp_dtype)
    criterion, mixup = build_loss_and_mixup(cfg.recipe, num_classes, token_label)
    return Run(
        model,
        net,
        ema,
        optimizer,
        scheduler,
        scaler,
        criterion,
        mixup,
        train_loader,
        val_loader,
        sampler,
        train_loaders,
        ViTShape.from_model(model),
        device,
        autocast,
        lr,
        info,
        plan,
        local_batch,
        cfg.model.img_size,
        cfg.model.patch_size,
        cfg.recipe.clip_grad,
        pipeline,
        batch_augment,
    )


def _add_prompts(model: torch.nn.Module, cfg: RunConfig, num_classes: int) -> None:
    """Visual prompt tuning on the pre-trained ``model``: frozen, prompted, a new head (toe.hosts.prompts)."""
    node = cfg.prompts
    try:
        add_prompts(model, node.length, node.deep, node.dropout, num_classes)
    except TypeError as err:
        raise ConfigError(f"prompts.enabled=true with model.name={cfg.model.name}: {err}") from None
    trained, total = trained_parameters(model)
    log.info(
        "visual prompt tuning: VPT-%s, %d prompt tokens%s, dropout %g; %s of %s parameters train (prompts and "
        "head), the backbone frozen and in eval mode",
        "deep" if node.deep else "shallow",
        node.length,
        f" before each of the {len(model.blocks)} blocks" if node.deep else " at the input",
        node.dropout,
        f"{trained:,}",
        f"{total:,}",
    )


def _token_labeling(cfg: RunConfig, model: torch.nn.Module, train_set, num_classes: int):
    """LV-ViT hosts (a dense head, ``drop_dense_head``) train with token labels from ``token_label.root``, or
    with the class-token loss alone when no root is given. Returns the training set (wrapped to carry label maps)
    and the loss, or ``(train_set, None)`` for other models."""
    node = cfg.token_label
    root = node.root
    if not hasattr(model, "drop_dense_head"):  # token_label.root set for such a model: refused by validate()
        return train_set, None
    try:
        loss = TokenLabelLoss(
            num_classes,
            tuple(model.patch_embed.grid_size),
            smoothing=cfg.recipe.smoothing,
            dense_weight=node.dense_weight,
            cls_weight=node.cls_weight,
            ground_truth=bool(node.ground_truth),
            box_order=node.box_order,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if root:  # with Mixup/CutMix off: toe.config.validate.validate refuses them beside label maps
        try:
            train_set = LabelMapDataset(train_set, Path(str(root)).expanduser(), num_classes)
        except LabelMapError as err:
            raise ConfigError(str(err)) from None
    else:
        log.warning(
            "LV-ViT without label maps (token_label.root is not set): training with the class-token loss "
            "alone, the dense head dropped"
        )
        model.drop_dense_head()
    return train_set, loss
