"""Weight gradients straight into fp32 `main_grad`: is the bf16 GEMM with an fp32 output worth it?

For llama-1b's linear layers (seq 2048 x micro-batch tokens), times per step, over the 16 layers:
  copy:  dW = dY^T X in bf16, then main_grad.copy_(dW)  (threefold's first-micro-batch path today)
  add:   dW in bf16, then main_grad.add_(dW)            (later micro-batches today)
  fused: torch.mm(dY^T, X, out_dtype=float32, out=main_grad), and addmm into main_grad to accumulate
and checks the fused results against the fp32 product of the same bf16 inputs.
Usage (one GPU): PYTHONPATH=. python bench/wgrad_fusion.py [--tokens 8192]
"""

from __future__ import annotations

import argparse

import torch

SHAPES = [("q", 2048, 2048), ("k", 512, 2048), ("v", 512, 2048), ("o", 2048, 2048),
          ("gate", 8192, 2048), ("up", 8192, 2048), ("down", 2048, 8192)]  # fmt: skip
LAYERS = 16


def timed(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def variants(dy: torch.Tensor, x: torch.Tensor, main_grad: torch.Tensor) -> dict[str, float]:
    f32 = torch.float32
    return {
        "bf16 mm": timed(lambda: dy.t().mm(x)),
        "copy": timed(lambda: main_grad.copy_(dy.t().mm(x))),
        "add": timed(lambda: main_grad.add_(dy.t().mm(x))),
        "mm fp32 out": timed(lambda: torch.mm(dy.t(), x, out_dtype=f32, out=main_grad)),
        "addmm fp32": timed(lambda: torch.addmm(main_grad, dy.t(), x, out_dtype=f32, out=main_grad)),
        "zero": timed(lambda: main_grad.zero_()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)
    totals = {"copy": 0.0, "add": 0.0, "mm fp32 out": 0.0, "addmm fp32": 0.0, "zero": 0.0, "bf16 mm": 0.0}
    for name, out_f, in_f in SHAPES:
        dy = torch.randn(args.tokens, out_f, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16)
        main_grad = torch.zeros(out_f, in_f, device="cuda")
        ref = dy.float().t().mm(x.float())
        torch.mm(dy.t(), x, out_dtype=torch.float32, out=main_grad)
        err_mm = ((main_grad - ref).abs().max() / ref.abs().max()).item()
        torch.addmm(main_grad, dy.t(), x, out_dtype=torch.float32, out=main_grad)
        err_add = ((main_grad - 2 * ref).abs().max() / ref.abs().max()).item()
        rows = variants(dy, x, main_grad)
        for k, v in rows.items():
            totals[k] += v * LAYERS
        print(f"{name:5s} {out_f}x{in_f}: " + " ".join(f"{k} {v:.3f}" for k, v in rows.items())
              + f" ms; rel err mm {err_mm:.1e} addmm {err_add:.1e}")  # fmt: skip
    print(f"per step over {LAYERS} layers (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
