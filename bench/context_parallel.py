"""Long context on one GPU: the ring's flash blocks checked, and llama-1b tokens/s at 4k vs 32k tokens.

Usage (on the GPU machine, from the repo root; about 4 minutes on one H200):
    python3 bench/context_parallel.py [OUT_DIR] [--seqs 4096,32768,65536] [--no-blocks]

1. Flash blocks: the ring attention's per-block flash kernels (forward with the log-sum-exp, backward
   from the merged output and lse) are run for a simulated cp ring of 2 and 4 in one process, and the
   merged output and gradients are compared with whole-sequence flash attention (bf16: max abs error).
2. Throughput: `threefold bench` of llama-1b (bf16, synthetic tokens, cp 1) at seq 4096 (micro-batch 8),
   32768 and 65536 (micro-batch 1), 32k tokens per step (64k at 65536); a run that runs out of memory
   is tried again with selective, then full recomputation. Prints tokens/s/GPU, TFLOP/s (attention
   FLOPs counted: 6N + 12 l h s per token) and the 32k/4k ratio of TFLOP/s, the issue's target (>= 0.7).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from threefold.parallel.context import (
    _block_plan,
    _merge,
    block_attention,
    block_attention_backward,
    split_sequence,
)


def simulated_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, cp: int) -> tuple:
    """Ring attention's forward merge and backward for every rank of a cp ring, in one process (flash
    blocks when the tensors are bf16 on CUDA); returns the whole-sequence output and gradients."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qs, ks, vs, gs = ([split_sequence(t, r, cp, dim=2) for r in range(cp)] for t in (q, k, v, dout))
    half = qs[0].shape[2] // 2
    outs, lses = [], []
    for r in range(cp):
        out = torch.zeros(qs[r].shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qs[r].shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        for step in range(cp):
            src = (r - step) % cp
            plan = _block_plan(step, r, cp)
            if plan == "diagonal":
                _merge(out, lse, *block_attention(qs[r], ks[src], vs[src], causal=True, scale=scale))
            elif plan == "first_keys":
                o, m = block_attention(
                    qs[r], ks[src][:, :, :half], vs[src][:, :, :half], causal=False, scale=scale
                )
                _merge(out, lse, o, m)
            else:
                o, m = block_attention(qs[r][:, :, half:], ks[src], vs[src], causal=False, scale=scale)
                _merge(out[:, :, half:], lse[:, :, half:], o, m)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    dqs = [torch.zeros_like(t, dtype=torch.float32) for t in qs]
    dks = [torch.zeros_like(t, dtype=torch.float32) for t in ks]
    dvs = [torch.zeros_like(t, dtype=torch.float32) for t in vs]
    for r in range(cp):
        for step in range(cp):
            src = (r - step) % cp
            plan = _block_plan(step, r, cp)
            if plan == "diagonal":
                dq, dk, dv = block_attention_backward(
                    gs[r], qs[r], ks[src], vs[src], outs[r], lses[r], causal=True, scale=scale
                )
                dqs[r] += dq
                dks[src] += dk
                dvs[src] += dv
            elif plan == "first_keys":
                dq, dk, dv = block_attention_backward(
                    gs[r], qs[r], ks[src][:, :, :half], vs[src][:, :, :half], outs[r], lses[r],
                    causal=False, scale=scale,
                )  # fmt: skip
                dqs[r] += dq
                dks[src][:, :, :half] += dk
                dvs[src][:, :, :half] += dv
            else:
                dq, dk, dv = block_attention_backward(
                    gs[r][:, :, half:], qs[r][:, :, half:], ks[src], vs[src], outs[r][:, :, half:],
                    lses[r][:, :, half:], causal=False, scale=scale,
                )  # fmt: skip
                dqs[r][:, :, half:] += dq
                dks[src] += dk
                dvs[src] += dv

    def whole(parts: list[torch.Tensor]) -> torch.Tensor:
        # Undo the load-balanced layout: rank r's halves are chunks r and 2cp-1-r.
        chunks: list[torch.Tensor | None] = [None] * (2 * cp)
        for r, p in enumerate(parts):
            first, second = p.chunk(2, dim=2)
            chunks[r], chunks[2 * cp - 1 - r] = first, second
        return torch.cat([c for c in chunks if c is not None], dim=2)

    return whole(outs), whole(dqs), whole(dks), whole(dvs)


def check_flash_blocks() -> None:
    torch.manual_seed(0)
    b, a, kv, s, d = 1, 16, 4, 8192, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(b, a, s, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, kv, s, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, kv, s, d, device=dev, dtype=dt, requires_grad=True)
    dout = torch.randn(b, a, s, d, device=dev, dtype=dt)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(dout)
    for cp in (2, 4):
        out, dq, dk, dv = simulated_ring(q.detach(), k.detach(), v.detach(), dout, cp)
        errors = {
            "out": (out.float() - ref.float()).abs().max().item(),
            "dq": (dq - q.grad.float()).abs().max().item(),  # type: ignore[union-attr]
            "dk": (dk - k.grad.float()).abs().max().item(),  # type: ignore[union-attr]
            "dv": (dv - v.grad.float()).abs().max().item(),  # type: ignore[union-attr]
        }
        scale = {"out": ref.abs().max().item(), "dq": q.grad.abs().max().item()}  # type: ignore[union-attr]
        print(f"flash blocks, simulated ring cp={cp}: max abs error {json.dumps(errors)} "
              f"(|out| max {scale['out']:.3g}, |dq| max {scale['dq']:.3g})", flush=True)  # fmt: skip


MICRO_BATCH = {4096: 8, 32768: 1, 65536: 1}


def throughput(out_dir: Path, seqs: list[int]) -> None:
    common = [
        "--model.preset=llama-1b", f"--model.max_seq_len={max(seqs)}", "--training.dtype=bfloat16",
        "--training.device=cuda", "--training.compile=false", "--steps=4", "--warmup=2",
    ]  # fmt: skip
    records = {}
    for seq in seqs:
        mbs = MICRO_BATCH.get(seq, 1)
        json_out = out_dir / f"seq{seq}.jsonl"
        for recompute in ("none", "selective", "full"):
            json_out.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "threefold", "bench", *common, f"--data.seq_len={seq}",
                   f"--training.micro_batch_size={mbs}", f"--training.global_batch_size={mbs}",
                   f"--training.recompute={recompute}", f"--json-out={json_out}"]  # fmt: skip
            print("$", " ".join(cmd[1:]), flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                break
            print(f"seq {seq} recompute={recompute} failed:\n{done.stderr[-1500:]}", flush=True)
        else:
            continue
        records[seq] = json.loads(json_out.read_text().splitlines()[-1])
        r = records[seq]
        print(f"seq {seq} (recompute {recompute}): {r['tokens_per_s_per_gpu']:.0f} tokens/s, "
              f"{r['tflops_per_gpu']:.1f} TFLOP/s, MFU {r['mfu']}, step {r['step_time_median_s']:.3f} s, "
              f"peak {r['peak_memory_gib']:.1f} GiB", flush=True)  # fmt: skip
    if 4096 in records and 32768 in records:
        ratio = records[32768]["tflops_per_gpu"] / records[4096]["tflops_per_gpu"]
        tokens = records[32768]["tokens_per_s_per_gpu"] / records[4096]["tokens_per_s_per_gpu"]
        print(f"32k / 4k: TFLOP/s ratio {ratio:.3f} (target >= 0.7), tokens/s ratio {tokens:.3f}", flush=True)
    if 4096 in records and 65536 in records:
        ratio = records[65536]["tflops_per_gpu"] / records[4096]["tflops_per_gpu"]
        print(f"64k / 4k: TFLOP/s ratio {ratio:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("runs/context_parallel"))
    parser.add_argument("--seqs", default="4096,32768,65536", help="sequence lengths, comma-separated")
    parser.add_argument("--no-blocks", action="store_true", help="skip the flash-block check")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    if not args.no_blocks:
        check_flash_blocks()
    throughput(args.out_dir, [int(s) for s in args.seqs.split(",")])


if __name__ == "__main__":
    main()
