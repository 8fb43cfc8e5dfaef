"""The llama MLP (down(silu(gate x) * up x)) on one GPU, forward and backward in bf16: the way threefold's
compiled layer runs it (three cuBLAS GEMMs a pass, SwiGLU and its gradient in compile's fused kernels)
against QuACK's GEMMs with SwiGLU in their epilogues (`quack.mlp.mlp_func`; QuACK comes with
FlashAttention-4's packages): the gate/up GEMM writes both its output and silu(gate) * up, and the down
projection's input-gradient GEMM writes the gate/up gradient, so no element-wise pass reads them again.

Usage (from the repo root, on a Hopper GPU, QuACK importable):
    PYTHONPATH=. python bench/quack_mlp.py [--tokens 16384 8192] [--hidden 2048] [--ffn 8192] [--tuned]
Prints, for each variant, milliseconds for forward + backward (CUDA events: the median of 20 calls after 5
warm-up ones, taken once a round in `--rounds` rounds with the variants' order turned each round; the median
of the rounds and their range), TFLOP/s of its six GEMMs at the median, the peak memory of one call above the
inputs, and each output's and gradient's relative error (L2) against the same math in fp32. One round was
not enough on an H100 held at its 700 W limit: the stacked and interleaved QuACK layouts swapped places
between two machines (7.80 against 7.22 ms, then 7.51 against 7.74; docs/benchmarks.md, thirty-ninth
session).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from cuda_timing import median_and_range, rounds_ms


class Variant(NamedTuple):
    """How one variant lays out its weights (leaf tensors: x, then the weights as it keeps them), runs the
    MLP on them, and gives back the gradients as (dx, dgate, dup, ddown)."""

    leaves: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    run: Callable[..., torch.Tensor]
    grads: Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _torch_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def _variants(ffn: int, tuned: bool) -> dict[str, Variant]:
    from quack.mlp import mlp_func

    def separate_grads(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.grad for t in leaves]

    def quack(concat: bool, tuned: bool) -> Variant:
        def leaves(t: list[torch.Tensor]) -> list[torch.Tensor]:
            x, gate, up, down = t
            # rows [gate; up] (threefold's stacked layout), or gate_0, up_0, gate_1, up_1, ...
            w1 = torch.cat([gate, up]) if concat else torch.stack([gate, up], dim=1).reshape(2 * ffn, -1)
            return [x, w1, down]

        def run(x: torch.Tensor, w1: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
            return mlp_func(x, w1, down, activation="swiglu", tuned=tuned, concat_layout=concat)

        def grads(t: list[torch.Tensor]) -> list[torch.Tensor]:
            x, w1, down = t
            assert x.grad is not None and w1.grad is not None
            g = w1.grad.reshape(2, ffn, -1) if concat else w1.grad.reshape(ffn, 2, -1).transpose(0, 1)
            return [x.grad, g[0], g[1], down.grad]

        return Variant(leaves, run, grads)

    variants = {
        "torch, compiled": Variant(list, torch.compile(_torch_mlp), separate_grads),
        "quack, stacked": quack(True, False),
        "quack, interleaved": quack(False, False),
    }
    if tuned:  # QuACK's autotuner times its tile choices at the first call of each shape
        variants["quack, stacked, tuned"] = quack(True, True)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 8192])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--tuned", action="store_true", help="also QuACK's autotuned GEMMs")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, the order turned each round")
    args = parser.parse_args()
    dev, h, f = torch.device("cuda"), args.hidden, args.ffn
    torch.manual_seed(0)
    weights = [torch.randn(f, h, device=dev) * h**-0.5, torch.randn(f, h, device=dev) * h**-0.5,
               torch.randn(h, f, device=dev) * f**-0.5]  # fmt: skip
    variants = _variants(f, args.tuned)
    errors = " | ".join(f"{name} err" for name in ("out", "dx", "dgate", "dup", "ddown"))
    print(f"| tokens | variant | ms fwd+bwd | ms range | TFLOP/s | peak GiB | {errors} |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.tokens:
        x32 = torch.randn(n, h, device=dev)
        dy32 = torch.randn(n, h, device=dev)
        ref_in = [t.clone().requires_grad_() for t in (x32, *weights)]
        ref_out = _torch_mlp(*ref_in)
        ref_out.backward(dy32)
        refs = [ref_out.detach()] + [t.grad for t in ref_in]
        flops = 6 * n * h * 3 * f
        steps, rows = {}, {}
        for name, variant in variants.items():
            ins = [
                t.detach().requires_grad_()
                for t in variant.leaves([t.to(torch.bfloat16) for t in (x32, *weights)])
            ]
            dy = dy32.to(torch.bfloat16)

            def step(
                v: Variant = variant, ins: list[torch.Tensor] = ins, dy: torch.Tensor = dy
            ) -> torch.Tensor:
                for t in ins:
                    t.grad = None
                out = v.run(*ins)
                out.backward(dy)
                return out

            out = step().detach()
            got = [out] + variant.grads(ins)
            errs = [(a.float() - b).norm() / b.norm() for a, b in zip(got, refs, strict=True)]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            steps[name] = step
            rows[name] = f"{peak:.2f} | " + " | ".join(f"{e.item():.2e}" for e in errs)
        times = rounds_ms(steps, args.rounds)
        for name, row in rows.items():
            ms, spread = median_and_range(times[name])
            print(f"| {n} | {name} | {ms:.3f} | {spread} | {flops / ms / 1e9:.0f} | {row} |", flush=True)


if __name__ == "__main__":
    main()
