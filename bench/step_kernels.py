"""Two parts of the llama-1b step on one GPU, each against an alternative, in bf16:

- projections: q, k, v (and gate, up) as separate GEMMs against one GEMM on their weights concatenated,
  forward, input gradient and weight gradient (the input gradient of separate projections is a sum of
  their GEMMs), with the concatenation's copy counted;
- the loss's element-wise work on one chunk of logits: threefold.model.loss's two Triton kernels (the
  row max and sum of exponentials in one read, then the logits' gradient over the logits) against the
  three kernels torch.compile made of the same math (row max; target and sum; gradient), used until
  2026-12-04, and against one rank's fused kernel (`one_rank_kernel`: both passes over a row in one
  program, few programs in flight so that the second read finds the row in L2) at several numbers of
  programs per SM, warps and block sizes.

Usage (from the repo root, on a GPU): PYTHONPATH=. python bench/step_kernels.py [--tokens 16384]
[--parts projections,loss] [--rounds 3]
Prints milliseconds per call (CUDA events, median of 20 after 5 warm-up calls), TFLOP/s for the GEMMs
and GB/s for the element-wise kernels, and the largest difference of each alternative from the original.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from cuda_timing import median_and_range, median_ms, rounds_ms

from threefold.model import loss as loss_module


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
        ta, tb = median_ms(a), median_ms(b)
        print(f"| {name} {label} | {ta:.3f} | {flops / ta / 1e9:.0f} | {tb:.3f} | {flops / tb / 1e9:.0f} |")
    ta, tb = median_ms(separate), median_ms(fused)
    print(f"| {name} fwd+dgrad+wgrad | {ta:.3f} | {3 * flops / ta / 1e9:.0f} | {tb:.3f} | "
          f"{3 * flops / tb / 1e9:.0f} |")  # fmt: skip


def _row_max(x: torch.Tensor) -> torch.Tensor:
    return x.float().amax(dim=-1)


def _target_and_sum_exp(x: torch.Tensor, row_max: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    shifted = x.float() - row_max.unsqueeze(-1)
    return torch.stack([shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1), shifted.exp().sum(dim=-1)])


def _grad_logits(
    x: torch.Tensor, row_max: torch.Tensor, sum_exp: torch.Tensor, targets: torch.Tensor, scale: float
) -> torch.Tensor:
    probs = (x.float() - row_max.unsqueeze(-1)).exp() / sum_exp.unsqueeze(-1)
    one_hot = torch.arange(x.shape[-1], device=x.device) == targets.unsqueeze(-1)
    return ((probs - one_hot.float()) * scale).to(x.dtype)


def loss_kernels(rows: int, vocab: int) -> None:
    """threefold's loss chunk (`loss._kernel_chunk`, two Triton kernels) against the three kernels
    torch.compile made of the same math before 2026-12-04 (the functions above, as they were)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device=dev) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=dev)
    owned = torch.ones(rows, dtype=torch.bool, device=dev)
    scale = 1.0 / rows
    row_max_fn, target_sum_fn, grad_fn = (
        torch.compile(f, dynamic=False) for f in (_row_max, _target_and_sum_exp, _grad_logits)
    )

    def compiled() -> tuple[torch.Tensor, torch.Tensor]:
        m = row_max_fn(logits)
        both = target_sum_fn(logits, m, targets)
        return (both[1].log() - both[0]).sum(), grad_fn(logits, m, both[1], targets, scale)

    def kernels() -> tuple[torch.Tensor, torch.Tensor | None]:
        work = logits.clone()  # the kernel writes the gradient over its logits
        return loss_module._kernel_chunk(work, targets, owned, vocab, scale, work.dtype, _none, _none)

    def clone() -> torch.Tensor:
        return logits.clone()

    ref_loss, ref_grad = compiled()
    loss, grad = kernels()
    assert grad is not None
    copy_ms = median_ms(clone)
    size = logits.numel() * logits.element_size() / 1e9
    print(
        f"\nloss chunk ({rows}, {vocab}) bf16, max and sum, then the gradient (3 reads, 1 write of the logits"
    )
    print("before, 2 reads and 1 write now; the Triton rows exclude the clone each call needs):\n")
    print("| path | ms | loss relative diff | gradient max diff |\n|---|---:|---:|---:|")
    print(f"| torch.compile's three kernels | {median_ms(compiled):.3f} | 0 | 0 |")
    ms = median_ms(kernels) - copy_ms
    loss_diff = (loss / ref_loss - 1).abs().item()
    grad_diff = (grad.float() - ref_grad.float()).abs().max().item()
    rate = f"{3 * size / ms * 1e3:.0f} GB/s"
    print(f"| Triton, two kernels | {ms:.3f} ({rate}) | {loss_diff:.2e} | {grad_diff:.3g} |")


def one_rank_kernel(rows: int, vocab: int, rounds: int) -> None:
    """One rank's fused loss kernel against the two kernels, each setting of it timed `rounds` times with
    the order turned each round (`rounds_ms`); GB/s counts one read and one write of the logits, what the
    fused kernel moves when its second read hits L2."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device=dev) * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device=dev)
    owned = torch.ones(rows, dtype=torch.bool, device=dev)
    scale, work = 1.0 / rows, logits.clone()
    settings = {"two kernels": None} | {
        f"fused, {p}/SM, {w} warps, block {b}": (p, w, b)
        for p in (1, 2, 64)  # 64 per SM: one program a row at llama-1b (no L2 reuse to speak of)
        for w in (16, 32)
        for b in (8192, 16384)
    }
    _, two_grad = loss_module._kernel_chunk(work, targets, owned, vocab, scale, work.dtype, _none, _none)
    assert two_grad is not None
    expected = two_grad.clone()

    def run(setting: tuple[int, int, int] | None) -> Callable[[], object]:
        def call() -> object:
            work.copy_(logits)  # timed too, the same for every setting: subtracted below
            if setting is None:
                return loss_module._kernel_chunk(work, targets, owned, vocab, scale, work.dtype, _none, _none)
            names = ("ONE_RANK_KERNEL", "ONE_RANK_PROGRAMS_PER_SM", "ONE_RANK_WARPS", "ONE_RANK_BLOCK")
            saved = [getattr(loss_module, name) for name in names]
            for name, value in zip(names, (True, *setting), strict=True):
                setattr(loss_module, name, value)
            try:
                return loss_module._kernel_chunk(work, targets, owned, vocab, scale, work.dtype, None, None)
            finally:
                for name, value in zip(names, saved, strict=True):
                    setattr(loss_module, name, value)

        return call

    for name, setting in settings.items():  # each setting's gradient against the two kernels'
        run(setting)()
        diff = (work.float() - expected.float()).abs().max().item()
        assert diff <= 2e-3 * scale, (name, diff)
    copy_ms = median_ms(lambda: work.copy_(logits))
    times = rounds_ms({name: run(s) for name, s in settings.items()}, rounds)
    size = logits.numel() * logits.element_size() / 1e9
    print(f"\none rank's loss chunk ({rows}, {vocab}) bf16, {rounds} rounds (the copy of the logits each")
    print(f"call needs, {copy_ms:.3f} ms, subtracted):\n")
    print("| kernel | ms (median of rounds) | range | GB/s (1 read + 1 write) |\n|---|---:|---:|---:|")
    for name, ms_list in times.items():
        ms, spread = median_and_range(ms_list, minus=copy_ms)
        print(f"| {name} | {ms:.3f} | {spread} | {2 * size / ms * 1e3:.0f} |")
    best = min((n for n in times if settings[n] is not None), key=lambda n: statistics.median(times[n]))
    print("\nfastest fused setting (programs per SM, warps, block):", *settings[best])  # type: ignore[misc]


def _none(t: torch.Tensor) -> None:
    """No reduction: one rank holds the whole vocabulary."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens in the micro-batch (8 x 2048)")
    parser.add_argument("--parts", default="projections,loss", help="which parts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the one-rank kernel's settings")
    args = parser.parse_args()
    parts = args.parts.split(",")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens\n")
    if "projections" in parts:
        print("| GEMMs | separate ms | TFLOP/s | one GEMM ms (with the cat) | TFLOP/s |")
        print("|---|---:|---:|---:|---:|")
        projections(args.tokens, 2048, [2048, 512, 512])
        projections(args.tokens, 2048, [8192, 8192])
    if "loss" in parts:
        rows = min(args.tokens, 2**30 // 128256)
        loss_kernels(rows, 128256)
        one_rank_kernel(rows, 128256, args.rounds)


if __name__ == "__main__":
    main()
