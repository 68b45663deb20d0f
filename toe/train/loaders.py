"""The run's data loading: the training loaders per curriculum phase, the samplers, the worker count and pin-memory
setting for the device and the cores, and the choice between the tensor, DALI and PIL pipelines."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

import toe.models  # noqa: F401 - registers LV-ViT with timm
from toe.config.schema import ConfigError, RecipeConfig, RunConfig, phase_policies
from toe.config.stages import SchedulePlan
from toe.data.augment import (
    InMemoryImages,
    as_batch,
    tensor_pipeline_reasons,
    tensor_refusal,
)
from toe.data.datasets import SeededSamples, SeededTransforms, build_transforms
from toe.train.distributed import DistInfo


class TrainLoaders:
    """The training loader for the (micro-batch, RandAugment magnitude) the curriculum asks for, kept while it is
    asked for. A phase's loader has its own shallow copy of the training set with its own transform, so no
    loader's transform changes under it (or under its workers)."""

    def __init__(
        self,
        dataset,
        sampler,
        data_config: Dict[str, Any],
        recipe: RecipeConfig,
        auto_augment: str,
        **loader_kwargs: Any,
    ):
        self.dataset, self.sampler, self.data_config, self.recipe = dataset, sampler, data_config, recipe
        self.auto_augment, self.loader_kwargs = auto_augment, loader_kwargs
        self._loaders: Dict[Tuple[int, Optional[int]], Any] = {}

    def get(self, micro_batch: int, magnitude: Optional[int] = None):
        """The loader of ``micro_batch`` images per step, with RandAugment at ``magnitude`` (``None``: the
        recipe's own policy, on the training set itself)."""
        key = (micro_batch, magnitude)
        if key not in self._loaders:
            self._loaders.clear()  # curriculum phases do not come back: let the last one's workers go
            dataset = self.dataset
            if magnitude is not None:
                dataset = copy.copy(self.dataset)
                dataset.transform = build_transforms(
                    self.data_config,
                    dataclasses.replace(self.recipe, auto_augment=self.auto_augment.format(magnitude=magnitude)),
                )[0]
            if isinstance(self.sampler, SeededSamples):
                dataset = SeededTransforms(dataset)
            self._loaders[key] = torch.utils.data.DataLoader(
                dataset,
                batch_size=micro_batch,
                drop_last=True,
                sampler=self.sampler,
                **collate_settings(dataset),
                generator=own_generator(),
                **self.loader_kwargs,
            )
        return self._loaders[key]


class EpochSampler(torch.utils.data.RandomSampler):
    """A RandomSampler whose shuffle is a function of (seed, epoch), like DistributedSampler's: a resumed run
    draws the same batches as an uninterrupted one."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed * 100_003 + epoch)


def own_generator() -> torch.Generator:
    """A DataLoader's own generator: its iterators draw their workers' base seed from it, not from the global RNG
    that the training step (the tensor pipeline's crops, dropout, Mixup) draws from, so that how often a loader
    starts (evaluation every N epochs) does not move the training's draws."""
    return torch.Generator().manual_seed(0)


def collate_settings(dataset) -> Dict[str, Any]:
    """Datasets served a batch at a time (``__getitems__`` returning a batch) pass through the DataLoader as they
    are; a Subset of one too."""
    inner = getattr(dataset, "dataset", dataset)
    return {"collate_fn": as_batch} if isinstance(inner, InMemoryImages) else {}


def available_cores() -> int:
    """The cores this process may run on (SLURM's and taskset's limits included)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_settings(workers: Any, pipeline: str, device: torch.device, processes_per_node: int) -> Dict[str, Any]:
    """DataLoader keywords from ``train.workers`` (auto: none for the tensor pipeline, whose loader only indexes
    memory, nor on a CPU device, whose training uses every core; else this process's share of the cores less one
    for itself, up to 16), with persistent workers (no respawn per epoch), pinned memory on CUDA and a deeper
    prefetch there."""
    if workers == "auto":
        workers = (
            0
            if pipeline == "tensor" or device.type == "cpu"
            else min(16, max(1, available_cores() // max(1, processes_per_node) - 1))
        )
    settings: Dict[str, Any] = {"num_workers": int(workers), "pin_memory": device.type == "cuda"}
    if workers:
        settings.update(persistent_workers=True, prefetch_factor=4 if device.type == "cuda" else 2)
    return settings


def choose_pipeline(
    cfg: RunConfig, in_memory: bool, interpolation: str, plan: SchedulePlan, device: torch.device
) -> str:
    """``tensor``, ``dali`` or ``pil`` for ``train.pipeline`` (auto: tensor where it can run the recipe, else DALI
    for an image folder on CUDA where it is installed and can run the recipe, else pil); a forced ``tensor`` or
    ``dali`` that cannot is a ConfigError naming why. ``in_memory``: the training set's decoded images are at
    hand."""
    from toe.data.dali import dali_unavailable

    wanted, token_labels = cfg.train.pipeline, bool(cfg.token_label.root)
    reasons = tensor_pipeline_reasons(
        cfg.recipe, interpolation, cfg.data.name, in_memory, bool(plan.phases), token_labels
    )
    if wanted == "tensor" and reasons:  # validate() refuses this before the data is read
        raise ConfigError(tensor_refusal(reasons))
    if wanted in ("auto", "tensor") and not reasons:
        return "tensor"
    if wanted == "dali" or (wanted == "auto" and device.type == "cuda"):
        refusal = dali_unavailable(
            cfg.recipe, interpolation, cfg.data.name, phase_policies(cfg.curriculum), token_labels
        )
        if wanted == "dali" and refusal:  # validate() refuses this before the data is read
            raise ConfigError(refusal)
        if refusal is None:
            return "dali"
    return "pil"


def processes_per_node(info: DistInfo) -> int:
    import os

    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):  # torchrun; SLURM
        value = os.environ.get(name, "")
        if value.split("(")[0].isdigit():
            return int(value.split("(")[0])
    return info.world_size


def train_sampler(dataset, cfg: RunConfig, info: DistInfo):
    if not info.enabled:
        return EpochSampler(dataset, cfg.seed)
    if cfg.recipe.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        return RepeatAugSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True)
    return torch.utils.data.DistributedSampler(
        dataset, info.world_size, info.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )


class DaliLoaders:
    """:class:`TrainLoaders`' interface for the DALI pipeline: one loader for the run, set to the micro-batch and
    RandAugment magnitude each curriculum phase asks for (:meth:`toe.data.dali.DaliTrainLoader.reconfigure`:
    a phase's magnitude is only its draws', a new micro-batch a new graph)."""

    def __init__(self, loader: Any, phase_policy: str):
        self.loader, self.phase_policy = loader, phase_policy
        self.augment = loader.augment  # the recipe's (under the curriculum, its first phase's)

    def get(self, micro_batch: int, magnitude: Optional[int] = None):
        """The loader of ``micro_batch`` images per step, with RandAugment at ``magnitude`` (``None``: the
        augmentation the loader was built with)."""
        augment = self.augment
        if magnitude is not None:
            augment = augment.with_policy(self.phase_policy.format(magnitude=magnitude))
        self.loader.reconfigure(micro_batch, augment)
        return self.loader


def dali_threads(workers: Any, device: torch.device, processes_per_node: int) -> int:
    """DALI's CPU threads for ``train.workers``: auto gives one on a CPU device (whose training uses every core),
    else this process's share of the cores less one for itself (which reads the files and draws the
    augmentation), up to 16."""
    if workers != "auto":
        return max(1, int(workers))
    if device.type == "cpu":
        return 1
    return min(16, max(1, available_cores() // max(1, processes_per_node) - 1))


def dali_train_loaders(
    train_set,
    sampler,
    cfg: RunConfig,
    data_config: Dict[str, Any],
    interpolation: str,
    device: torch.device,
    local_batch: int,
    info: DistInfo,
):
    """The DALI pipeline's training loaders (toe.data.dali) for a timm image folder, with timm's random erasing on
    the device batch."""
    from timm.data.random_erasing import RandomErasing

    from toe.data.dali import DaliAugment, DaliTrainLoader, folder_samples

    recipe = cfg.recipe
    augment = DaliAugment.from_recipe(
        recipe, cfg.model.img_size, interpolation, data_config["mean"], data_config["std"]
    )
    policies = phase_policies(cfg.curriculum)
    if policies:  # the curriculum's policies replace the recipe's: its graph is the first phase's
        augment = augment.with_policy(policies[0])
    erase = (
        RandomErasing(recipe.reprob, mode=recipe.remode, max_count=1, num_splits=0, device=str(device))
        if recipe.reprob > 0
        else None
    )
    decode_device = device if cfg.train.dali_decode == "gpu" else torch.device("cpu")
    loader = DaliTrainLoader(
        folder_samples(train_set),
        sampler,
        local_batch,
        augment,
        device,
        dali_threads(cfg.train.workers, device, processes_per_node(info)),
        cfg.seed,
        info.rank,
        erase=erase,
        decode_device=decode_device,
    )
    return DaliLoaders(loader, cfg.curriculum.auto_augment)
