"""FlexAttention's Triton tile sizes for document-masked attention at llama-1b's attention shape (32 query
heads over 8 key/value heads of 64, bf16): is torch's default for this GPU the fastest, or would threefold
gain by pinning other `kernel_options`?

Each configuration is compiled on its own (`torch.compile(flex_attention)` with that `kernel_options`) and
timed forward + backward with CUDA events over the same packed documents (log-normal lengths as
bench/fa4_varlen.py draws them); each output is checked against the default's. `--autotune` adds torch's
own search (`mode="max-autotune-no-cudagraphs"`).

Run on a GPU from the repo root: `PYTHONPATH=.:bench python3 bench/flex_configs.py`
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from document_masking import timed
from fa4_varlen import EOS, packed_documents
from torch.nn.attention.flex_attention import flex_attention

from threefold.model.attention import FLEX_TILES, document_ids, document_mask

# (BLOCK_M, BLOCK_N, num_stages, num_warps) of the forward; torch's Hopper default for bf16, d=64 first.
FORWARD = [(128, 128, 3, 4), (128, 64, 3, 4), (128, 128, 2, 8), (64, 128, 3, 4), (64, 64, 3, 4)]
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_stages, num_warps) of the backward (torch's FlexBwDConfig
# order); the default first.
BACKWARD = [
    (64, 128, 128, 64, 3, 8), (64, 64, 64, 64, 3, 4), (32, 64, 64, 32, 3, 4), (64, 128, 128, 64, 2, 8),
    (32, 128, 128, 32, 3, 4), (64, 64, 64, 64, 4, 4),
]  # fmt: skip


def options(fwd: tuple[int, ...], bwd: tuple[int, ...]) -> dict[str, Any]:
    m, n, stages, warps = fwd
    m1, n1, m2, n2, bstages, bwarps = bwd
    return {
        "fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_stages": stages, "fwd_num_warps": warps,
        "bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_N2": n2, "bwd_BLOCK_M2": m2,
        "bwd_num_stages": bstages, "bwd_num_warps": bwarps,
    }  # fmt: skip


def run_shape(b: int, s: int, median: int, autotune: bool) -> None:
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    docs = document_ids(
        torch.from_numpy(packed_documents(np.random.default_rng(0), b, s, median)).to(dev), EOS
    )
    mask = document_mask(docs).block
    q = torch.randn(b, 32, s, 64, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, 8, s, 64, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, 8, s, 64, device=dev, dtype=dt, requires_grad=True)
    dout = torch.randn_like(q)
    print(f"b={b} s={s} median {median}", flush=True)
    runs: list[tuple[str, Any, dict[str, Any] | None]] = [
        ("torch's default", torch.compile(flex_attention), None)
    ]
    for fwd in FORWARD[1:]:
        runs.append((f"fwd {fwd}", torch.compile(flex_attention), options(fwd, BACKWARD[0])))
    for bwd in BACKWARD[1:]:
        runs.append((f"bwd {bwd}", torch.compile(flex_attention), options(FORWARD[0], bwd)))
    runs.append(("threefold's tiles", torch.compile(flex_attention), dict(FLEX_TILES)))
    if autotune:
        runs.append(("max-autotune", torch.compile(flex_attention, mode="max-autotune-no-cudagraphs"), None))
    reference = None
    for name, fn, opts in runs:
        torch._dynamo.reset()
        started = time.perf_counter()

        def step(fn: Any = fn, opts: dict[str, Any] | None = opts) -> torch.Tensor:
            out = fn(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=opts)
            out.backward(dout)
            return out

        try:
            out = step().detach()
        except Exception as err:  # noqa: BLE001 - a configuration the compiler refuses is reported
            print(f"  {name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})", flush=True)
            continue
        compile_s = time.perf_counter() - started
        reference = out if reference is None else reference
        err = (out - reference).abs().max().item()
        print(
            f"  {name}: {timed(step):.3f} ms fwd+bwd (compile {compile_s:.0f} s, max diff {err:.4f})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="8x2048,4x8192", help="b x s, comma-separated")
    parser.add_argument("--median", type=int, default=1024)
    parser.add_argument("--autotune", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for shape in args.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        run_shape(b, s, args.median, args.autotune)


if __name__ == "__main__":
    main()
