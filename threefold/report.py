"""What the logging rank shows and writes during training: progress, metrics, the loss plot."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from threefold.config import Config
from threefold.metrics import flops_per_token, mfu, peak_flops
from threefold.parallel.mesh import Mesh


@dataclass(frozen=True)
class StepStats:
    """One optimizer step's figures on the host, as the loop reads them once per log interval."""

    step: int
    """0-based."""
    loss: float
    """Mean training loss over the global batch."""
    grad_norm: float
    lr: float
    skipped: bool
    """The loss or the gradient norm was not finite, so the update was not applied (on every rank)."""


WARMUP_STEPS = 10
"""Steps left out of a run's summary speed (`Reporter.speed`): compilation, allocation, the first
optimizer steps."""


@dataclass(frozen=True)
class Speed:
    """A run's speed as `threefold train` ends it: the median over its steps after the warm-up."""

    tokens_per_s: float
    """Median tokens/s per device."""
    steps: int
    """How many steps the median is over."""
    peak_memory_gib: float | None
    """The device's peak allocated memory (CUDA), else None."""

    def describe(self) -> str:
        peak = f", peak {self.peak_memory_gib:.1f} GiB" if self.peak_memory_gib is not None else ""
        return f"median {self.tokens_per_s:,.0f} tokens/s/device over the last {self.steps} steps{peak}"


class HostClock:
    """Log windows on the host's clock: for a device whose step has run when `train_step` returns (CPU)."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        return float(end - start)


class DeviceClock:
    """Log windows on the device's own timeline: a mark is a CUDA event queued on the current stream, so
    a window's length is the same whether the host reads it before or after the next step is queued."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        end.synchronize()  # the step's last work (its optimizer update) has run, not only its loss
        return float(start.elapsed_time(end)) / 1e3


class Reporter:
    """Progress bar, metrics (JSONL + TensorBoard) and the loss plot, on the logging rank only."""

    def __init__(
        self, config: Config, mesh: Mesh, device: torch.device, *, enabled: bool, start_step: int = 0
    ) -> None:
        from threefold.monitor import (
            MetricsWriter,
            TrainProgress,
            WandbRun,
            drop_records_after,
            tensorboard_run_name,
        )

        self.enabled = enabled
        self.config = config
        self.out_dir = Path(config.logging.out_dir)
        t = config.training
        self.tokens_per_step = t.global_batch_size * config.data.seq_len
        self.flops_per_token = flops_per_token(config.model, config.data.seq_len)
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.world_size = mesh.world_size
        self.device = device
        self.clock: HostClock | DeviceClock = DeviceClock() if device.type == "cuda" else HostClock()
        self.window_start: Any = None
        """The clock's mark where the current log window (or its part after a pause) began."""
        self.counted = 0.0
        """Seconds of the current log window before its last pause (an evaluation or a save)."""
        self.writer = None
        self.speeds: list[float] = []
        """Tokens/s per device of every step logged after the first (its interval's figure)."""
        self.mix: dict[str, int] = {}
        """Tokens each source of a blend has given, as last logged (for the summary at the end)."""
        self.progress = TrainProgress(t.max_steps, enabled=enabled and config.logging.progress)
        if enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
            metrics = self.out_dir / "metrics.jsonl"
            if metrics.exists() and start_step == 0:
                metrics.unlink()  # a fresh run starts a fresh curve; a resumed one continues its own
            elif start_step > 0:
                drop_records_after(metrics, start_step)  # the steps after the checkpoint run again
            log = config.logging
            wandb = None
            if log.wandb:
                wandb = WandbRun(
                    config.to_dict(), project=log.wandb_project, name=log.wandb_run_name, mode=log.wandb_mode,
                    out_dir=Path(log.wandb_dir) if log.wandb_dir else self.out_dir,
                )  # fmt: skip
            self.writer = MetricsWriter(
                self.out_dir,
                tensorboard=log.tensorboard,
                run_name=tensorboard_run_name(start_step),
                wandb=wandb,
            )

    def __enter__(self) -> Reporter:
        self.progress.__enter__()
        self.window_start, self.counted = self.mark(), 0.0
        return self

    def mark(self) -> Any:
        """The clock's mark now (None where disabled): the loop takes one as each step is queued, so that
        a log window ends where its last step's work does, however late the host reads it."""
        return self.clock.mark() if self.enabled else None

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Time inside is neither training nor counted as such: an evaluation or a checkpoint save. The
        device finishes the steps already queued first, so their time stays in the window."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if not self.enabled:
            yield
            return
        began = self.mark()
        try:
            yield
        finally:
            self.counted += self.clock.seconds(self.window_start, began)
            self.window_start = self.mark()

    def interval(self, steps: list[StepStats], end: Any = None) -> None:
        """Log the steps completed since the last call; `end` is the clock's mark taken when the last of
        them was queued (None: now, for a host that has waited on it)."""
        if not self.enabled or not steps:
            return
        end = self.mark() if end is None else end
        # The window runs from the end of the last interval's last step to the end of this one's, less
        # the evaluations and saves inside it; every step of the window is counted.
        seconds = (self.counted + self.clock.seconds(self.window_start, end)) / len(steps)
        self.window_start, self.counted = end, 0.0
        tokens_per_s = self.tokens_per_step / seconds / self.world_size
        tflops = tokens_per_s * self.flops_per_token / 1e12
        util = mfu(tokens_per_s, self.flops_per_token, self.peak)
        for s in steps:
            metrics = {"train/loss": s.loss, "train/lr": s.lr, "train/grad_norm": s.grad_norm}
            if s.step > 0:  # step 0 pays for allocation and compilation: keep it out of the speed figures
                self.speeds.append(tokens_per_s)
                metrics |= {
                    "perf/tokens_per_s_per_device": tokens_per_s,
                    "perf/tflops_per_device": tflops,
                    "perf/step_seconds": seconds,
                }
                if util is not None:
                    metrics["perf/mfu"] = util
                if self.device.type == "cuda":
                    metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            assert self.writer is not None  # set whenever enabled
            self.writer.log(s.step + 1, metrics)
        last = steps[-1]
        self.progress.update(
            last.step + 1,
            loss=last.loss,
            lr=last.lr,
            grad_norm=last.grad_norm,
            tokens_per_s=tokens_per_s,
            tflops_per_device=tflops,
            mfu=util,
        )

    def speed(self) -> Speed | None:
        """The run's speed as peers report it: the median tokens/s per device of the logged steps after
        the first WARMUP_STEPS (of those after the first, in a run too short for that); None if none."""
        if not self.speeds:
            return None
        warm = self.speeds[WARMUP_STEPS - 1 :] if len(self.speeds) > 2 * WARMUP_STEPS else self.speeds
        steps = len(warm)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return Speed(statistics.median(warm), steps, peak)

    def validation(self, step: int, loss: float, per_source: dict[str, float] | None = None) -> None:
        """The validation loss after `step` steps; with a blend, each source's too (`val/<name>/loss`)."""
        if self.enabled:
            assert self.writer is not None  # set whenever enabled
            metrics = {"val/loss": loss} | {f"val/{n}/loss": v for n, v in (per_source or {}).items()}
            self.writer.log(step, metrics)
            each = "".join(f", {n} {v:.4f}" for n, v in (per_source or {}).items())
            self.progress.print(f"step {step}: validation loss {loss:.4f}{each}")

    def data_mix(self, step: int, samples: dict[str, int]) -> None:
        """Tokens each source of a blend has given up to `step` (cumulative: `data/<name>/tokens`)."""
        if self.enabled:
            assert self.writer is not None
            seq_len = self.config.data.seq_len
            self.mix = {n: c * seq_len for n, c in samples.items()}
            self.writer.log(step, {f"data/{n}/tokens": t for n, t in self.mix.items()})

    def checkpoint(self, step: int, path: Path, blocked_seconds: float) -> None:
        """A save started (or, synchronous, finished); the step waited `blocked_seconds` for it."""
        if self.enabled:
            assert self.writer is not None
            self.writer.log(step, {"checkpoint/blocking_seconds": blocked_seconds})
            self.progress.print(f"checkpoint {path} ({blocked_seconds:.2f} s in the step)")

    def samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """Texts the model generated after `step` steps, as (prompt, completion) pairs."""
        if self.enabled:
            assert self.writer is not None
            self.writer.samples(step, samples)
            for prompt, completion in samples:
                self.progress.print(f"step {step} sample: {_shorten(prompt + completion)!r}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.print(text)

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
        if not self.enabled:
            return
        if self.mix:
            total = sum(self.mix.values()) or 1
            each = ", ".join(f"{n} {t:,} ({100 * t / total:.1f}%)" for n, t in self.mix.items())
            self.progress.print(f"tokens per source: {each}")
        assert self.writer is not None  # set whenever enabled
        self.writer.close()
        if self.config.logging.plot:
            from threefold.monitor import plot_loss_curve

            try:
                plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
            except ValueError as e:  # nothing logged (stopped before the first step)
                self.progress.print(f"no loss plot: {e}")


SAMPLE_CHARS = 120
"""Characters of a sample the console shows (metrics.jsonl and TensorBoard keep all of it)."""


def _shorten(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 3] + "..."
