"""The config schema (toe/config/): every bad config is refused before training, in one line naming the key."""

import json
import subprocess
import sys

import pytest
from conftest import TINY_RUN
from hydra import compose, initialize_config_module

from toe.config.compose import compose_error_line, is_compose_error
from toe.config.schema import ConfigError
from toe.config.validate import validate

# (overrides, what the one-line refusal must contain). Each is composed as toe-train composes it and checked by
# validate(), the function train() and the sweep check call before anything is written.
BAD_CONFIGS = [
    # what timm cannot build, named by its key (the model is built on the meta device by validate)
    (["model.kwargs.num_heads=3"], "model.kwargs.num_heads=3: timm cannot build the model"),
    (["method=baseline", "model.kwargs.depth=0"], "model.kwargs.depth=0: 0 block(s)"),
    (["model.kwargs.depth=1"], "model.kwargs.depth=1: 1 block(s); method=toe reduces the tokens after the first"),
    (["model.patch_size=32"], "model.patch_size=32 with model.img_size=32: 1 patch token(s)"),
    (["model.img_size=4"], "model.patch_size=4 with model.img_size=4: 1 patch token(s)"),
    (["model.name=resnet18"], "model.name=resnet18: not a vision transformer toe can train"),
    (["model.name=nope_model"], "model.name=nope_model: not one of timm's models"),
    (["model.kwargs.embed_dim=-8"], "model.kwargs.embed_dim=-8: timm cannot build the model"),
    (["model.kwargs.depth=nope"], "model.kwargs.depth=nope: timm cannot build the model"),
    (
        ["method=efficienttrain", "schedule.epochs=10", "+model.kwargs.dynamic_img_size=true"],
        "model.kwargs.dynamic_img_size=True: method=efficienttrain sets it itself",
    ),
    (["recipe.sched=plateau"], "recipe.sched=plateau: expected one of"),
    # what the model and the pipeline need of each other, refused before any data is read (the sweep pre-check too)
    (
        ["train.pipeline=tensor", "recipe.auto_augment=rand-m9-mstd0.5-inc1"],
        "train.pipeline=tensor cannot run this run: recipe.auto_augment=rand-m9-mstd0.5-inc1",
    ),
    (["train.pipeline=tensor", "data=imagefolder", "data.root=/nonexistent"], "data=imagefolder is read from files"),
    (
        ["model.name=xcit_nano_12_p16_224", "model.patch_size=16"],
        "model.name=xcit_nano_12_p16_224: method=toe cannot reduce the tokens of xcit_nano_12_p16_224 (Xcit): "
        "its blocks use local patch interaction",
    ),
    (
        ["method=tome", "model.name=xcit_nano_12_p16_224", "model.patch_size=16"],
        "model.name=xcit_nano_12_p16_224: method=tome cannot reduce the tokens of xcit_nano_12_p16_224 (Xcit)",
    ),
    (["token_label.root=/tmp"], "token_label.root is set, but model.name=vit_tiny_patch16_224 has no dense head"),
    (["recipe.mixup=0.8", "recipe.batch_size=63"], "recipe.batch_size=63 with recipe.mixup=0.8"),
    (["recipe.scale=[1.0,0.5]"], "recipe.scale=[1.0,0.5]: the crop's area share as [low, high]"),
    (["recipe.scale=[0.5]"], "recipe.scale=[0.5]: the crop's area share"),
    (["recipe.auto_augment=rand-m9-foo"], "recipe.auto_augment=rand-m9-foo: timm would ignore 'foo'"),
    (["data.val_fraction=0.999"], "data.val_fraction=0.999: 1796 of the 1797 digits"),
    (["data.val_fraction=0.001"], "data.val_fraction=0.001: 2 of the 1797 digits"),
    (["data.split_seed=-1"], "data.split_seed=-1: must be >= 0"),
    (["seed=99999999999"], "seed=99999999999: must be >= 0"),
    (["schedule.epochs=abc"], "schedule.epochs=abc"),
    (["schedule.epochs=0"], "schedule.epochs=0: must be >= 1"),
    (["schedule.stage_starts=[0,100]"], "schedule.stage_starts=[0,100]"),
    (["schedule.length=300", "schedule.stage_starts=[0,100,200]"], "schedule.stage_starts=[0,100,200]"),
    (["schedule.stage_starts=[0,-5,200]"], "schedule.stage_starts=[0,-5,200]: must be >= 0"),
    (["toe.sparse_eval=maybe"], "toe.sparse_eval=maybe"),
    (["toe.keep_rates=[0.5,0.4,1.0]"], "toe.keep_rates=[0.5,0.4,1.0]"),
    (["toe.keep_rates=[0.5,0.75,1.5]"], "toe.keep_rates=[0.5,0.75,1.5]: must be > 0 and <= 1"),
    (["toe.init_keep_rate=0.6"], "toe.init_keep_rate=0.6"),
    (["toe.init_keep_rate=0"], "toe.init_keep_rate=0.0: must be > 0"),
    (["toe.repeats=0"], "toe.repeats=0: must be >= 1"),
    (["toe.distance=l1"], "toe.distance=l1: expected one of cosine, manhattan, euclidean"),
    (["toe.merge=max"], "toe.merge=max"),
    (["toe.foo=1"], "toe.foo=1"),
    (["+foo=1"], "foo=1: no such key"),
    (["model=nope"], "model/nope"),
    (["model.img_size=30"], "model.img_size=30: the patch size 4"),
    (["model.drop_path=1.5"], "model.drop_path=1.5"),
    (["model.kwargs.bogus=1"], "model.kwargs.bogus=1"),
    (["recipe.batch_size=0"], "recipe.batch_size=0: must be >= 1"),
    (["recipe.batch_size=1.5"], "recipe.batch_size=1.5"),
    (["recipe.lr=-1"], "recipe.lr=-1.0: must be > 0"),
    (["recipe.smoothing=1.0"], "recipe.smoothing=1.0"),
    (["recipe.loss=focal"], "recipe.loss=focal: expected one of"),
    (["token_label.root=/tmp", "recipe.loss=bce"], "recipe.loss=bce with token_label.root=/tmp"),
    (["recipe.mixup_prob=2"], "recipe.mixup_prob=2.0"),
    (["recipe.opt=adamz"], "recipe.opt=adamz"),
    (["recipe.auto_augment=rand-zz9"], "recipe.auto_augment=rand-zz9"),
    (["train.device=gpu"], "train.device=gpu"),
    (["train.device=cuda:99"], "train.device=cuda:99"),
    (["train.amp=fp8"], "train.amp=fp8"),
    (["train.workers=-1"], "train.workers=-1"),
    (["train.eval_every=0"], "train.eval_every=0"),
    (["train.progress=maybe"], "train.progress=maybe"),
    (["data=imagenet"], "missing value for data.root"),
    (["data.name=mnist"], "data.name=mnist"),
    (["logger.wandb.mode=cloud"], "logger.wandb.mode=cloud"),
    (["finetune=checkpoint"], "missing value for finetune.path"),
    (["finetune=checkpoint", "finetune.path=/nonexistent.pth"], "finetune.path=/nonexistent.pth: no such file"),
    (["token_label.box_order=yx"], "token_label.box_order=yx"),
    (["model=lvvit_cpu", "token_label.root=.", "recipe.mixup=0.8"], "token_label.root=."),
    (["method=efficienttrain", "schedule.epochs=3"], "curriculum.phases"),
    (["seed=-1"], "seed=-1: must be >= 0"),
]


def refusal(overrides):
    """The one line toe-train would print for ``overrides``, or None if the config is accepted."""
    with initialize_config_module(config_module="toe.conf", version_base="1.3"):
        try:
            validate(compose(config_name="train", overrides=TINY_RUN + overrides))
        except ConfigError as err:
            return str(err)
        except Exception as err:  # noqa: BLE001 - what Hydra raises while composing
            assert is_compose_error(err), f"{type(err).__name__} is not a config error: {err}"
            return compose_error_line(err)
    return None


@pytest.mark.parametrize("overrides, message", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_a_bad_config_is_refused_in_one_line_naming_the_key(overrides, message):
    line = refusal(overrides)
    assert line is not None, f"{overrides} was accepted"
    assert message in line and "\n" not in line, line


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["method=baseline"],
        ["toe=r0.3"],
        ["model=lvvit_cpu"],
        ["recipe=deit"],
        ["train.progress=true"],
        ["schedule=hyper", "schedule.epochs=30"],
        ["+model.kwargs.qkv_bias=false"],
        ["experiments=table1_deit", "data=digits"],
        # a run without stages has no stage split to fit into its epochs
        ["method=baseline", "schedule.epochs=2"],
        ["method=baseline", "schedule.epochs=1"],
        ["model.patch_size=16"],
        # full tokens train any timm ViT; every reducer hands rotary embeddings and relative biases their positions
        ["method=baseline", "model.name=eva02_tiny_patch14_224"],
        ["model.name=eva02_tiny_patch14_224"],
        ["method=tome", "model.name=beit_base_patch16_224"],
        ["method=patchdropout", "model.name=vit_relpos_small_patch16_224"],
        # each family's model= options, the published sizes with their recipes
        ["model=eva_cpu"],
        ["model=beit_cpu", "method=tome"],
        ["model=relpos_cpu", "method=patchdropout"],
    ],
)
def test_good_configs_are_accepted(overrides):
    assert refusal(overrides) is None


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=deit3_small", "recipe=deit3"],
        ["model=eva02_small"],
        ["model=beit_base", "method=tome"],
        ["model=relpos_small", "method=patchdropout"],
        ["experiments=universality", "model=eva02_small", "data.root=/data/imagenet"],
    ],
)
def test_each_familys_published_size_validates_as_its_run_would(overrides):
    """The model is built on the meta device, so a ViT-B costs nothing here."""
    with initialize_config_module(config_module="toe.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=none", *overrides])
    assert cfg.model.img_size == 224
    validate(cfg)


def test_the_operator_settings_are_their_own_group():
    with initialize_config_module(config_module="toe.conf", version_base="1.3"):
        official = compose(config_name="train").toe
        et = compose(config_name="train", overrides=["method=efficienttrain_toe"]).toe
        lvvit = compose(config_name="train", overrides=["experiments=table3_lvvit", "label_maps=x"]).toe
        chosen = compose(config_name="train", overrides=["method=efficienttrain_toe", "toe=r0.4"]).toe
    assert (official.init_keep_rate, list(official.keep_rates), official.repeats) == (0.25, [0.5, 0.75, 1.0], 2)
    assert (et.init_keep_rate, list(et.keep_rates), et.enabled) == (0.3, [0.6, 0.8, 1.0], True)
    assert (lvvit.init_keep_rate, list(lvvit.keep_rates)) == (0.2, [0.4, 0.7, 1.0])
    assert list(chosen.keep_rates) == [0.4, 0.7, 1.0]  # the command line beats a method's choice


def test_every_method_file_is_the_registry_entry_of_its_name():
    """conf/method/<name>.yaml sets method_name <name>, enables the registry's reducer (and no other) and the
    curriculum exactly when the registry says so; the registry has no method without a file."""
    from pathlib import Path

    from toe.ops.methods import METHODS, REDUCTION_NODES

    files = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "method").glob("*.yaml"))
    assert files == sorted(m.name for m in METHODS)
    with initialize_config_module(config_module="toe.conf", version_base="1.3"):
        for method in METHODS:
            cfg = compose(config_name="train", overrides=[f"method={method.name}"])
            enabled = [node for node in REDUCTION_NODES if cfg[node].enabled]
            assert (cfg.method_name, enabled, cfg.curriculum.enabled) == (
                method.name,
                [method.reducer] if method.reducer else [],
                method.curriculum,
            )


def test_recipes_share_the_deit_base_and_keep_their_own_values():
    with initialize_config_module(config_module="toe.conf", version_base="1.3"):
        recipes = {
            name: compose(config_name="train", overrides=[f"recipe={name}"]).recipe
            for name in ("deit", "cpu", "lvvit", "efficienttrain", "finetune_cifar")
        }
    assert recipes["deit"].lr == 5e-4 and recipes["deit"].mixup == 0.8 and recipes["deit"].ema_decay == 0.99996
    assert recipes["lvvit"].lr == 1.6e-3 and recipes["lvvit"].mixup == 0.0 and recipes["lvvit"].opt == "adamw"
    assert recipes["efficienttrain"].batch_size == 4096 and recipes["efficienttrain"].ema is False
    assert recipes["finetune_cifar"].opt == "sgd" and recipes["finetune_cifar"].auto_augment == "rand-m9-mstd0.5-inc1"
    assert recipes["cpu"].batch_size == 64 and recipes["cpu"].hflip == 0.0 and recipes["cpu"].weight_decay == 0.05


@pytest.mark.parametrize(
    "override, message",
    [
        ("schedule.epochs=abc", "schedule.epochs=abc"),  # refused by Hydra while composing
        ("recipe.batch_size=0", "recipe.batch_size=0"),  # refused by validate()
        ("model=nope", "model/nope"),
    ],
)
def test_the_command_line_refuses_in_one_line_without_a_traceback_before_training(tmp_path, override, message):
    proc = subprocess.run(
        [sys.executable, "-m", "toe.cli.train", "logger=none", override, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert message in output and "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
    assert [line for line in output.splitlines() if message in line] and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoint.pth").exists()
    if (tmp_path / "run" / "summary.json").exists():  # a new run dir records the refusal, so a sweep shows it
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["epochs"] == 0 and message in summary["error"]


def test_a_multirun_with_one_bad_job_starts_no_job_and_names_it(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "toe.cli.train",
            "-m",
            "logger=none",
            "recipe.lr=1e-3,-1",
            f"hydra.sweep.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "the command line: job 1 (logger=none recipe.lr=-1): recipe.lr=-1.0: must be > 0" in output
    assert not (tmp_path / "0").exists() and not (tmp_path / "1").exists()


def test_an_unbalanced_override_says_what_to_fix():
    line = refusal(["toe.keep_rates=[0.5,0.75,1.0"])
    assert "cannot read the override 'toe.keep_rates=[0.5,0.75,1.0'" in line and "close every bracket" in line
