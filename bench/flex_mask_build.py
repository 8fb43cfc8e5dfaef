"""What building FlexAttention's document block mask costs per micro-batch: torch's `create_block_mask`
(the mask evaluated at every query/key pair) against threefold's `document_mask`, which classifies each
128 x 128 tile from its first and last document id. Both are checked to give the same BlockMask.

Run on a GPU from the repo root: `PYTHONPATH=.:bench python3 bench/flex_mask_build.py`
(packed documents of log-normal length, as bench/fa4_varlen.py draws them).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from document_masking import timed
from fa4_varlen import EOS, packed_documents
from torch.nn.attention.flex_attention import create_block_mask

from threefold.model.attention import document_ids, document_mask

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices")


def run_shape(doc_ids: torch.Tensor) -> str:
    b, s = doc_ids.shape

    def mask_mod(batch, head, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return (q_idx >= kv_idx) & (doc_ids[batch, q_idx] == doc_ids[batch, kv_idx])

    def torchs() -> object:
        return create_block_mask(mask_mod, b, None, s, s, device="cuda")

    def tiles() -> object:
        return document_mask(doc_ids, use_flex=True).block

    want, got = torchs(), tiles()
    same = all(torch.equal(getattr(want, f), getattr(got, f)) for f in FIELDS)
    return (
        f"{b} x {s}: create_block_mask {timed(torchs, 20):.3f} ms, "
        f"from tiles {timed(tiles, 20):.3f} ms, same mask: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="8x2048,4x8192,1x32768", help="b x s, comma-separated")
    parser.add_argument("--median", type=int, default=1024, help="median document length")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        tokens = torch.from_numpy(packed_documents(rng, b, s, args.median)).cuda()
        print(run_shape(document_ids(tokens, EOS)), flush=True)


if __name__ == "__main__":
    main()
