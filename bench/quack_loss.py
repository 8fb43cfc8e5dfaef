"""The output layer and its cross-entropy on one GPU, forward and backward in bf16: threefold's
`linear_cross_entropy` (chunks of at most 2^30 logits, the gradient computed in the forward, the element-wise
work in Triton kernels: the two that TP ranks run, or one rank's fused kernel) against QuACK's
`chunked_linear_cross_entropy` (QuACK comes with FlashAttention-4's packages), through its base pipeline and
through its scaled-exp one for Hopper, which takes the exponentials in its GEMMs' epilogues so that no
element-wise pass reads the logits again. Written without a GPU (2026-12-08) to decide whether a
`training.loss_backend` built on QuACK would pay at llama-1b's output layer (128,256 x 2048).

Usage (from the repo root, on a Hopper GPU, QuACK importable):
    PYTHONPATH=. python bench/quack_loss.py [--tokens 16384] [--vocab 128256] [--hidden 2048]
        [--chunks 4096 8192] [--rounds 5]
Prints, for each variant, milliseconds for forward + backward (CUDA events: the median of 20 calls after 5
warm-up ones, once a round in `--rounds` rounds with the order turned each round; the median of the rounds
and their range), TFLOP/s of its three GEMMs at the median, the peak memory of one call above the inputs,
and its loss and gradients against threefold's two-kernel path (the loss's relative difference, each
gradient's relative L2 error).
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
from cuda_timing import median_and_range, rounds_ms

from threefold.model import loss as loss_module

Result = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A variant's loss, input gradient and weight gradient."""


def _threefold(
    x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, one_rank: bool
) -> Callable[[], Result]:
    group = dist.group.WORLD
    assert group is not None, "a process group first"

    def call() -> Result:
        xi, wi = x.detach().requires_grad_(), w.detach().requires_grad_()
        saved, loss_module.ONE_RANK_KERNEL = loss_module.ONE_RANK_KERNEL, one_rank
        try:
            loss = loss_module.linear_cross_entropy(
                xi, wi, targets, tp_group=group, vocab_size=w.shape[0], compiled=True
            )
        finally:
            loss_module.ONE_RANK_KERNEL = saved
        loss.backward()
        assert xi.grad is not None and wi.grad is not None
        return loss.detach(), xi.grad, wi.grad

    return call


def _quack(
    x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int, scaled: bool
) -> Callable[[], Result]:
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    def call() -> Result:
        xi, wi = x.detach().requires_grad_(), w.detach().requires_grad_()
        loss = chunked_linear_cross_entropy(xi, wi, targets, chunk_size=chunk, use_scaled_exp=scaled)
        loss.backward()
        assert xi.grad is not None and wi.grad is not None
        return loss.detach(), xi.grad, wi.grad

    return call


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the micro-batch (8 x 2048)")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 8192], help="QuACK's chunk sizes")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:  # threefold's loss takes its TP group: a one-rank world here
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("nccl", rank=0, world_size=1)
    from quack.linear_cross_entropy import scaled_exp_lce_supported

    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, device=dev).to(torch.bfloat16)
    w = (torch.randn(args.vocab, args.hidden, device=dev) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=dev)
    variants = {
        "threefold, two kernels": _threefold(x, w, targets, one_rank=False),
        "threefold, one-rank kernel": _threefold(x, w, targets, one_rank=True),
    }
    for chunk in args.chunks:
        variants[f"QuACK base, chunk {chunk}"] = _quack(x, w, targets, chunk, scaled=False)
        if scaled_exp_lce_supported(x, w, chunk, "mean"):
            variants[f"QuACK scaled-exp, chunk {chunk}"] = _quack(x, w, targets, chunk, scaled=True)
        else:
            print(f"QuACK's scaled-exp pipeline does not take chunk {chunk} here")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens, vocabulary "
          f"{args.vocab}, hidden {args.hidden}\n")  # fmt: skip
    reference = variants["threefold, two kernels"]()
    checks, peaks = {}, {}
    for name, fn in variants.items():
        fn()  # compiled and tuned before its peak is taken
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss, gx, gw = fn()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        checks[name] = (abs(loss.item() / reference[0].item() - 1), _relative(gx, reference[1]),
                        _relative(gw, reference[2]))  # fmt: skip
    times = rounds_ms(variants, args.rounds)
    flops = 3 * 2 * args.tokens * args.hidden * args.vocab
    print(
        "| variant | ms (median of rounds) | range | TFLOP/s | peak GiB | loss diff | dx error | dw error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ms_list in times.items():
        ms, spread = median_and_range(ms_list)
        loss_diff, dx_err, dw_err = checks[name]
        print(f"| {name} | {ms:.3f} | {spread} | {flops / ms / 1e9:.0f} | "
              f"{peaks[name]:.2f} | {loss_diff:.1e} | {dx_err:.1e} | {dw_err:.1e} |")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
