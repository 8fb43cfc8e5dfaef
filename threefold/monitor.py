"""Rank-0 side effects of training: the metrics file, TensorBoard, the loss plot and the progress bar.

Only rank 0 should build a MetricsWriter or an enabled TrainProgress; the other ranks pass
`enabled=False` (or build nothing) so that a run writes one file and draws one bar.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from threefold.config.sections import WandbMode
from threefold.files import write_atomic


def _finite_or_none(value: Any) -> float | None:
    # Strict JSON has no NaN or Infinity: a diverged loss is written as null so that jq, pandas and
    # other strict parsers still read the file. TensorBoard receives the raw value.
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Append `{"step": step, **metrics}` to out_dir/metrics.jsonl and mirror scalars to TensorBoard.

    Keys are namespaced like "train/loss", "val/loss", "train/lr". The file is opened in append mode, so
    a resumed run continues the same file; each line is flushed as soon as it is written, so the file is
    complete up to the last logged step if the job dies.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        tensorboard: bool = True,
        run_name: str = "run",
        wandb: WandbRun | None = None,
    ) -> None:
        """`wandb`: a W&B run that receives the same scalars and samples (finished by close())."""
        self.out_dir = Path(out_dir)
        self._wandb = wandb
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self._file = open(self.jsonl_path, "a", encoding="utf-8")  # closed in close()
        self._tb = None
        if tensorboard:
            # Imported here: loading TensorBoard takes about a second, and runs without it should not pay.
            from torch.utils.tensorboard import SummaryWriter

            # One directory per run under tb/ (see tensorboard_run_name): TensorBoard shows each start as
            # its own curve instead of drawing a rerun's steps over the first attempt's.
            self.tb_dir = _fresh_dir(self.out_dir / "tb", run_name)
            self._tb = SummaryWriter(log_dir=str(self.tb_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": int(step), **{k: _finite_or_none(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if value is not None:
                    self._tb.add_scalar(key, float(value), global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(step, {k: v for k, v in metrics.items() if v is not None})

    def samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """Texts the model generated after `step` steps, as (prompt, completion) pairs: one metrics.jsonl
        record `{"step": ..., "samples": [{"prompt": ..., "completion": ...}]}`, TensorBoard's text tab,
        and a W&B table."""
        rows = [{"prompt": p, "completion": c} for p, c in samples]
        self._file.write(json.dumps({"step": int(step), "samples": rows}) + "\n")
        self._file.flush()
        if self._tb is not None:
            # TensorBoard renders text as markdown: one table row per sample.
            table = "| prompt | completion |\n|---|---|\n" + "".join(
                f"| {_markdown_cell(p)} | {_markdown_cell(c)} |\n" for p, c in samples
            )
            self._tb.add_text("samples", table, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.samples(step, samples)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


class WandbRun:
    """A Weights & Biases run of the logging rank: its config is the run's, `log` mirrors the scalars of
    metrics.jsonl (at the same steps), `samples` adds the generated texts as a table."""

    def __init__(
        self, config: dict[str, Any], *, project: str, name: str | None, mode: WandbMode, out_dir: Path
    ) -> None:
        import wandb  # an optional extra: validation has checked that it is installed

        out_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        # console="off": the progress bar owns the terminal, and W&B's copy of it would only hold noise.
        self.run = wandb.init(
            project=project, name=name, mode=mode, dir=str(out_dir), config=config,
            settings=wandb.Settings(console="off", silent=True),
        )  # fmt: skip

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=int(step))

    def samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        table = self._wandb.Table(columns=["step", "prompt", "completion"])
        for prompt, completion in samples:
            table.add_data(int(step), prompt, completion)
        self.run.log({"samples": table}, step=int(step))

    def finish(self) -> None:
        self.run.finish()


def tensorboard_run_name(start_step: int, now: float | None = None) -> str:
    """The TensorBoard run of one start of a run: its start time, and the step it resumed from if any
    (`20261203-164512`, `20261203-171030-from-step-64`), so a listing sorts in the order they ran."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return stamp if start_step == 0 else f"{stamp}-from-step-{start_step}"


def _fresh_dir(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3... when a run of the same second already has it."""
    for n in range(1, 1000):
        path = parent / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise ValueError(f"{parent} already holds runs {name} to {name}-999")


def drop_records_after(jsonl_path: str | Path, step: int) -> int:
    """Remove the records of steps after `step` from a metrics.jsonl (atomically); returns how many.

    A run resumed from the checkpoint of `step` trains the later steps again; without this, each of them
    would appear twice in the file (and in every tool that reads it). A last line cut short by a crash
    is dropped too.
    """
    path = Path(jsonl_path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def _read_losses(jsonl_path: Path) -> dict[str, dict[int, float]]:
    """Per loss key, step -> value. A later line for the same step wins: after a resume from a checkpoint
    the steps since that checkpoint are logged again, and the rerun is the one that counts."""
    series: dict[str, dict[int, float]] = {"train/loss": {}, "val/loss": {}}
    lines = jsonl_path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a last line cut short by a crash mid-write
            raise ValueError(f"{jsonl_path}:{number} is not valid JSON: {line[:80]!r}") from None
        for key, points in series.items():
            value = record.get(key)
            if isinstance(value, int | float) and "step" in record and math.isfinite(value):
                points[int(record["step"])] = float(value)
    return series


def plot_loss_curve(jsonl_path: str | Path, png_path: str | Path) -> None:
    """Plot "train/loss" and, when logged, "val/loss" against step from a metrics.jsonl into a PNG.

    The figure is rendered to a temporary file beside png_path and moved into place with os.replace, so
    a reader never sees half a PNG. Raises ValueError when the file holds no finite loss.
    """
    # Figure + the Agg canvas directly, not pyplot: no global backend switch and no figure registry,
    # so this is safe to call from a training process with or without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    jsonl_path, png_path = Path(jsonl_path), Path(png_path)
    series = _read_losses(jsonl_path)
    if not any(series.values()):
        raise ValueError(f"{jsonl_path} holds no 'train/loss' or 'val/loss' values to plot")

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles: dict[str, dict[str, Any]] = {
        "train/loss": {"lw": 1.2},
        "val/loss": {"marker": "o", "ms": 3, "lw": 1.5},
    }
    for key, points in series.items():
        if points:
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], label=key, **styles[key])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.set_title(png_path.stem)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    png_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=f".{png_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, png_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _format_fields(fields: dict[str, Any]) -> str:
    """One line of training stats; a missing or None value reads "n/a"."""

    def fmt(key: str, spec: str, scale: float = 1.0) -> str:
        value = fields.get(key)
        return "n/a" if value is None else format(float(value) * scale, spec)

    tokens = fields.get("tokens_per_s")
    if tokens is None:
        tokens_text = "n/a"
    elif tokens >= 1e6:
        tokens_text = f"{tokens / 1e6:.2f}M"
    elif tokens >= 1e3:
        tokens_text = f"{tokens / 1e3:.1f}k"
    else:
        tokens_text = f"{tokens:.0f}"
    mfu = fields.get("mfu")
    parts = [
        f"loss {fmt('loss', '.4f')}",
        f"lr {fmt('lr', '.2e')}",
        f"gnorm {fmt('grad_norm', '.3f')}",
        f"tok/s/dev {tokens_text}",
        f"TFLOP/s/dev {fmt('tflops_per_device', '.3g')}",
        f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}",
    ]
    known = {"loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu"}
    for key, value in fields.items():
        if key not in known:
            parts.append(f"{key} {'n/a' if value is None else f'{value:.4g}'}")
    return " | ".join(parts)


class _TwoLineProgress(Progress):
    """The bar line (step, bar, elapsed, time left) stays whole at any width from 80 columns: the stats,
    which grow with every field, go on the line below it and wrap there instead of squeezing the bar."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            if task.fields.get("stats"):
                yield Text(task.fields["stats"], overflow="fold")


class TrainProgress:
    """Progress of a training run: step/total, loss, lr, grad norm, tokens/s, TFLOP/s and MFU per device.

    `update(step, loss=..., lr=..., grad_norm=..., tokens_per_s=..., tflops_per_device=..., mfu=...)`;
    tokens_per_s and tflops_per_device are per device, mfu is a fraction; None shows "n/a" and any other
    keyword is shown as "key value". With enabled=False every method does nothing (non-zero ranks).

    On a terminal this is a live rich bar. When the console is not a terminal (output sent to a log file
    or a pipe), a redrawn bar would be noise, so it prints one plain line per update instead, at most one
    every `print_every` steps (default: about 100 lines per run) plus the first and the last step.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        enabled: bool,
        start_step: int = 0,
        print_every: int | None = None,
        console: Console | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.print_every = print_every or max(1, total_steps // 100)
        self._last_printed: int | None = None
        self._started = time.monotonic()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if not enabled:
            self.console = None
            return
        self.console = console or Console(file=sys.stdout)
        if self.console.is_terminal:
            self._progress = _TwoLineProgress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(bar_width=None),  # takes what the other columns leave of the line
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=self.console,
                refresh_per_second=4,
            )
            # Starting the bar at start_step keeps a resumed run's speed and time-left estimates honest.
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self) -> TrainProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        stats = _format_fields(fields)
        if self._progress is not None:
            assert self._task is not None  # added with the bar
            self._progress.update(self._task, completed=step, stats=stats)
            return
        assert self.console is not None  # set whenever enabled
        due = self._last_printed is None or step - self._last_printed >= self.print_every
        if due or step >= self.total_steps:
            elapsed = int(time.monotonic() - self._started)
            clock = f"{elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
            self.console.print(
                f"step {step}/{self.total_steps} | {clock} | {stats}", highlight=False, soft_wrap=True
            )
            self._last_printed = step

    def print(self, *objects: Any) -> None:
        """Print a message (an eval result, a checkpoint path) above the bar without breaking it."""
        if self.enabled:
            assert self.console is not None  # set whenever enabled
            self.console.print(*objects, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
