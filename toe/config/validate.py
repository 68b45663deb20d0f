"""What types cannot say about a config: ranges, choices, an image size the patch size must divide, a device that
must exist, a model timm can build with these keys. :func:`validate` runs right after composition, before anything
is written; the sweep pre-check runs it for every job of a multirun."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from typing import Any, Dict, Tuple

from omegaconf import DictConfig, OmegaConf

from toe.config.schema import (
    EXPERIMENT_INPUTS,
    ConfigError,
    RunConfig,
    phase_policies,
    show_value,
    typed_config,
)
from toe.config.stages import SchedulePlan, plan_schedule
from toe.ops.methods import REDUCTION_NODES

# --- checks that types cannot express ----------------------------------------------------------------------------


def _check_rules(key: str, value: Any, rules: Dict[str, Any], shown: Any) -> None:
    if value is None:
        return
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{key}={show_value(shown)}: expected one of {', '.join(map(str, rules['choices']))}")
    bounds = (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    )
    for name, holds, _ in bounds:
        if name in rules and not (math.isfinite(value) and holds(value, rules[name])):
            wanted = " and ".join(f"{s} {rules[n]:g}" for n, _, s in bounds if n in rules)
            raise ConfigError(f"{key}={show_value(shown)}: must be {wanted}")


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
        raise ConfigError(
            f"{unknown[0]}={show_value(values[unknown[0]])}: no such key in the run config (toe/config/schema.py)"
        )
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
    if cfg.token_label.root and cfg.recipe.loss != "ce":
        raise ConfigError(
            f"recipe.loss={cfg.recipe.loss} with token_label.root={cfg.token_label.root}: token labeling trains "
            "with its own loss (cross-entropy on the class token and on every token's label)"
        )
    if cfg.prompts.enabled and cfg.finetune.path is None:
        raise ConfigError(
            "prompts.enabled=true without finetune.path: visual prompt tuning tunes prompts on a pre-trained "
            "backbone (a toe-train checkpoint.pth or a timm state-dict file)"
        )
    if cfg.data.classes is not None:
        classes = list(cfg.data.classes)
        if cfg.data.name != "digits":
            raise ConfigError(f"data.classes={show_value(classes)}: only data=digits selects classes")
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise ConfigError(f"data.classes={show_value(classes)}: at least two digits, each once")
    if cfg.finetune.path is not None:
        from pathlib import Path

        from toe.models.pretrained import looks_like_weights

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
                f"{key}={show_value(list(values))}: one value per stage of "
                f"schedule.stage_starts={show_value(list(cfg.schedule.stage_starts))} (or null: matched to "
                "the ToE operator's train FLOPs)"
            )
    scale = list(cfg.recipe.scale)
    if len(scale) != 2 or scale[0] > scale[1]:
        raise ConfigError(
            f"recipe.scale={show_value(scale)}: the crop's area share as [low, high], low <= high "
            "(the DeiT recipe: [0.08,1.0])"
        )
    if (cfg.recipe.mixup > 0 or cfg.recipe.cutmix > 0) and cfg.recipe.batch_size % 2:
        raise ConfigError(
            f"recipe.batch_size={cfg.recipe.batch_size} with recipe.mixup={cfg.recipe.mixup} / "
            f"recipe.cutmix={cfg.recipe.cutmix}: timm's Mixup mixes a batch with its reverse and needs "
            "an even batch"
        )
    _check_digits_split(cfg)
    _check_detection(cfg)
    workers = cfg.train.workers
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"train.workers={show_value(workers)}: expected auto or a number of processes >= 0")
    plan = plan_schedule(cfg)  # before the checks that import timm (seconds): a bad schedule is said at once
    _check_timm_names(cfg)
    model = check_model(cfg, plan)
    _check_model_needs(cfg, model, plan)
    if devices:
        check_device(cfg.train.device)
    return plan


def checked_config(cfg: DictConfig, devices: bool = True) -> Tuple[RunConfig, SchedulePlan]:
    """:func:`validate`, then the config in the schema's typed objects: what an entry hands to the code below it."""
    plan = validate(cfg, devices)
    return typed_config(cfg), plan


DIGITS_IMAGES, DIGITS_CLASSES = 1797, 10  # scikit-learn's load_digits


def _check_detection(cfg: DictConfig) -> None:
    """A detection run needs detection data and a recipe YOLOS can train with; a classifier, classification data."""
    from toe.config.schema import DETECTION_DATASETS

    detection, data = cfg.task == "detection", cfg.data.name
    if detection != (data in DETECTION_DATASETS):
        wanted = "task=detection" if data in DETECTION_DATASETS else "data=coco or data=digits_detection"
        raise ConfigError(f"task={cfg.task} with data={data}: {wanted} (a {cfg.task} run reads {wanted.split('=')[0]})")
    digits_only = ("images", "canvas", "digits_per_image", "digit_sizes")
    for key in digits_only:
        if data != "digits_detection" and cfg.data.get(key) is not None:
            raise ConfigError(f"data.{key}={show_value(cfg.data[key])}: only data=digits_detection draws its images")
    if not detection:
        return
    node = cfg.data
    for key, size in (("images", 2), ("digits_per_image", 2), ("digit_sizes", 2)):
        value = node.get(key)
        if value is not None and (len(value) != size or (key != "images" and value[0] > value[1])):
            raise ConfigError(
                f"data.{key}={show_value(list(value))}: expected [low, high]"
                if key != "images"
                else f"data.images={show_value(list(value))}: expected [train, val]"
            )
    if data == "digits_detection" and node.digit_sizes is not None and node.canvas is not None:
        if node.digit_sizes[1] > node.canvas:
            raise ConfigError(
                f"data.digit_sizes={show_value(list(node.digit_sizes))}: larger than the canvas ({node.canvas} px)"
            )
    if data == "coco" and cfg.finetune.path is None:
        raise ConfigError(
            "task=detection with data=coco needs finetune.path=<a DeiT checkpoint> (YOLOS fine-tunes a classifier: "
            "its --pre_trained; experiments=yolos_coco takes it as pretrained.<model>: pretrained.yolos_ti=..., "
            "pretrained.yolos_s=...); only the embedded data=digits_detection trains its own backbone"
        )
    for key in ("init_pe_size", "mid_pe_size"):
        value = cfg.detection.get(key)
        if value is not None and len(value) != 2:
            raise ConfigError(f"detection.{key}={show_value(list(value))}: expected [height, width] in pixels")
    if not cfg.detection.scales:
        raise ConfigError("detection.scales=[]: at least one training scale (the shortest side in pixels)")
    refusals = (
        (cfg.curriculum.enabled, f"method={cfg.method_name}: EfficientTrain's curriculum"),
        (cfg.tome.enabled, "method=tome: Token Merging (YOLOS's mid position embeddings would merge too)"),
        (cfg.prompts.enabled, "prompts.enabled=true: visual prompt tuning"),
        (bool(cfg.token_label.root), f"token_label.root={cfg.token_label.root}: token labeling"),
        (cfg.recipe.mixup > 0 or cfg.recipe.cutmix > 0, f"recipe.mixup={cfg.recipe.mixup} / cutmix: Mixup/CutMix"),
    )
    for refused, what in refusals:
        if refused:
            raise ConfigError(f"{what} is for classification; task=detection (YOLOS) cannot train with it")


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


def check_model(cfg: DictConfig, plan: "SchedulePlan") -> Any:
    """Build the run's model on the ``meta`` device (no memory, no weights: well under a second for a ViT-B), so
    that a model timm cannot build with these settings is refused naming its key before any data is read; returns
    the model."""
    import timm
    import torch

    import toe.models  # noqa: F401 - registers LV-ViT with timm
    from toe.models.settings import model_settings

    name, kwargs = cfg.model.name, OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    if plan.phases and "dynamic_img_size" in kwargs:
        raise ConfigError(
            f"model.kwargs.dynamic_img_size={kwargs['dynamic_img_size']}: method={cfg.method_name} "
            "sets it itself (the curriculum's changing resolution); leave it out"
        )
    extra = {"dynamic_img_size": True} if plan.phases else {}
    settings = model_settings(cfg.model, cfg.data.num_classes or 2, kwargs, **extra)
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
    return model


def _check_model_needs(cfg: DictConfig, model: Any, plan: "SchedulePlan") -> None:
    """What the model and the settings around it need of each other: a token reducer blocks it can reduce tokens in,
    token labels a dense head, a forced tensor pipeline what it can run (the model gives the interpolation the recipe
    leaves to it)."""
    from timm.data import resolve_model_data_config

    from toe.data.augment import IN_MEMORY_DATASETS, tensor_pipeline_reasons, tensor_refusal
    from toe.hosts import check_host

    if any(cfg[node].enabled for node in REDUCTION_NODES):  # check_model made sure the model has blocks
        try:  # a model whose blocks need the whole token grid (XCiT)
            check_host(model, f"method={cfg.method_name}")
        except TypeError as err:
            raise ConfigError(f"model.name={cfg.model.name}: {err}") from None
    if cfg.token_label.root and not hasattr(model, "drop_dense_head"):
        raise ConfigError(
            f"token_label.root is set, but model.name={cfg.model.name} has no dense head: token "
            "labeling is for LV-ViT (model=lvvit_t, lvvit_s or lvvit_cpu)"
        )
    if cfg.train.pipeline == "tensor":
        interpolation = cfg.recipe.train_interpolation or resolve_model_data_config(model)["interpolation"]
        in_memory = cfg.data.name in IN_MEMORY_DATASETS
        reasons = tensor_pipeline_reasons(
            cfg.recipe, interpolation, cfg.data.name, in_memory, bool(plan.phases), bool(cfg.token_label.root)
        )
        if reasons:
            raise ConfigError(tensor_refusal(reasons))
    if cfg.train.pipeline == "dali":
        from toe.data.dali import dali_unavailable

        interpolation = cfg.recipe.train_interpolation or resolve_model_data_config(model)["interpolation"]
        refusal = dali_unavailable(
            cfg.recipe, interpolation, cfg.data.name, phase_policies(cfg.curriculum), bool(cfg.token_label.root)
        )
        if refusal:
            raise ConfigError(refusal)


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
        return f"model.kwargs.{key}={show_value(kwargs[key])}: model.name={name} takes no such argument"
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
    subject = ", ".join(f"model.kwargs.{key}={show_value(kwargs[key])}" for key in named) or f"model.name={name}"
    return f"{subject}: timm cannot build the model ({text})"


def _check_timm_names(cfg: DictConfig) -> None:
    """The optimizer and RandAugment strings timm will parse, parsed now rather than after the data is loaded."""
    import timm.optim
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    list_optimizers = getattr(timm.optim, "list_optimizers", None)
    if list_optimizers is not None and cfg.recipe.opt.lower() not in list_optimizers():
        raise ConfigError(f"recipe.opt={cfg.recipe.opt}: not one of timm's optimizers (timm.optim.list_optimizers())")
    policies = [("recipe.auto_augment", cfg.recipe.auto_augment)]
    policies += [("curriculum.auto_augment", policy) for policy in phase_policies(cfg.curriculum)]
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
