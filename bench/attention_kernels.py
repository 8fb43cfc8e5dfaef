"""Causal attention kernels side by side on one GPU, at llama-1b's attention shape by default
(32 query heads, 8 key/value heads, head size 64, seq 2048): each SDPA back end torch offers, and
FlexAttention compiled, and FlashAttention-4 through threefold's operators where the flash-attn-4
package is installed, forward alone and forward plus backward, in bf16.

Usage (from the repo root, on a GPU):
    PYTHONPATH=. python bench/attention_kernels.py [--batch 8] [--seq 2048] [--heads 32] [--kv-heads 8]

Prints one line per kernel: milliseconds per call (CUDA events, median of --iters after 5 warm-up calls)
and TFLOP/s by the causal count (half of 4*b*s*s*h*d forward, 2.5 times that backward), and the largest
difference of its output and gradients from cuDNN's, so that a fast kernel that is wrong shows.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from cuda_timing import median_ms
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    b, s, h, hk, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(0)
    dev = torch.device("cuda")
    q = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hk, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hk, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16)
    group = h // hk
    forward_flops = 4 * b * s * s * h * d / 2

    def sdpa(backend: SDPBackend, gqa: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with sdpa_kernel(backend):
                if gqa:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                kk = k.repeat_interleave(group, dim=1)
                vv = v.repeat_interleave(group, dim=1)
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

        return run

    kernels_of: dict[str, Callable[[], torch.Tensor]] = {
        "cudnn (k, v repeated)": sdpa(SDPBackend.CUDNN_ATTENTION, False),
        "cudnn (enable_gqa)": sdpa(SDPBackend.CUDNN_ATTENTION, True),
        "flash (enable_gqa)": sdpa(SDPBackend.FLASH_ATTENTION, True),
        "efficient (k, v repeated)": sdpa(SDPBackend.EFFICIENT_ATTENTION, False),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda _b, _h, qi, ki: qi >= ki, None, None, s, s, device=dev)
        flex = torch.compile(flex_attention)
        kernels_of["flex (compiled, enable_gqa)"] = lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)
    except Exception as e:  # report and go on: the SDPA rows stand alone
        print(f"flex attention unavailable: {type(e).__name__}: {e}")

    try:  # FlashAttention-4 through threefold's operators (training.attention_backend = "fa4")
        from threefold.model.fa4 import fa4_attention, kernels

        kernels()
        kernels_of["fa4 (threefold ops)"] = lambda: fa4_attention(q, k, v)
        compiled_fa4 = torch.compile(fa4_attention)
        kernels_of["fa4 (threefold ops, compiled)"] = lambda: compiled_fa4(q, k, v)
    except Exception as e:
        print(f"FlashAttention-4 unavailable: {type(e).__name__}: {e}")

    cudnn = torch.backends.cudnn.version()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {cudnn}")
    print(f"q ({b}, {h}, {s}, {d}), k/v {hk} heads, causal, bf16\n")
    print("| kernel | forward ms | TFLOP/s | fwd+bwd ms | TFLOP/s | max |diff| from cuDNN (out, dq) |")
    print("|---|---:|---:|---:|---:|---|")
    reference: tuple[torch.Tensor, torch.Tensor] | None = None
    for name, fn in kernels_of.items():
        try:
            with torch.no_grad():
                fwd = median_ms(fn, args.iters)

            def both(fn: Callable[[], torch.Tensor] = fn) -> None:
                q.grad = k.grad = v.grad = None
                fn().backward(dy)

            total = median_ms(both, args.iters)
            q.grad = None
            out = fn()
            out.backward(dy)
            assert q.grad is not None
            result = (out.detach().float(), q.grad.float())
        except Exception as e:  # a back end torch cannot run at this shape: say so, go on
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | | | | |")
            continue
        if reference is None:
            reference = result
        diff = ", ".join(f"{(a - r).abs().max().item():.3g}" for a, r in zip(result, reference, strict=True))
        print(f"| {name} | {fwd:.3f} | {forward_flops / fwd / 1e9:.0f} | {total:.3f} | "
              f"{3.5 * forward_flops / total / 1e9:.0f} | {diff} |")  # fmt: skip


if __name__ == "__main__":
    main()
