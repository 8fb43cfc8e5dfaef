"""Document masking on one GPU: the attention kernels side by side, then llama-1b training with and without.

Usage (on the GPU machine, from the repo root; about 5 minutes on one H200):
    python3 bench/document_masking.py [OUT_DIR]

Documents have mixed lengths: drawn from a log-normal with median 1,024 tokens, clipped to [32, 16384],
so one 8,192-token sample holds anywhere from one document to a few dozen.

1. Kernels (forward + backward, bf16, llama-1b's attention: 32 query heads, 8 key/value heads, head dim
   64, micro-batch 2, seq 8192): unmasked causal flash attention (scaled_dot_product_attention), the
   document mask through compiled FlexAttention (what threefold runs), and torch's variable-length
   flash attention (`torch.nn.attention.varlen.varlen_attn`, where this torch has it). Outputs are
   compared with attention run one document at a time.
2. Training: `threefold bench --tokens=real` of llama-1b, seq 8192, micro-batch 4 (32k tokens per step),
   bf16, on a dataset of random token ids with an EOS at each document's end, document_masking off and
   on, with and without torch.compile. Prints tokens/s and the masked/unmasked ratio (target >= 0.9).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from threefold.model.attention import attend, document_ids, document_mask
from threefold.presets import LLAMA3_VOCAB

EOS = 128001  # Llama 3's <|end_of_text|>
SEQ = 8192


def document_lengths(rng: np.random.Generator, total: int) -> np.ndarray:
    """Log-normal lengths (median 1,024, clipped to [32, 16384]) that add up to at least `total`."""
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths += np.clip(rng.lognormal(np.log(1024), 1.0, 4096), 32, 16384).astype(int).tolist()
    return np.asarray(lengths)


def packed_tokens(rng: np.random.Generator, total: int) -> np.ndarray:
    """`total` random ids (never EOS) with an EOS closing each document."""
    tokens = rng.integers(0, EOS, total, dtype=np.uint32)
    ends = np.cumsum(document_lengths(rng, total)) - 1
    tokens[ends[ends < total]] = EOS
    return tokens


def timed(fn, repeats: int = 10) -> float:  # type: ignore[no-untyped-def]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def varlen_call():  # type: ignore[no-untyped-def]
    """A causal varlen attention callable over (total, heads, d) tensors, or None on this torch."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    gqa = {"enable_gqa": True} if "enable_gqa" in params else None

    def run(q, k, v, cu, max_len):  # type: ignore[no-untyped-def]
        if gqa is None:  # older signature: repeat the kv heads
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        extra = dict(gqa or {})
        if "window_size" in params:
            extra["window_size"] = (-1, 0)
        elif "is_causal" in params:
            extra["is_causal"] = True
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)

    return run


def kernels() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    b, a, kv, d = 2, 32, 8, 64
    dev, dt = torch.device("cuda"), torch.bfloat16
    tokens = torch.from_numpy(packed_tokens(rng, b * SEQ).astype(np.int64)).view(b, SEQ).to(dev)
    docs = document_ids(tokens, EOS)
    counts = [int(docs[i].max()) + 1 for i in range(b)]
    q = torch.randn(b, a, SEQ, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, kv, SEQ, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, kv, SEQ, d, device=dev, dtype=dt, requires_grad=True)
    dout = torch.randn(b, a, SEQ, d, device=dev, dtype=dt)
    print(f"kernels: b={b} s={SEQ} heads {a}/{kv} d={d}; documents per sample {counts}", flush=True)

    # The reference: every document alone through causal flash attention.
    ref = torch.empty_like(q)
    for i in range(b):
        bounds = torch.nonzero(torch.diff(docs[i], prepend=docs[i, :1] - 1)).flatten().tolist() + [SEQ]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            ref[i : i + 1, :, lo:hi] = F.scaled_dot_product_attention(
                q[i : i + 1, :, lo:hi], k[i : i + 1, :, lo:hi], v[i : i + 1, :, lo:hi],
                is_causal=True, enable_gqa=True,
            )  # fmt: skip
    results: dict[str, float] = {}

    def causal() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(dout)

    results["flash causal, no mask"] = timed(causal)
    mask = document_mask(docs)
    flex_out = attend(q, k, v, mask=mask)
    print(f"flex vs per-document flash: max abs error {(flex_out - ref).abs().max().item():.4f}", flush=True)

    def flex() -> None:
        attend(q, k, v, mask=mask).backward(dout)

    def flex_with_mask() -> None:
        attend(q, k, v, mask=document_mask(docs)).backward(dout)

    results["flex, document mask"] = timed(flex)
    results["flex, document mask (mask built each call)"] = timed(flex_with_mask)

    run = varlen_call()
    if run is not None:
        # One packed sequence of all b rows; document boundaries as cumulative offsets (int32).
        flat_docs = (docs + torch.tensor([0] + counts[:-1], device=dev).cumsum(0)[:, None]).flatten()
        sizes = torch.bincount(flat_docs)
        cu = torch.zeros(len(sizes) + 1, dtype=torch.int32, device=dev)
        cu[1:] = sizes.cumsum(0)
        max_len = int(sizes.max())
        qv, kv_, vv = (
            t.detach().transpose(1, 2).reshape(b * SEQ, t.shape[1], d).requires_grad_() for t in (q, k, v)
        )
        dv = dout.transpose(1, 2).reshape(b * SEQ, a, d)
        try:
            out = run(qv, kv_, vv, cu, max_len)
            err = (out.view(b, SEQ, a, d).transpose(1, 2) - ref).abs().max().item()
            print(f"varlen vs per-document flash: max abs error {err:.4f}", flush=True)
            results["varlen flash, documents"] = timed(lambda: run(qv, kv_, vv, cu, max_len).backward(dv))
        except Exception as exc:  # report and go on: the training comparison still runs
            print(f"varlen_attn failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    else:
        print("varlen_attn: not in this torch", flush=True)
    base = results["flash causal, no mask"]
    for name, ms in results.items():
        print(f"  {name:45s} {ms:7.2f} ms fwd+bwd ({base / ms:.2f}x the unmasked kernel's speed)", flush=True)


def write_dataset(path: Path) -> None:
    """A prepared dataset (format 1) of packed random documents: train 8 x 4 samples, val 1 sample."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    counts = {"train": 33 * SEQ + 1, "val": SEQ + 1}
    for split, n in counts.items():
        packed_tokens(rng, n).tofile(path / f"{split}.bin")
    meta = {
        "format_version": 1, "dtype": "uint32", "vocab_size": LLAMA3_VOCAB, "eos_token_id": EOS,
        "tokenizer": "random ids (bench/document_masking.py)", "num_tokens": counts, "num_documents": 0,
        "sources": [],
    }  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def training(out_dir: Path) -> None:
    data = out_dir / "packed"
    write_dataset(data)
    common = [
        "--model.preset=llama-1b", f"--model.max_seq_len={SEQ}", "--training.dtype=bfloat16",
        "--training.device=cuda", "--steps=6", "--warmup=3", "--tokens=real", f"--data.path={data}",
        f"--data.seq_len={SEQ}", "--training.micro_batch_size=4", "--training.global_batch_size=4",
    ]  # fmt: skip
    for compile_ in ("false", "true"):
        rates = {}
        for masking in ("false", "true"):
            json_out = out_dir / f"mask-{masking}-compile-{compile_}.jsonl"
            json_out.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "threefold", "bench", *common, f"--training.compile={compile_}",
                   f"--data.document_masking={masking}", f"--json-out={json_out}"]  # fmt: skip
            print("$", " ".join(cmd[1:]), flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(json_out.read_text().splitlines()[-1])
            rates[masking] = r["tokens_per_s_per_gpu"]
            print(f"compile={compile_} document_masking={masking}: {r['tokens_per_s_per_gpu']:.0f} tokens/s, "
                  f"step {r['step_time_median_s']:.3f} s, peak {r['peak_memory_gib']:.1f} GiB, "
                  f"losses {[round(x, 3) for x in r.get('losses', [])][-3:]}", flush=True)  # fmt: skip
        if len(rates) == 2:
            print(f"compile={compile_}: masked / unmasked tokens/s = {rates['true'] / rates['false']:.3f} "
                  "(target >= 0.9)", flush=True)  # fmt: skip


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/document_masking")
    out_dir.mkdir(parents=True, exist_ok=True)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    kernels()
    training(out_dir)


if __name__ == "__main__":
    main()
