"""Decode speed on one GPU: threefold's generation next to transformers', same shapes, same run.

llama-1b shape (threefold.presets), random weights, bf16, a 128-token prompt, 256 new tokens, greedy, at
batch 1 and 64. Tokens/s = batch * new tokens / wall time of the whole call (prefill included), the
median of a few calls after a warm-up. Also prints the measured HBM copy bandwidth and the batch-1 bound
it sets (bytes of weights read once per token). The transformers side is skipped when it is missing.

    python bench/generate.py [--batches 1,64] [--new 256] [--skip-hf]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from threefold.config import ModelConfig
from threefold.infer.generate import Decoder, generate
from threefold.infer.load import build_stage
from threefold.infer.sampling import SamplingParams
from threefold.parallel.mesh import build_mesh
from threefold.presets import MODEL_PRESETS

PROMPT_LEN = 128


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    seconds = timed(lambda: b.copy_(a), 5)
    return 2 * a.numel() / seconds


def ours(
    model: torch.nn.Module, prompts: list[list[int]], new: int, *, compiled: bool, cuda_graph: bool
) -> float:
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    decoder = Decoder(cuda_graph=cuda_graph, compiled=compiled)  # keeps the cache and graph across calls
    out = generate(model, prompts, params, decoder=decoder)
    assert all(len(t) == new for t in out.tokens)
    seconds = timed(lambda: generate(model, prompts, params, decoder=decoder), 3)
    return len(prompts) * new / seconds


def theirs(cfg: ModelConfig, prompts: list[list[int]], new: int, *, static: bool) -> float:
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    ids = torch.tensor(prompts, device="cuda")
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        seconds = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs), 3)
    return len(prompts) * new / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    torch.cuda.set_device(0)
    cfg = ModelConfig(**MODEL_PRESETS["llama-1b"])
    model = build_stage(cfg, build_mesh(1, 1, 1), device="cuda", dtype=torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; weights {weight_bytes / 1e9:.2f} GB bf16"
    )
    bound = bandwidth / weight_bytes
    print(f"measured copy bandwidth {bandwidth / 1e12:.2f} TB/s -> batch-1 bound {bound:,.0f} tokens/s")
    try:
        import transformers

        have_hf = not args.skip_hf
        print(f"transformers {transformers.__version__}")
    except ImportError:
        have_hf = False
        print("transformers is not installed: its columns are skipped")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, cfg.vocab_size, (batch, PROMPT_LEN), generator=gen).tolist()
        row = {"batch": batch}
        row["threefold eager"] = ours(model, prompts, args.new, compiled=False, cuda_graph=False)
        row["threefold CUDA graph"] = ours(model, prompts, args.new, compiled=False, cuda_graph=True)
        row["threefold compile+graph"] = ours(model, prompts, args.new, compiled=True, cuda_graph=True)
        if have_hf:
            row["HF dynamic cache"] = theirs(cfg, prompts, args.new, static=False)
            try:
                row["HF static+compile"] = theirs(cfg, prompts, args.new, static=True)
            except Exception as e:  # a transformers version whose compiled path fails: say so, go on
                print(f"transformers static cache + compile failed at batch {batch}: {type(e).__name__}: {e}")
        rows.append(row)
        print(
            " | ".join(f"{k} {v:,.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
            flush=True,
        )
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(keys) + " |")
    print("|" + "---:|" * len(keys))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r[k]:,.0f}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys)
            + " |"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
