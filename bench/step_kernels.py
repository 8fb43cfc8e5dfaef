"""Two parts of the llama-1b step on one GPU, each against an alternative, in bf16:

- projections: q, k, v (and gate, up) as separate GEMMs against one GEMM on their weights concatenated,
  forward, input gradient and weight gradient (the input gradient of separate projections is a sum of
  their GEMMs), with the concatenation's copy counted;
- the loss's element-wise work on one chunk of logits (threefold.model.loss's compiled kernels: row max,
  then target and sum of exponentials, then the logits' gradient) against a row max and sum in one pass
  (torch.compile's online softmax) and a gradient without the division.

Usage (from the repo root, on a GPU): PYTHONPATH=. python bench/step_kernels.py [--tokens 16384]
Prints milliseconds per call (CUDA events, median of 20 after 5 warm-up calls), TFLOP/s for the GEMMs
and GB/s for the element-wise kernels, and the largest difference of each alternative from the original.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

from threefold.model import loss as loss_module


def timed(fn: Callable[[], Any], iters: int = 20) -> float:
    """Median milliseconds of fn over iters calls, after 5 untimed ones."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def projections(n: int, hidden: int, outs: list[int]) -> None:
    """Separate GEMMs x @ W_i^T against one on cat(W_i): forward, dgrad, wgrad."""
    dev = torch.device("cuda")
    x = torch.randn(n, hidden, device=dev, dtype=torch.bfloat16)
    ws = [torch.randn(o, hidden, device=dev, dtype=torch.bfloat16) * 0.02 for o in outs]
    dys = [torch.randn(n, o, device=dev, dtype=torch.bfloat16) for o in outs]
    dy_cat = torch.cat(dys, dim=1)
    flops = 2 * n * hidden * sum(outs)

    def separate() -> None:
        for w in ws:
            x @ w.t()
        dx = dys[0] @ ws[0]
        for dy, w in zip(dys[1:], ws[1:], strict=True):
            dx = dx + dy @ w
        for dy in dys:
            dy.t() @ x

    def fused() -> None:
        w = torch.cat(ws)  # the weights' copy, paid every step
        x @ w.t()
        dy_cat @ w
        dy_cat.t() @ x

    parts = {"forward": (lambda: [x @ w.t() for w in ws], lambda: x @ torch.cat(ws).t())}
    name = "+".join(str(o) for o in outs)
    for label, (a, b) in parts.items():
        ta, tb = timed(a), timed(b)
        print(f"| {name} {label} | {ta:.3f} | {flops / ta / 1e9:.0f} | {tb:.3f} | {flops / tb / 1e9:.0f} |")
    ta, tb = timed(separate), timed(fused)
    print(f"| {name} fwd+dgrad+wgrad | {ta:.3f} | {3 * flops / ta / 1e9:.0f} | {tb:.3f} | "
          f"{3 * flops / tb / 1e9:.0f} |")  # fmt: skip


def loss_kernels(rows: int, vocab: int) -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device=dev) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=dev)
    owned = torch.ones(rows, dtype=torch.bool, device=dev)
    row_max_fn, target_sum_fn, grad_fn = loss_module._kernels(True)
    scale = 1.0 / rows

    def max_and_sum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        m = x.amax(dim=-1, keepdim=True)
        return m.squeeze(-1), (x - m).exp().sum(dim=-1)

    def grad_no_div(x: torch.Tensor, log_norm: torch.Tensor, t: torch.Tensor, s: float) -> torch.Tensor:
        probs = (x.float() - log_norm.unsqueeze(-1)).exp()
        col = torch.arange(x.shape[-1], device=x.device)
        return ((probs - (col == t.unsqueeze(-1)).float()) * s).to(x.dtype)

    online = torch.compile(max_and_sum, dynamic=False)
    no_div = torch.compile(grad_no_div, dynamic=False)
    m = row_max_fn(logits, vocab)
    both = target_sum_fn(logits, m, targets, owned, vocab)
    g = grad_fn(logits, m, both[1], targets, owned, vocab, scale)
    m2, s2 = online(logits)
    g2 = no_div(logits, m + both[1].log(), targets, scale)
    size = logits.numel() * logits.element_size() / 1e9
    rows_out = [
        ("row max (now)", timed(lambda: row_max_fn(logits, vocab)), size, "0"),
        ("target, sum exp (now)", timed(lambda: target_sum_fn(logits, m, targets, owned, vocab)), size, "0"),
        ("max and sum in one (online)", timed(lambda: online(logits)), size,
         f"{(m2 - m).abs().max().item():.3g}, {((s2 / both[1]) - 1).abs().max().item():.3g} rel"),
        ("gradient (now)", timed(lambda: grad_fn(logits, m, both[1], targets, owned, vocab, scale)),
         2 * size, "0"),
        ("gradient, no division", timed(lambda: no_div(logits, m + both[1].log(), targets, scale)), 2 * size,
         f"{(g2.float() - g.float()).abs().max().item():.3g}"),
    ]  # fmt: skip
    print(f"\nloss chunk ({rows}, {vocab}) bf16:\n")
    print("| kernel | ms | GB/s | max diff from now |\n|---|---:|---:|---|")
    for name, ms, gb, diff in rows_out:
        print(f"| {name} | {ms:.3f} | {gb / ms * 1e3:.0f} | {diff} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the micro-batch (8 x 2048)")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens\n")
    print("| GEMMs | separate ms | TFLOP/s | one GEMM ms (with the cat) | TFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    projections(args.tokens, 2048, [2048, 512, 512])
    projections(args.tokens, 2048, [8192, 8192])
    loss_kernels(min(args.tokens, 2**30 // 128256), 128256)


if __name__ == "__main__":
    main()
