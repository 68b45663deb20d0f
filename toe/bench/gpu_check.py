"""``scripts/gpu-check.sh`` (``python -m toe.bench.gpu_check``): every CUDA path of toe in one short run, for the
day a GPU is lent (this project's sessions get about 15 minutes of one).

Each check runs the real command (``toe-train``, ``torchrun``, ``toe-bench``) in a subprocess on small data it writes
(the embedded digits; a JPEG image folder) and prints one line: ``[ok]``, ``[FAIL]`` or ``[skip]`` with the
figure it measured or the reason. Without CUDA the GPU checks skip, saying so, and the CPU ones still run (that is
how CI runs it). The figures, and each command's output tail, go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch


@dataclass
class CheckResult:
    name: str
    status: str  # ok | FAIL | skip
    detail: str
    seconds: float = 0.0
    figures: Dict[str, Any] = field(default_factory=dict)
    output_tail: str = ""

    def line(self) -> str:
        return f"[{self.status}] {self.name}: {self.detail}" + (f" ({self.seconds:.0f} s)" if self.seconds else "")


@dataclass
class Check:
    name: str
    needs_cuda: bool
    command: Callable[[Path], List[str]]  # the command, given the work folder
    verify: Callable[[Path, str], Dict[str, Any]]  # the run's folder and output -> figures; raises when it failed
    needs: Optional[str] = None  # a module the check needs (nvidia.dali)
    timeout: int = 180


class CheckFailed(Exception):
    pass


def _summary(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.exists():
        raise CheckFailed(f"no summary.json in {run_dir}")
    summary = json.loads(path.read_text())
    if summary.get("status") != "completed":
        raise CheckFailed(f"run status {summary.get('status')}")
    return summary


def _log(run_dir: Path) -> str:
    path = run_dir / "train.log"
    return path.read_text() if path.exists() else ""


def _train_cli(run_dir: Path, *extra: str, epochs: int = 2) -> List[str]:
    return [
        sys.executable,
        "-m",
        "toe.cli.train",
        "logger=none",
        f"schedule.epochs={epochs}",
        f"schedule.length={epochs}",
        "schedule.stage_starts=[0,1,2]",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _trained(*needles: str) -> Callable[[Path, str], Dict[str, Any]]:
    """A verifier: the run completed, its train.log holds every needle, and its figures."""

    def verify(run_dir: Path, output: str) -> Dict[str, Any]:
        summary = _summary(run_dir)
        log = _log(run_dir) + output
        missing = [needle for needle in needles if needle not in log]
        if missing:
            raise CheckFailed(f"the log lacks {missing}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {
            "final_top1": summary.get("final_top1"),
            "img_per_s_last_epoch": rows[-1].get("train_img_per_s"),
            "train_loss_last_epoch": rows[-1].get("train_loss"),
        }

    return verify


def _bench_rows(run_dir: Path, output: str) -> Dict[str, Any]:
    path = run_dir / "bench.json"
    if not path.exists():
        raise CheckFailed("toe-bench wrote no JSON")
    return {"rows": json.loads(path.read_text())["rows"]}


def _image_folder(work: Path) -> Path:
    """Two classes of JPEGs (64 train, 16 val each, 160 x 120 px): an image folder for the pipelines."""
    from toe.bench.capacity import write_jpeg_images

    root = work / "jpegs"
    if not root.exists():
        for split, count in (("train", 64), ("val", 16)):
            for label, name in enumerate(("a", "b")):
                write_jpeg_images(root / split / name, count, (160, 120), seed=10 * label + (split == "val"))
    return root


def _folder_run(*extra: str, epochs: int = 2) -> Callable[[Path], List[str]]:
    """A short run on the JPEG folder with the DeiT recipe's augmentation at the CPU model's 32 px."""

    def command(work: Path) -> List[str]:
        return _train_cli(
            work / "run",
            "data=imagefolder",
            f"data.root={_image_folder(work)}",
            "recipe=deit",
            "recipe.batch_size=32",
            "model=vit_cpu",
            *extra,
            epochs=epochs,
        )

    return command


def checks(cuda: bool) -> List[Check]:
    gpus = torch.cuda.device_count() if cuda else 0
    device = "cuda" if cuda else "cpu"
    return [
        Check(
            "amp-bf16-fused-adamw",
            True,
            lambda w: _train_cli(w / "run", "train.device=cuda", "train.amp=bf16"),
            _trained("bf16 autocast", "torch's fused kernel"),
        ),
        Check(
            "amp-fp16-scaler",
            True,
            lambda w: _train_cli(w / "run", "train.device=cuda", "train.amp=fp16"),
            _trained("fp16 autocast with timm's loss scaler"),
        ),
        Check(
            "torch-compile",
            True,
            lambda w: _train_cli(w / "run", "train.device=cuda", "train.compile=true"),
            _trained(),
            timeout=300,
        ),
        Check(
            "ddp-nccl",
            True,
            lambda w: [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={max(1, min(2, gpus))}",
                "--master_port=29561",
                *_train_cli(w / "run", "train.device=cuda")[1:],
            ],
            _trained(),
            timeout=240,
        ),
        Check(
            "dali-gpu-decode",
            True,
            _folder_run("train.device=cuda", "train.pipeline=dali"),
            _trained("training images: dali pipeline", "decoding on the GPU (nvJPEG)"),
            needs="nvidia.dali",
        ),
        Check(
            "dali-cpu-decode",
            True,
            _folder_run("train.device=cuda", "train.pipeline=dali", "train.dali_decode=cpu"),
            _trained("training images: dali pipeline", "augmenting on the GPU"),
            needs="nvidia.dali",
        ),
        Check(
            "dali-curriculum",
            True,  # five phases of one epoch, the last of two micro-batches of 16 per step
            _folder_run("train.device=cuda", "train.pipeline=dali", "method=efficienttrain_toe", epochs=5),
            _trained("training images: dali pipeline", "RandAugment m9, 2 micro-batches of 16 per step"),
            needs="nvidia.dali",
        ),
        Check(
            "auto-pipeline-on-cuda",
            True,
            _folder_run("train.device=cuda"),
            _trained("training images: dali pipeline (train.pipeline=auto)"),
            needs="nvidia.dali",
        ),
        Check(
            "pil-image-folder",
            False,
            _folder_run(f"train.device={device}", "train.pipeline=pil", "train.workers=2"),
            _trained("training images: pil pipeline"),
        ),
        Check(
            "dali-cpu-threads",
            False,
            _folder_run("train.device=cpu", "train.pipeline=dali"),
            _trained("training images: dali pipeline", "decoding on 1 CPU thread(s)"),
            needs="nvidia.dali",
        ),
        Check(
            "bench-step",
            False,
            lambda w: (
                [sys.executable, "-m", "toe.cli.bench", "--device", device, "--json", str(w / "run" / "bench.json")]
                + (
                    ["step", "--amp", "--batch", "128", "--warmup", "3", "--repeats", "10"]
                    if cuda
                    else ["step", "--model", "deit_tiny_patch16_224", "--batch", "4", "--warmup", "1", "--repeats", "2"]
                )
            ),
            _bench_rows,
            timeout=300,
        ),
        Check(
            "bench-capacity",
            False,
            lambda w: (
                [sys.executable, "-m", "toe.cli.bench", "--json", str(w / "run" / "bench.json"), "capacity"]
                + ["--images", "64" if cuda else "16", "--repeats", "3" if cuda else "1"]
            ),
            _bench_rows,
            timeout=300,
        ),
    ]


def _missing(module: Optional[str]) -> Optional[str]:
    if module is None:
        return None
    import importlib.util

    return None if importlib.util.find_spec(module.split(".")[0]) and _importable(module) else module


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except (ImportError, OSError):
        return False
    return True


class _Results(list):
    """The results, each printed as it comes."""

    def append(self, result: CheckResult) -> None:
        print(result.line(), flush=True)
        super().append(result)


def run_checks(work: Path, budget_s: float, only: Optional[List[str]] = None) -> List[CheckResult]:
    cuda = torch.cuda.is_available()
    results = _Results()
    deadline = time.monotonic() + budget_s
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cuda:
        results.append(
            CheckResult(
                "cuda",
                "ok",
                f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s), torch {torch.__version__}, "
                f"CUDA {torch.version.cuda}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}",
            )
        )
    else:
        results.append(CheckResult("cuda", "skip", f"no CUDA device (torch {torch.__version__}): GPU checks skip"))
    for check in checks(cuda):
        if only and check.name not in only:
            continue
        if check.needs_cuda and not cuda:
            results.append(CheckResult(check.name, "skip", "no CUDA device"))
            continue
        missing = _missing(check.needs)
        if missing:
            results.append(CheckResult(check.name, "skip", f"{missing} is not installed"))
            continue
        left = deadline - time.monotonic()
        if left < 20:
            results.append(CheckResult(check.name, "skip", f"out of time (--budget {budget_s:.0f} s)"))
            continue
        folder = work / check.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run").mkdir(exist_ok=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(
                check.command(folder),
                capture_output=True,
                text=True,
                timeout=min(check.timeout, left),
                env=env,
                cwd=folder,
            )
            output = proc.stdout + proc.stderr
            if proc.returncode != 0:
                raise CheckFailed(f"exit code {proc.returncode}: {_last_line(output)}")
            figures = check.verify(folder / "run", output)
            result = CheckResult(check.name, "ok", _figure_text(figures), figures=figures, output_tail=output[-4000:])
        except subprocess.TimeoutExpired as err:
            output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            result = CheckResult(check.name, "FAIL", f"timed out after {err.timeout:.0f} s", output_tail=output[-4000:])
        except CheckFailed as err:
            result = CheckResult(check.name, "FAIL", str(err), output_tail=locals().get("output", "")[-4000:])
        result.seconds = time.monotonic() - start
        results.append(result)
    return list(results)


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _figure_text(figures: Dict[str, Any]) -> str:
    if "rows" in figures:
        rows = figures["rows"]
        if rows and "pipeline" in rows[0]:
            return "; ".join(
                f"{row['pipeline']} {row['jpeg']}: "
                + (f"{row['img_per_s_per_core']:.0f} img/s per core" if row["img_per_s_per_core"] else "n/a")
                for row in rows
            )
        speedups = [
            f"{row.get('stage')}: {row.get('speedup', 0):.2f}x at {row.get('flop_ratio', 0):.2f}"
            for row in rows
            if "speedup" in row
        ]
        return "step speed-up per stage " + ", ".join(speedups) if speedups else f"{len(rows)} rows"
    parts = []
    if figures.get("final_top1") is not None:
        parts.append(f"top-1 {figures['final_top1']:.3f}")
    if figures.get("img_per_s_last_epoch"):
        parts.append(f"{figures['img_per_s_last_epoch']:.0f} img/s in the last epoch")
    return ", ".join(parts) or "completed"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the figures, as JSON")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all the checks (default 540)")
    parser.add_argument("--only", nargs="+", help="run these checks only")
    parser.add_argument("--work", type=Path, help="where the checks write (default: a temporary folder)")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        results = run_checks(work, args.budget, args.only)
    failed = [result for result in results if result.status == "FAIL"]
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "FAIL", "skip")}
    print(f"{counts['ok']} ok, {counts['FAIL']} failed, {counts['skip']} skipped in {time.time() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "torch": torch.__version__,
                "cuda": torch.cuda.is_available(),
                "checks": [asdict(result) for result in results],
            },
            indent=2,
        )
    )
    print(f"figures: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
