"""TorchTitan (v0.2.2) on llama-1b's shape, for issue 18's side-by-side runs on one GPU.

TorchTitan has no 1B llama flavour; this adds one with shared/BENCHMARKS.md's llama-1b shape and then
runs TorchTitan's own trainer, so that the peer measures itself as it ships (data loading, tokenizing,
logging). Two uses:

    python bench/torchtitan_llama1b.py assets .tt/assets --data data/fp8-corpus --tokens 3000000
        (dev machine) write the GPT-2 tokenizer threefold uses and the corpus's first documents as
        JSON lines, so that both systems read the same text through the same tokenizer
    torchrun --standalone --nproc_per_node=1 bench/torchtitan_llama1b.py train \\
        --job.config_file bench/torchtitan_llama1b.toml [--training.local_batch_size=4]
        (GPU) TorchTitan's trainer with the flavour "1B" added
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def write_assets(out: Path, data: Path, tokens: int) -> None:
    """tokenizer/ (tokenizer.json, tokenizer_config.json) and text/data.json under ``out``."""
    from threefold.data.format import read_meta
    from threefold.data.tokenizer import GPT2_EOS, load_tokenizer

    tokenizer = load_tokenizer("gpt2")
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    config = {"bos_token": GPT2_EOS, "eos_token": GPT2_EOS, "add_bos_token": False}
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    meta = read_meta(data)
    ids = np.memmap(data / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r")[:tokens]
    ends = np.flatnonzero(ids == meta["eos_token_id"])  # every document is closed by the EOS id
    (out / "text").mkdir(parents=True, exist_ok=True)
    start = 0
    with (out / "text" / "data.json").open("w", encoding="utf-8") as f:
        for end in ends:
            text = tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=True)
            f.write(json.dumps({"text": text}) + "\n")
            start = end + 1
    written = start
    print(f"wrote {len(ends)} documents, {written:,} tokens, to {out / 'text' / 'data.json'}")


def train(argv: list[str]) -> None:
    # TorchTitan's ConfigManager.parse_args binds sys.argv[1:] as a default when it is imported.
    sys.argv = [sys.argv[0], *argv]
    from torchtitan.models.llama3 import TransformerModelArgs, llama3_args
    from torchtitan.train import Trainer, main

    # dim 2048 -> SwiGLU hidden int(2 * 4 * 2048 / 3) = 5461, x 1.5 = 8191, rounded up to 256: 8192.
    llama3_args["1B"] = TransformerModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.5,
        multiple_of=256,
        rope_theta=500000,
    )
    main(Trainer)


def cli() -> None:
    if sys.argv[1:2] == ["train"]:  # everything after it is TorchTitan's own command line
        train(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    assets = sub.add_parser("assets", help="write the tokenizer and the text TorchTitan reads")
    assets.add_argument("out", type=Path)
    assets.add_argument("--data", type=Path, default=Path("data/fp8-corpus"))
    assets.add_argument("--tokens", type=int, default=3_000_000)
    sub.add_parser("train", help="TorchTitan's trainer with the flavour 1B (its own arguments follow)")
    args = parser.parse_args()
    write_assets(args.out, args.data, args.tokens)


if __name__ == "__main__":
    cli()
