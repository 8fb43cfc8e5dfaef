"""The progress display: the bar line stays whole at 80 columns; log files get one plain line per update."""

import io
import re

from rich.console import Console

from threefold.monitor import TrainProgress

STATS = dict(loss=4.12345, lr=3e-4, grad_norm=0.5, tokens_per_s=123456.0, tflops_per_device=123.4, mfu=0.5)


def _screen(width: int) -> list[str]:
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    progress = TrainProgress(100_000, enabled=True, console=console)
    progress.update(12_345, **STATS)
    assert progress._progress is not None  # a terminal gets the live bar
    lines = console.render_lines(progress._progress.get_renderable(), console.options)
    return ["".join(segment.text for segment in line).rstrip() for line in lines]


def test_bar_line_keeps_step_bar_and_times_at_80_columns():
    lines = _screen(80)
    assert all(len(line) <= 80 for line in lines)
    bar = lines[0]
    assert re.match(r"step\s+12345/100000 \S*━", bar), bar  # the step and a bar drawn on the same line
    assert re.search(r"\d+:\d\d:\d\d left", bar), bar  # elapsed, then the time left
    stats = " ".join(lines[1:])
    for text in ("loss 4.1235", "lr 3.00e-04", "tok/s/dev 123.5k", "TFLOP/s/dev 123", "MFU 50.0%"):
        assert text in stats, stats


def test_wider_terminals_keep_the_stats_on_one_line():
    lines = _screen(160)
    assert len(lines) == 2 and lines[1].startswith("loss 4.1235") and lines[1].endswith("MFU 50.0%")


def test_plain_lines_for_logs_carry_step_and_elapsed_time():
    out = io.StringIO()
    progress = TrainProgress(10, enabled=True, console=Console(file=out, width=80, force_terminal=False))
    progress.update(1, **STATS)
    progress.update(2, **STATS)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.match(r"step 1/10 \| 0:00:0\d \| loss 4\.1235 \| lr 3\.00e-04", lines[0]), lines[0]
