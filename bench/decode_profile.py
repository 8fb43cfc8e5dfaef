"""Where a batch-1 decode step's time goes: the GPU kernels of one step, grouped, and the host's share.

    python bench/decode_profile.py [--batch 1] [--new 256]

llama-1b shape, random weights (normal, std 0.02), bf16, a 128-token prompt, greedy. For each way of
running the decode step (CUDA graph; compiled; compiled with the projections as product-and-sum
reductions; the same with inductor's coordinate-descent tuning) prints the generate loop's tokens/s,
the captured graph's replay time alone (the GPU floor of a token), and whether its tokens equal the first
variant's. The last variant is what `generate` runs: its graph holds the whole greedy step, token choice
included; the others hold the forward alone and choose the token outside (the one before the last is
the same step that way). Then the kernels of one step of the last variant (torch.profiler), by kind.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from threefold.config import ModelConfig
from threefold.infer import step
from threefold.infer.generate import Decoder, _GraphedStep, generate
from threefold.infer.load import build_stage
from threefold.infer.sampling import SamplingParams
from threefold.infer.step import forward_step
from threefold.model.transformer import Attention
from threefold.parallel.mesh import build_mesh
from threefold.presets import MODEL_PRESETS


def kind(name: str) -> str:
    lowered = name.lower()
    if any(s in lowered for s in ("gemv", "gemm", "sm90", "cutlass", "matmul", "splitk", "nvjet")):
        return "matrix products"
    if any(s in lowered for s in ("flash", "attention", "fmha", "softmax")):
        return "attention"
    return "other"


WHOLE = "compile+graph, matvec, coordinate descent, whole step"
"""The variant `generate` runs; its graph captures the whole greedy step, token choice included. The
others capture the forward alone (Decoder(whole_step=False)) and choose each token outside the graph."""
APART = "whole step, q/k/v apart"
"""The whole step with the query, key and value projections as three reductions (before 2026-12-04)."""
TUNED = {"coordinate_descent_tuning": True, "force_pointwise_cat": True}  # as generate._compile
VARIANTS = {
    # name: (torch.compile it, matvec projections, inductor options)
    "CUDA graph": (False, False, {}),
    "compile+graph": (True, False, {}),
    "compile+graph, matvec": (True, True, {}),
    "compile+graph, matvec, coordinate descent": (True, True, TUNED),
    "compile+graph, matvec, coordinate descent, whole step": (True, True, TUNED),
    APART: (True, True, TUNED),
}


def qkv_apart(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(step._project(p, x, True) for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # type: ignore[return-value]


def variant_step(name: str) -> _GraphedStep:
    compiled, matvec, options = VARIANTS[name]
    step = _GraphedStep(compiled=False)
    fn = functools.partial(forward_step, matvec=matvec)
    step.step = torch.compile(fn, dynamic=False, options=options) if compiled else fn
    return step


def replay_seconds(decoder: Decoder, whole: bool, replays: int = 100) -> float:
    """Seconds per replay of the decoder's captured graph, back to back."""
    if whole:
        assert decoder._decode is not None
        graph = decoder._decode[1].graph
        state = decoder.state()
        # Each replay advances the slot, positions and count: start them low enough to stay in the cache.
        for t in (state.slot, state.positions, state.count):
            t.fill_(0)
    else:
        step = decoder.step()
        assert isinstance(step, _GraphedStep)
        graph = step.graph
    assert graph is not None
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--variants", default=";".join(VARIANTS), help="names to run, separated by ';'")
    args = parser.parse_args()
    names = args.variants.split(";")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    torch.cuda.set_device(0)
    cfg = ModelConfig(**MODEL_PRESETS["llama-1b"])
    torch.manual_seed(0)
    model = build_stage(cfg, build_mesh(1, 1, 1), device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for param in model.parameters():  # a scale where logits are not all ties
            param.normal_(0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, 128)).tolist()
    params = SamplingParams(max_new_tokens=args.new, temperature=0.0)
    reference = None
    stacked = step._qkv_matvec
    for name in names:
        whole = name in (WHOLE, APART)
        step._qkv_matvec = qkv_apart if name == APART else stacked  # read when the step is traced
        decoder = Decoder(cuda_graph=True, compiled=True, whole_step=whole)
        decoder.prepare(model, args.batch, 128 + args.new, None)
        if not whole:  # the whole step is the Decoder's own (compiled with its options)
            decoder._step = variant_step(name)
        out = generate(model, prompts, params, decoder=decoder)
        reference = reference or out
        pairs = zip(out.tokens, reference.tokens, strict=True)
        same = sum(a == b for ra, rb in pairs for a, b in zip(ra, rb, strict=False))
        first = [row[:8] for row in out.logprobs][0]
        ref_first = [row[:8] for row in reference.logprobs][0]
        drift = max(abs(a - b) for a, b in zip(first, ref_first, strict=False))
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            generate(model, prompts, params, decoder=decoder)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        loop = sorted(times)[1] / args.new
        replay = replay_seconds(decoder, whole)
        print(f"batch {args.batch} {name:55s}: generate {args.batch / loop:8,.0f} tokens/s; replay alone "
              f"{replay * 1e3:.3f} ms ({args.batch / replay:,.0f} tokens/s); tokens equal to the first "
              f"variant's: {same}/{args.batch * args.new}; first-8 logprob drift {drift:.4f}",
              flush=True)  # fmt: skip

    # Kernels of one (uncaptured) step of the last variant.
    cache = decoder._cache
    assert cache is not None
    fn = variant_step(name).step
    x = torch.zeros(args.batch, 1, dtype=torch.long, device="cuda")
    slots = torch.tensor([200], device="cuda")
    positions = torch.full((args.batch, 1), 200, device="cuda")
    for _ in range(3):
        fn(model, x, cache, slots, positions)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(model, x, cache, slots, positions)
        torch.cuda.synchronize()
    groups: dict[str, list[float]] = defaultdict(list)
    names: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            groups[kind(event.name)].append(event.device_time)
            names[event.name[:90]] += event.device_time
    total = sum(sum(v) for v in groups.values())
    print(f"{name}, one step: {sum(len(v) for v in groups.values())} kernels, {total / 1e3:.3f} ms")
    for group, times in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {group:16s} {len(times):4d} kernels {sum(times) / 1e3:7.3f} ms")
    for kernel, us in sorted(names.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {us:8.1f} us  {kernel}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
