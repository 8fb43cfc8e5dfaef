"""Matrix-vector products of one decode token, per weight shape: cuBLAS, the compiler's product-and-sum, and
threefold.infer.gemv's Triton kernel, in one run on one GPU.

    python bench/gemv.py [--shapes llama-1b]

For each projection shape of the model (q/o, k/v, gate/up, down, output layer) it keeps enough copies of
the bf16 weight that they overflow the GPU's L2 cache, captures one pass over all copies in a CUDA graph
(as a decode step runs), and prints microseconds per product and the weight bytes read per second. It
also checks each result against a float64 product.
"""

from __future__ import annotations

import argparse
import math

import torch

from threefold.infer.gemv import gemv
from threefold.infer.step import _sum_product
from threefold.presets import MODEL_PRESETS

SPAN_BYTES = 512 * 2**20  # weights read per pass: ten times an H200's 50 MB L2


def shapes(preset: str) -> dict[str, tuple[int, int]]:
    m = MODEL_PRESETS[preset]
    h, f, v = m["hidden_size"], m["ffn_hidden_size"], m["vocab_size"]
    kv = m["num_kv_heads"] * h // m["num_heads"]
    return {"q, o": (h, h), "k, v": (kv, h), "gate, up": (f, h), "down": (h, f), "output": (v, h)}


def per_call_us(fn, x: torch.Tensor, weights: list[torch.Tensor], passes: int = 20) -> float:  # type: ignore[no-untyped-def]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights[:2]:  # warm-up: tuning and compilation outside the capture
            fn(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(passes):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (passes * len(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="llama-1b", help="a model preset")
    args = parser.parse_args()
    torch.manual_seed(0)
    summed = torch.compile(_sum_product, dynamic=False, options={"coordinate_descent_tuning": True})
    forms = {
        "cuBLAS (F.linear)": lambda x, w: torch.nn.functional.linear(x, w),
        "compiled sum": lambda x, w: summed(x, w, None),
        "Triton gemv": lambda x, w: gemv(x, w),
    }
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; us per product (weight TB/s)")
    print(f"| weight (out x in) | MB | {' | '.join(forms)} |")
    print(f"|---|---:|{'---:|' * len(forms)}")
    for name, (n, k) in shapes(args.shapes).items():
        nbytes = n * k * 2
        copies = max(2, math.ceil(SPAN_BYTES / nbytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        reference = x.double().reshape(-1) @ weights[0].double().T
        cells = []
        for form, fn in forms.items():
            error = (fn(x, weights[0]).double().reshape(-1) - reference).abs().max().item()
            assert error < 0.02 * reference.abs().max().item() + 1e-3, f"{form} {name}: error {error}"
            us = per_call_us(fn, x, weights)
            cells.append(f"{us:.1f} ({nbytes / us / 1e6:.2f})")
        print(f"| {name} ({n} x {k}) | {nbytes / 1e6:.1f} | {' | '.join(cells)} |", flush=True)
        del weights


if __name__ == "__main__":
    main()
