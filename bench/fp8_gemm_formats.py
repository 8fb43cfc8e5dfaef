"""How fast torch._scaled_mm runs the output layer's three GEMMs at llama-1b's shape (a chunk of 8368 tokens,
hidden 2048, vocabulary 128256) in each pairing of float8 formats and scalings, against bf16's torch.mm.

The float8 output layer (training.fp8_output_layer) writes the logits' gradient in e5m2 and the weight and
input in e4m3; a profile (bench/results/issue18-2026-12-06-s23) showed its two backward GEMMs, the mixed
e5m2 x e4m3 pairing, near bf16's time while the e4m3 x e4m3 forward ran at twice bf16's rate. This times
each pairing alone, so the choice of formats can follow the measured rates.

Usage (one Hopper GPU): PYTHONPATH=. python bench/fp8_gemm_formats.py [--reps 20]
Prints one line per (GEMM, pairing, scaling): the median milliseconds of a call (CUDA events,
bench/cuda_timing.py) and TFLOP/s, or why _scaled_mm refused it. (The twenty-third session's figures came
from commit 1fe4ec8's version, which took the mean of back-to-back calls instead.)
"""

from __future__ import annotations

import argparse

import torch
from cuda_timing import median_ms

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
TOKENS, HIDDEN, VOCAB = 8368, 2048, 128256
GEMMS = {  # name: (M, K, N) of a (M, K) @ b (K, N)
    "logits x W^T": (TOKENS, HIDDEN, VOCAB),
    "grad_x g W": (TOKENS, VOCAB, HIDDEN),
    "grad_w g^T x": (VOCAB, TOKENS, HIDDEN),
}
PAIRS = [(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2), (E5M2, E5M2)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(0))
    for name, (m, k, n) in GEMMS.items():
        flops = 2 * m * k * n
        a16 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t()  # column-major, as _scaled_mm wants
        ms = median_ms(lambda a16=a16, b16=b16: torch.mm(a16, b16), args.reps, warmup=2)
        print(f"{name:<14} bf16            {ms:7.3f} ms  {flops / ms / 1e9:7.0f} TFLOP/s")
        for fa, fb in PAIRS:
            a, b = a16.to(fa), b16.to(fb)
            for scaling in ("tensorwise", "rowwise"):
                if scaling == "tensorwise":
                    sa = torch.ones((), device="cuda")
                    sb = torch.ones((), device="cuda")
                else:
                    sa = torch.ones((m, 1), device="cuda")
                    sb = torch.ones((1, n), device="cuda")
                label = f"{str(fa)[-6:]} x {str(fb)[-6:]} {scaling}"

                def gemm(a=a, b=b, sa=sa, sb=sb) -> torch.Tensor:
                    return torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16)

                try:
                    ms = median_ms(gemm, args.reps, warmup=2)
                except (RuntimeError, ValueError) as e:
                    print(f"{name:<14} {label:<28} refused: {str(e).splitlines()[0][:100]}")
                    continue
                print(f"{name:<14} {label:<28} {ms:7.3f} ms  {flops / ms / 1e9:7.0f} TFLOP/s")
            del a, b
        del a16, b16
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
