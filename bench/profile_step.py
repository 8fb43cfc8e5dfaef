"""Profile a few training steps of a config on one GPU: where the step time goes, by kernel.

Usage (one GPU): python bench/profile_step.py [--section.key=value ...] [--steps 3] [--warmup 5] [--top 30]
    [--torch-grad-move] (gradients into main_grad through torch's copy_/add_, as before 2026-12-04)
    [--fp8-kernel=on|off] (float8 transposed casts in compiled code through the Triton kernel, or left to
    the compiler, for every recipe; unset: threefold.parallel.fp8.KERNEL_UNDER_COMPILE's per-recipe choice)
    [--host] (also: the host's Python functions by own time, under cProfile, and the operators that
    launched the most GPU time, with their input shapes)
    [--full-names] (kernel names whole, not cut at 90 characters: to find them in the compiler's code)
    [--real-tokens] (four steps of the dataset at data.path, as training reads it, instead of uniform
    random token ids)
    [--launches] (also: which operators and source lines launched the memsets, and how much of the host's
    time a step went into CUDA calls that waited, for the launch queue or the device, under a CPU profile)
Several GPUs: torchrun --nproc-per-node N bench/profile_step.py --parallel.tp_size=N ... (rank 0 reports)
Prints the top CUDA kernels by total time and a summary by kind (GEMM, attention, communication,
optimizer, element-wise), as a share of the profiled GPU time.

It also prints the warm-up steps' losses, the peak memory allocated, torch.compile's graphs and graph
breaks, how long the host takes to queue a step, which kernels the GPU sat idle before (the gaps between
kernels, charged to the kernel that ends each), and how busy the GPU is: the union of all kernel
intervals per step (from the profile) over the step time measured without the profiler. The idle rest is
launch gaps and host work the GPU waits on; it bounds what CUDA graphs, which remove launch overhead,
could save.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from threefold.bench import real_steps, synthetic_steps
from threefold.config import build_config
from threefold.parallel import fp8
from threefold.parallel.mesh import build_mesh
from threefold.train import build, train_step

KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")),
    ("communication", ("nccl",)),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("triton (fused element-wise)", ("triton",)),
]


def kind_of(name: str) -> str:
    lower = name.lower()
    for kind, words in KINDS:
        if any(w in lower for w in words):
            return kind
    return "other element-wise / copies"


def kernel_union_us(prof: torch.profiler.profile) -> float:
    """Microseconds during which at least one kernel (or copy) ran on the GPU, over all streams."""
    intervals = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, current_start, current_end = 0.0, None, None
    for lo, hi in intervals:
        if current_end is None or lo > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = lo, hi
        else:
            current_end = max(current_end, hi)
    if current_end is not None:
        busy += current_end - current_start
    return busy


def idle_gaps(prof: torch.profiler.profile, top: int = 12) -> list[tuple[str, int, float]]:
    """Where the GPU waits: each idle gap between kernels (over all streams), charged to the kernel that
    ends it, as (kernel, gaps, microseconds) for the `top` kernels with the most idle time before them."""
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    waits: dict[str, list[float]] = {}
    busy_until = None
    for lo, hi, name in kernels:
        if busy_until is not None and lo > busy_until:
            waits.setdefault(name, []).append(lo - busy_until)
        busy_until = hi if busy_until is None else max(busy_until, hi)
    ranked = sorted(waits.items(), key=lambda kv: -sum(kv[1]))[:top]
    return [(name, len(gaps), sum(gaps)) for name, gaps in ranked]


def main(argv: list[str]) -> None:
    counts = {"--steps": 3, "--warmup": 5, "--top": 30}  # --top N: kernels listed
    overrides: list[str] = []
    torch_grad_move = "--torch-grad-move" in argv  # torch's copy_/add_ into main_grad, not the kernel
    host = "--host" in argv
    width = 1000 if "--full-names" in argv else 90
    launches = "--launches" in argv
    real = "--real-tokens" in argv  # the dataset at data.path, as training reads it, not random ids
    for arg in argv:  # --fp8-kernel[=on] / --fp8-kernel=off: every recipe's transposed casts under compile
        if arg.startswith("--fp8-kernel"):
            on = arg in ("--fp8-kernel", "--fp8-kernel=on")
            fp8.KERNEL_UNDER_COMPILE = dict.fromkeys(fp8.KERNEL_UNDER_COMPILE, on)
    flags = ("--torch-grad-move", "--host", "--full-names", "--launches", "--real-tokens")
    argv = [a for a in argv if a not in flags and not a.startswith("--fp8-kernel")]
    i = 0
    while i < len(argv):
        if argv[i] in counts:
            counts[argv[i]] = int(argv[i + 1])
            i += 2
            continue
        overrides.append(argv[i])
        i += 1
    steps, warmup, top = counts["--steps"], counts["--warmup"], counts["--top"]
    # One GPU, or under torchrun (the layout comes from the --parallel.* overrides); rank 0 reports.
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    config = build_config({}, overrides, check_paths=False)
    p = config.parallel
    mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size)
    trainer = build(config, mesh, device)
    data = (real_steps if real else synthetic_steps)(config, mesh, device, 4)
    for grad_sync in trainer.grad_syncs.values():
        grad_sync.grad_kernel = grad_sync.grad_kernel and not torch_grad_move
    warm = [train_step(trainer, data[s % 4], s) for s in range(warmup)]
    torch.cuda.synchronize()
    # the warm-up steps' losses: two runs of one config (another kernel, another setting) compare here
    print("losses of the warm-up steps: " + ", ".join(f"{stats.loss.item():.6f}" for stats in warm))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for s in range(steps):
        train_step(trainer, data[s % 4], warmup + s)
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / steps
    # How long the host takes to queue one step (no sync inside a step). Near step_ms, either the host sets
    # the pace or it waits for slots in a full launch queue: the first step, after a sync, and --launches
    # tell them apart.
    torch.cuda.synchronize()
    host_ms = []
    for s in range(steps):
        began = time.perf_counter()
        train_step(trainer, data[s % 4], warmup + steps + s)
        host_ms.append((time.perf_counter() - began) * 1e3)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for s in range(steps):
            train_step(trainer, data[s % 4], warmup + s)
        torch.cuda.synchronize()
    if rank != 0:
        dist.destroy_process_group()
        return
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    print(f"profiled GPU time: {total / 1e3 / steps:.1f} ms per step over {steps} steps")
    busy_ms = kernel_union_us(prof) / 1e3 / steps
    print(
        f"step time without the profiler: {step_ms:.1f} ms; GPU busy (union of kernel intervals): "
        f"{busy_ms:.1f} ms per step = {busy_ms / step_ms:.1%}; idle {1 - busy_ms / step_ms:.1%} "
        "(the most CUDA graphs could save)"
    )
    print("host time to queue a step (ms): " + ", ".join(f"{t:.1f}" for t in host_ms))
    print(f"peak memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    counters = torch._dynamo.utils.counters
    breaks = sum(counters["graph_break"].values())
    print(f"torch.compile: {counters['stats']['unique_graphs']} graphs, {breaks} graph breaks")
    print("\n| idle before kernel | gaps/step | idle ms/step |\n|---|---:|---:|")
    for name, count, us in idle_gaps(prof):
        print(f"| {name[:width]} | {count / steps:.0f} | {us / 1e3 / steps:.2f} |")
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.device_time_total
    print("| kind | ms/step | share |\n|---|---:|---:|")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {t / 1e3 / steps:.2f} | {t / total:.1%} |")
    print("\n| kernel | calls/step | ms/step | share |\n|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        print(f"| {e.key[:width]} | {e.count / steps:.0f} | {e.device_time_total / 1e3 / steps:.2f} | "
              f"{e.device_time_total / total:.1%} |")  # fmt: skip
    if host:
        host_report(trainer, data, warmup + 2 * steps, steps)
    if launches:
        launch_report(trainer, data, warmup + 4 * steps, steps)
    dist.destroy_process_group()


WAITED_US = 50.0
"""A CUDA runtime call that takes longer on the host than this waited (a launch normally takes 2-10 us): for
a free slot in the launch queue, which fills when the host runs ahead of the device, or for the device."""


def launch_summary(events: Any, steps: int) -> tuple[float, float, dict[tuple[str, str, str], float]]:
    """From a CPU and CUDA profile's events over `steps` steps: (ms a step the host spent in CUDA runtime
    calls that waited, such calls a step, memsets a step by (operator, its two parents, the innermost
    threefold frame of its Python stack))."""
    sources: dict[tuple[str, str, str], float] = {}
    waited_us, calls = 0.0, 0
    for e in events:
        memsets = sum(1 for k in e.kernels if k.name.startswith("Memset"))
        if memsets:
            parents: list[str] = []
            p = e.cpu_parent
            while p is not None and len(parents) < 2:
                parents.append(p.name[:40])
                p = p.cpu_parent
            frame = next((f for f in e.stack if "threefold" in f), "")[-70:]
            key = (e.name[:50], " < ".join(parents), frame)
            sources[key] = sources.get(key, 0.0) + memsets / steps
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cu"):  # cuda*, cu* (driver)
            duration = e.time_range.end - e.time_range.start
            if duration > WAITED_US:
                waited_us += duration
                calls += 1
    return waited_us / 1e3 / steps, calls / steps, sources


def launch_report(trainer: Any, data: list[Any], first: int, steps: int) -> None:
    """Under a CPU and CUDA profile with Python stacks: which operators (and the threefold source line
    above them) launched the memsets, and the host's time a step less the CUDA runtime calls that waited.
    Where that rest is well under the step time, the host is not what sets the pace."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    began = time.perf_counter()
    with torch.profiler.profile(activities=activities, with_stack=True) as prof:
        for s in range(steps):
            train_step(trainer, data[s % 4], first + s)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - began) * 1e3 / steps
    waited_ms, calls, sources = launch_summary(prof.events(), steps)
    own = wall_ms - waited_ms
    print(f"\nhost, under the CPU profile: {wall_ms:.1f} ms a step, {waited_ms:.1f} of it in {calls:.0f} "
          f"CUDA calls a step that waited over {WAITED_US:.0f} us: {own:.1f} ms of its own")  # fmt: skip
    print("\n| memsets/step | operator | its parents | innermost threefold frame |\n|---:|---|---|---|")
    for (operator, chain, frame), count in sorted(sources.items(), key=lambda kv: -kv[1])[:20]:
        print(f"| {count:.0f} | {operator} | {chain} | {frame} |")


def host_report(trainer: Any, data: list[Any], first: int, steps: int) -> None:
    """What the host spends a step on (cProfile, own time) and which operators launched the GPU time
    (torch's profiler, grouped by input shapes)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for s in range(steps):
        train_step(trainer, data[s % 4], first + s)
    torch.cuda.synchronize()
    profiler.disable()
    print(f"\nhost functions by own time over {steps} steps:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for s in range(steps):
            train_step(trainer, data[s % 4], first + steps + s)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    rows.sort(key=lambda e: -e.self_device_time_total)
    print("| operator | input shapes | calls/step | GPU ms/step |\n|---|---|---:|---:|")
    for e in rows[:40]:
        shapes = str(e.input_shapes)[:100]
        gpu_ms = e.self_device_time_total / 1e3 / steps
        print(f"| {e.key[:60]} | {shapes} | {e.count / steps:.0f} | {gpu_ms:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
