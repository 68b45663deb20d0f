"""VTAB-1k task folders (toe.data.vtab), on folders the tests write in the layout the PEFT codes share."""

from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg
from PIL import Image

from toe.config.schema import typed_config
from toe.data.datasets import DataRootError, build_datasets, class_count


def write_vtab_task(root: Path, task: str, labels=(0, 1, 2), per_label=4, size=24) -> Path:
    """A task folder: images/ and the four list files (train800 / val200 / train800val200 / test, here a few
    images each), class k a flat colour of brightness 40 + 60 k with noise."""
    rng = np.random.default_rng(0)
    folder = root / task
    (folder / "images").mkdir(parents=True)
    lines = {"train800": [], "val200": [], "test": []}
    for label in labels:
        for i in range(per_label):
            name = f"images/{label}_{i}.png"
            pixels = np.clip(rng.normal(40 + 60 * label, 15, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name)
            split = "train800" if i < per_label - 2 else ("val200" if i == per_label - 2 else "test")
            lines[split].append(f"{name} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def _cfg(root: Path, task: str, *extra: str):
    return typed_config(compose_cfg(["logger=none", "data=vtab", f"data.root={root}", f"data.task={task}", *extra]))


def test_a_task_folder_reads_as_vpts_final_protocol_with_vtabs_class_count(tmp_path):
    write_vtab_task(tmp_path, "kitti", labels=(0, 1, 3))  # VTAB's kitti has 4 classes; this split lacks one
    cfg = _cfg(tmp_path, "kitti")
    train, val = build_datasets(cfg)
    assert (len(train), len(val)) == (9, 3)  # train800val200 and test
    assert train.classes == ["0", "1", "2", "3"] and class_count(cfg) == 4
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (24, 24) and label == 0
    tune_train, tune_val = build_datasets(_cfg(tmp_path, "kitti", "data.train_split=train800", "data.val_split=val200"))
    assert (len(tune_train), len(tune_val)) == (6, 3)
    write_vtab_task(tmp_path, "my_task", labels=(0, 4))  # not a VTAB task: the classes its labels give
    assert class_count(_cfg(tmp_path, "my_task")) == 5


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "test.txt").unlink(), r"test.txt: no such list file"),
        (
            lambda f: (f / "test.txt").write_text("images/0_3.png\n"),
            r"test.txt, line 1: expected '<image path> <label>'",
        ),
        (lambda f: (f / "test.txt").write_text("images/0_3.png 7\n"), r"line 1: label 7 is outside 0..3"),
        (lambda f: (f / "images" / "0_3.png").unlink(), r"test.txt, line 1: images/0_3.png is not a file"),
        (lambda f: (f / "test.txt").write_text("\n"), r"test.txt: no images listed"),
    ],
)
def test_a_list_file_that_cannot_be_read_is_named_in_one_line(tmp_path, damage, message):
    damage(write_vtab_task(tmp_path, "kitti"))
    with pytest.raises(DataRootError, match=message):
        build_datasets(_cfg(tmp_path, "kitti"))


def test_a_missing_task_folder_lists_the_tasks_there(tmp_path):
    write_vtab_task(tmp_path, "dtd")
    with pytest.raises(DataRootError, match=r"cifar: no such task folder \(found: dtd\)"):
        build_datasets(_cfg(tmp_path, "cifar"))


def test_vpt_trains_on_a_vtab_task(digits_teacher, tmp_path):
    from toe.train.task import train

    write_vtab_task(tmp_path / "vtab", "kitti", labels=(0, 1, 2, 3), per_label=6)
    cfg = compose_cfg(
        [
            "logger=none",
            "finetune=vpt",
            f"finetune.path={digits_teacher / 'checkpoint.pth'}",
            "data=vtab",
            f"data.root={tmp_path / 'vtab'}",
            "data.task=kitti",
            "recipe.batch_size=8",
            "recipe.warmup_epochs=0",
            "schedule.epochs=3",
            "schedule.length=3",
        ]
    )
    summary = train(cfg, tmp_path / "run")
    assert summary.status == "completed" and summary.data == "vtab" and summary.epochs == 3
    assert summary.final_top1 is not None and summary.peak_activation_mib > 0


def test_the_report_compares_each_task_with_its_own_baseline_and_means_the_groups():
    import pandas as pd

    from toe.analysis.report import verdicts
    from toe.analysis.tables import TABLES, build_table, vtab_groups

    rows = []
    # two natural tasks, one specialized, one structured; VPT-deep only; ToE 2x faster, one point lower
    for task, base in (("cifar", 0.70), ("dtd", 0.60), ("eurosat", 0.90), ("kitti", 0.50)):
        for method, top1, hours in (("baseline", base, 2.0), ("toe", base - 0.01, 1.0)):
            for seed in (0, 1):
                rows.append(
                    {
                        "run": f"{task}-{method}-{seed}",
                        "status": "completed",
                        "model": "vit_base",
                        "data": "vtab",
                        "data.task": task,
                        "prompts.deep": True,
                        "method": method,
                        "final_top1": top1 + 0.002 * seed,
                        "train_flops_per_image_linear": 1e9,
                        "train_flops_per_image": 1.2e9,
                        "device_hours": hours,
                    }
                )
    table = build_table(pd.DataFrame(rows), TABLES["vpt_vtab"])
    toe = table[table["method"] == "toe"].set_index("data.task")
    # each task against its own baseline: the same 2x and -1 point everywhere (a shared reference would not)
    assert toe["speedup"].tolist() == pytest.approx([2.0] * 4)
    assert toe["top1_delta"].tolist() == pytest.approx([-1.0] * 4)
    assert all("faster by 2.00x, top-1 -1.00 points" in line for line in verdicts(table))
    groups = vtab_groups(table).set_index("method")
    assert groups.loc["baseline", "natural"] == pytest.approx(65.1)  # (70.1 + 60.1) / 2
    assert groups.loc["baseline", "specialized"] == pytest.approx(90.1)
    assert groups.loc["baseline", "mean of groups"] == pytest.approx((65.1 + 90.1 + 50.1) / 3)
    assert groups.loc["toe", "tasks"] == 4 and groups.loc["toe", "train hours (all tasks)"] == pytest.approx(4.0)
