"""Document-masked attention kernels at llama-1b's attention shape: is FlashAttention-4's variable-length
path worth building into threefold's document masking, which runs FlexAttention today?

Usage (on a Hopper GPU with the flash-attn-4 package importable, from the repo root):
    PYTHONPATH=.:bench python3 bench/fa4_varlen.py [--shapes 8x2048,2x8192] [--medians 1024,256]

For each (micro-batch x seq) and each median document length (log-normal lengths clipped to [32, 16384],
as bench/document_masking.py draws them), forward + backward in bf16 of 32 query heads over 8 key/value
heads, head dim 64:
- causal attention with no mask (torch's cuDNN kernel, and FA4 through threefold's operators): the cost
  of attention when documents are ignored;
- FlexAttention with the document block mask, compiled (threefold's document masking today), without and
  with building the mask in the call (training builds it once per micro-batch);
- FA4's variable-length kernels on the packed rows (cu_seqlens from the host, max_seqlen the row length,
  so that nothing waits for the device), called directly.
Each masked output is compared with attention run one document at a time. Milliseconds are CUDA-event
means over 10 calls after 3 warm-up calls.
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np
import torch
import torch.nn.functional as F
from document_masking import timed

from threefold.model.attention import attend, document_ids, document_mask
from threefold.model.fa4 import fa4_attention

EOS = 1  # any id; the tokens other than the EOS ids are never read


def packed_documents(rng: np.random.Generator, b: int, s: int, median: int) -> np.ndarray:
    """(b, s) ids: 0 everywhere but an EOS (1) closing each document of log-normal length."""
    tokens = np.zeros(b * s, dtype=np.int64)
    lengths: list[int] = []
    while sum(lengths) < b * s:
        lengths += np.clip(rng.lognormal(np.log(median), 1.0, 1024), 32, 16384).astype(int).tolist()
    ends = np.cumsum(lengths) - 1
    tokens[ends[ends < b * s]] = EOS
    return tokens.reshape(b, s)


def cu_seqlens(tokens: np.ndarray) -> np.ndarray:
    """Cumulative document boundaries over the flattened rows (int32): a row's end also ends a document."""
    b, s = tokens.shape
    ends = [np.flatnonzero(row == EOS) + 1 + i * s for i, row in enumerate(tokens)]
    bounds = np.unique(np.concatenate([[0], *ends, np.arange(1, b + 1) * s]))
    return bounds.astype(np.int32)


def run_shape(fa: object, b: int, s: int, median: int) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    a, kv, d, dev, dt = 32, 8, 64, torch.device("cuda"), torch.bfloat16
    host = packed_documents(rng, b, s, median)
    docs = document_ids(torch.from_numpy(host).to(dev), EOS)
    cu_host = cu_seqlens(host)
    cu = torch.from_numpy(cu_host).to(dev)
    q = torch.randn(b, a, s, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, kv, s, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, kv, s, d, device=dev, dtype=dt, requires_grad=True)
    dout = torch.randn(b, a, s, d, device=dev, dtype=dt)
    spans = np.diff(cu_host)
    print(f"b={b} s={s} median {median}: {len(spans)} documents, longest {spans.max()}", flush=True)

    ref = torch.empty_like(q)  # every document alone through causal attention
    for lo, hi in zip(cu_host[:-1], cu_host[1:], strict=True):
        row, lo_, hi_ = lo // s, lo % s, hi - (lo // s) * s
        ref[row : row + 1, :, lo_:hi_] = F.scaled_dot_product_attention(
            q[row : row + 1, :, lo_:hi_], k[row : row + 1, :, lo_:hi_], v[row : row + 1, :, lo_:hi_],
            is_causal=True, enable_gqa=True,
        )  # fmt: skip

    flat = [t.detach().transpose(1, 2).reshape(b * s, t.shape[1], d).contiguous() for t in (q, k, v)]
    flat_dout = dout.transpose(1, 2).reshape(b * s, a, d).contiguous()
    scale = d**-0.5

    def varlen_forward() -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = fa._flash_attn_fwd(  # type: ignore[attr-defined]
            *flat, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s,
            softmax_scale=scale, causal=True, return_lse=True,
        )[:2]  # fmt: skip
        return out, lse

    def varlen() -> None:
        out, lse = varlen_forward()
        fa._flash_attn_bwd(  # type: ignore[attr-defined]
            *flat, out, flat_dout, lse, softmax_scale=scale, causal=True,
            cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s,
        )  # fmt: skip

    mask = document_mask(docs)
    flex_err = (attend(q, k, v, mask=mask) - ref).abs().max().item()
    varlen_err = (varlen_forward()[0].view(b, s, a, d).transpose(1, 2) - ref).abs().max().item()
    print(f"  max abs error vs per-document attention: flex {flex_err:.4f}, fa4 varlen {varlen_err:.4f}")
    results = {
        "cuDNN causal, no mask": timed(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(dout)
        ),
        "FA4 causal, no mask (threefold's operators)": timed(lambda: fa4_attention(q, k, v).backward(dout)),
        "flex, document mask (threefold today)": timed(lambda: attend(q, k, v, mask=mask).backward(dout)),
        "flex, document mask built in the call": timed(
            lambda: attend(q, k, v, mask=document_mask(docs)).backward(dout)
        ),
        "FA4 varlen, documents (cu_seqlens from the host)": timed(varlen),
    }
    base = results["flex, document mask (threefold today)"]
    for name, ms in results.items():
        print(f"  {name:50s} {ms:7.3f} ms fwd+bwd  ({base / ms:.2f}x flex's speed)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="8x2048,2x8192")
    parser.add_argument("--medians", default="1024,256")
    args = parser.parse_args()
    fa = importlib.import_module("flash_attn.cute.interface")
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for shape in args.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        for median in args.medians.split(","):
            run_shape(fa, b, s, int(median))


if __name__ == "__main__":
    main()
