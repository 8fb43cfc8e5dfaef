"""What one compiled transformer layer keeps for its backward, on the CPU: the bytes of the distinct
tensors saved during its forward (after a first forward and backward compile it), and the largest of them.

Usage: PYTHONPATH=. python bench/fp8_saved_bytes.py [--fp8 tensorwise|rowwise|none] [--tree DIR]
`--tree` imports threefold from another checkout (e.g. an older commit made with `git archive`), so two
versions compare in one command each. A small llama layer (hidden 256, 2 x 256 tokens), bf16.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fp8", default="tensorwise")
    parser.add_argument("--tree", default=None)
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, os.path.abspath(args.tree))
    import torch
    import torch.distributed as dist

    from threefold.config import ModelConfig
    from threefold.model.transformer import build_model
    from threefold.parallel.layers import TPContext

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    cfg = ModelConfig(
        arch="llama", num_layers=1, hidden_size=256, num_heads=8, num_kv_heads=2, ffn_hidden_size=1024,
        vocab_size=512, max_seq_len=256,
    )  # fmt: skip
    recipe = None if args.fp8 == "none" else args.fp8
    group = dist.group.WORLD
    assert group is not None
    model = build_model(cfg, TPContext(group, fp8=recipe), dtype=torch.bfloat16, compiled=True)
    layer = next(iter(model.layers.values()))
    x = torch.randn(2, 256, 256, dtype=torch.bfloat16, requires_grad=True)
    rope = model.rope(256, torch.device("cpu"))
    saved: dict[int, tuple[int, str, tuple[int, ...]]] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = (storage.nbytes(), str(t.dtype), tuple(t.shape))
        return t

    for _ in range(2):  # the first forward compiles
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            y = layer(x, rope)
        y.float().sum().backward()
    print(f"fp8 {args.fp8}: saved {sum(v[0] for v in saved.values()) / 2**20:.2f} MB")
    for nbytes, dtype, shape in sorted(saved.values(), reverse=True)[:8]:
        print(f"  {nbytes / 2**20:.2f} MB {dtype} {shape}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
