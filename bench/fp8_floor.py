"""What float8 can give a model at most, from measured profiles: the bf16 step with the layers' GEMMs
swapped for the float8 ones measured, plus the operands' casts at a chosen cost per element.

Usage (dev machine, no GPU; the defaults are the recorded H200 profiles of llama-1b at micro-batch 8):
    PYTHONPATH=. python bench/fp8_floor.py [--bf16-step-ms 236.7] [--rowwise-step-ms 213.0]
        [--pair-bf16-step-ms 240.7]

Inputs: `bench/profile_step.py` outputs (their "| gemm | ms |" row and kernel table). A profile's GEMMs of
the output layer are the GEMM kernels launched at most twice a step (once per loss chunk); the rest are the
layers'. The cast elements are the planner's count (`time_model.layer_fp8_cast_elements`): every
distinct input twice, every output gradient twice, every weight twice. Prints the implied bytes per element
of today's casts (from a rowwise step and the bf16 step measured in the same call) and the step and
speed-up over today's bf16 step at that cost, at 3 bytes (an amax from the kernel that wrote the tensor)
and at none.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from threefold.config import ModelConfig
from threefold.plan.hardware import load_hardware
from threefold.plan.time_model import layer_fp8_cast_elements
from threefold.presets import MODEL_PRESETS

RESULTS = Path(__file__).parent / "results"
PROFILES = {
    "bf16": RESULTS / "issue18-2026-12-04-s9" / "call2-profile_bf16_8.txt",
    "rowwise": RESULTS / "issue18-2026-12-04-s7" / "rowwise_kernel.txt",
    "tensorwise": RESULTS / "issue18-2026-12-04" / "call1-prof_8_tensorwise.txt",
}
GEMM_KERNEL = re.compile(r"^\| (nvjet\S*|\S*gemm\S*) \| (\d+) \| ([\d.]+) \|")


def layer_gemm_ms(profile: Path) -> float:
    """ms a step of the layers' GEMMs: the profile's GEMM total less the kernels launched at most twice."""
    text = profile.read_text(encoding="utf-8")
    total = re.search(r"^\| gemm \| ([\d.]+) \|", text, re.MULTILINE)
    if total is None:
        raise SystemExit(f"{profile}: no '| gemm | ms |' row")
    head = 0.0
    for line in text.splitlines():
        m = GEMM_KERNEL.match(line)
        if m and int(m.group(2)) <= 2:
            head += float(m.group(3))
    return float(total.group(1)) - head


def cast_elements(preset: str, tokens: int) -> float:
    """Elements the float8 casts of every layer touch in one step of `tokens` tokens (one rank)."""
    m = ModelConfig(**MODEL_PRESETS[preset])
    return m.num_layers * sum(layer_fp8_cast_elements(m, tokens, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bf16-step-ms", type=float, default=236.7, help="bf16 step now (s9 call 4)")
    parser.add_argument("--rowwise-step-ms", type=float, default=213.0, help="a rowwise step (s9 call 1)")
    parser.add_argument(
        "--pair-bf16-step-ms", type=float, default=240.7, help="the bf16 step of the rowwise step's call"
    )
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--tokens", type=int, default=8 * 2048, help="tokens a step (micro-batch x seq)")
    parser.add_argument("--gpu", default="h200", help="planner preset: its HBM bandwidth prices the bytes")
    args = parser.parse_args()
    hbm = load_hardware(args.gpu).hbm_gbps * 1e9
    gemm = {name: layer_gemm_ms(path) for name, path in PROFILES.items()}
    elements = cast_elements(args.preset, args.tokens)
    rest = args.bf16_step_ms - gemm["bf16"]
    pair_rest = args.pair_bf16_step_ms - gemm["bf16"]  # the same tree as the rowwise step
    today = (args.rowwise_step_ms - pair_rest - gemm["rowwise"]) * 1e-3 * hbm / elements
    print(f"layers' GEMMs a step: bf16 {gemm['bf16']:.1f} ms, rowwise {gemm['rowwise']:.1f} "
          f"({gemm['bf16'] / gemm['rowwise']:.2f}x), tensorwise {gemm['tensorwise']:.1f} "
          f"({gemm['bf16'] / gemm['tensorwise']:.2f}x); cast elements {elements / 1e9:.1f}e9; today's casts "
          f"{today:.1f} bytes an element (from the rowwise step and its call's bf16 step)")  # fmt: skip
    print("\n| recipe | casts | cast ms | step ms | against bf16 |\n|---|---|---:|---:|---:|")
    for recipe in ("rowwise", "tensorwise"):
        for label, per_element in ((f"as measured, {today:.1f} B", today), ("3 B", 3.0), ("free", 0.0)):
            cast_ms = elements * per_element / hbm * 1e3
            step = rest + gemm[recipe] + cast_ms
            print(f"| {recipe} | {label} | {cast_ms:.1f} | {step:.1f} | {args.bf16_step_ms / step:.3f}x |")
    print(f"\n1.35x is a {args.bf16_step_ms / 1.35:.1f} ms step.")


if __name__ == "__main__":
    main()
