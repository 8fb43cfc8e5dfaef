"""How far float8 moves a model's gradients, by recipe and by the format of the output gradient dy, on CPU.

One forward and backward of a small Llama (random tokens, fixed seeds) in float32 (the reference), in
bf16, and in bf16 with float8 linears for each recipe with dy in e5m2 and in e4m3 (threefold.parallel.fp8's
GRAD_DTYPE, switched here for the comparison). For the linears' weight gradients g against the float32
ones r it prints the mean relative error |g - r| / |r| and the mean of <g, r> / <r, r>: the part of r that
g keeps (1 for an unbiased gradient; below 1 where rounding shrinks it).

Usage: PYTHONPATH=. python bench/fp8_grad_error.py [--hidden 256] [--layers 2] [--tokens 512]
torch._scaled_mm runs on the CPU, so no GPU is needed (fast accumulation, a GPU matter, is not modelled).

What it cannot see: a randomly initialized model, where both recipes err alike. On one H200 tensorwise
with dy in e4m3 kept tensorwise's loss gap to bf16 over 500 trained steps (docs/benchmarks.md, "Two
tensorwise variants against the loss guard"), although here e4m3 halves dy's shrink.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from threefold.config import Fp8Recipe, ModelConfig
from threefold.model.transformer import build_model
from threefold.parallel import fp8
from threefold.parallel.layers import TPContext


def weight_grads(
    cfg: ModelConfig, tokens: torch.Tensor, recipe: Fp8Recipe | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The linears' weight gradients (float32 copies) of one forward and backward."""
    model = build_model(cfg, TPContext(dist.group.WORLD, fp8=recipe), seed=3, dtype=dtype)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if "proj" in n and p.grad is not None}


def compare(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(mean relative error, mean share of the reference kept) over the gradients."""
    errors = [float((grads[n] - r).norm() / r.norm()) for n, r in ref.items()]
    kept = [float((grads[n] * r).sum() / (r * r).sum()) for n, r in ref.items()]
    return sum(errors) / len(errors), sum(kept) / len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512, help="tokens in the batch (4 sequences)")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1)
    seq = args.tokens // 4
    cfg = ModelConfig(arch="llama", num_layers=args.layers, hidden_size=args.hidden, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=(args.hidden * 11 // 4 + 15) // 16 * 16,
                      vocab_size=2048, max_seq_len=seq)  # fmt: skip
    tokens = torch.randint(0, cfg.vocab_size, (4, seq + 1), generator=torch.Generator().manual_seed(1))
    ref = weight_grads(cfg, tokens, None, torch.float32)
    rows = [("bf16", *compare(weight_grads(cfg, tokens, None, torch.bfloat16), ref))]
    default = dict(fp8.GRAD_DTYPE)
    try:
        for recipe in ("tensorwise", "rowwise"):
            for grad_dtype in (fp8.E5M2, fp8.E4M3):
                fp8.GRAD_DTYPE[recipe] = grad_dtype
                name = f"fp8 {recipe}, dy in {str(grad_dtype).removeprefix('torch.float8_')}"
                rows.append((name, *compare(weight_grads(cfg, tokens, recipe, torch.bfloat16), ref)))
    finally:
        fp8.GRAD_DTYPE.update(default)
        dist.destroy_process_group()
    print(f"llama, {args.layers} layers, hidden {args.hidden}, {args.tokens} tokens: the linears' dW")
    print("| run | relative error to fp32 | share of fp32's gradient kept |\n|---|---:|---:|")
    for name, error, kept in rows:
        print(f"| {name} | {error:.4f} | {kept:.4f} |")


if __name__ == "__main__":
    main()
