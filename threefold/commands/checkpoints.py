"""`threefold checkpoint convert`, `import-hf`, `export-hf`: checkpoints in and out of any layout.

Each writes a new directory: absent or empty, or, with --overwrite, replaced whole; never one that holds
its input (exporting a run's checkpoint into the run directory would delete it). The output appears
complete or not at all (written beside it, fsynced, renamed into place).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from threefold.commands.args import add_command

CONVERT_HELP = "write a checkpoint of any layout as one layout-free file of full tensors"
IMPORT_HELP = "turn a Hugging Face checkpoint (safetensors + config.json) into a threefold checkpoint"
EXPORT_HELP = "write a threefold checkpoint (any layout) as a Hugging Face checkpoint"
CHECKPOINT_ARG = "a checkpoint directory, or a run's checkpoint.dir (uses latest)"
OVERWRITE_HELP = "replace what the output directory holds (never the input)"


def register(sub: Any) -> None:
    """Add `import-hf`, `export-hf` and `checkpoint convert` to the top-level subparsers."""
    imp = add_command(sub, "import-hf", cmd_import_hf, help=IMPORT_HELP)
    imp.add_argument("hf_dir", help="directory with config.json and model.safetensors (or an index)")
    imp.add_argument("out_dir", help="the threefold checkpoint to write")
    imp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    exp = add_command(sub, "export-hf", cmd_export_hf, help=EXPORT_HELP)
    exp.add_argument("checkpoint", help=CHECKPOINT_ARG)
    exp.add_argument("out_dir", help="where to write config.json and model.safetensors")
    exp.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="split the weights into files this big")
    exp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    checkpoint = sub.add_parser(
        "checkpoint", help="checkpoint tools: convert", description="Checkpoint tools."
    )
    actions = checkpoint.add_subparsers(dest="action", metavar="ACTION", required=True)
    convert = add_command(actions, "convert", cmd_convert, help=CONVERT_HELP)
    convert.add_argument("src", help=CHECKPOINT_ARG)
    convert.add_argument("dst", help="the consolidated checkpoint to write")
    convert.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _checkpoint_path(arg: str) -> Path:
    """A checkpoint directory as given, or the one `latest` points to in a run's checkpoint.dir."""
    from threefold.checkpoint import latest_checkpoint

    path = Path(arg)
    if not (path / "manifest.json").is_file() and (path / "latest").is_file():
        return latest_checkpoint(path) or path
    return path


def _inputs(given: str, path: Path) -> list[str | Path]:
    """What an output may not hold: the checkpoint read, and the directory named on the command line."""
    return [given, path]


def cmd_convert(args: argparse.Namespace) -> int:
    from threefold.checkpoint import convert_checkpoint

    src = _checkpoint_path(args.src)
    out = convert_checkpoint(src, args.dst, overwrite=args.overwrite, keep=_inputs(args.src, src))
    print(f"wrote {out} from {src}: full weights and optimizer state in one file, loadable under any layout")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from threefold.checkpoint import write_full_checkpoint
    from threefold.commands.toml_writer import toml_table, toml_value
    from threefold.config import Config
    from threefold.data.tokenizer import read_tokenizer_files
    from threefold.files import check_output_dir
    from threefold.model.hf import load_hf_checkpoint

    keep = [args.hf_dir]
    check_output_dir(args.out_dir, overwrite=args.overwrite, keep=keep)  # before the reading
    model, state = load_hf_checkpoint(args.hf_dir)
    fields = {k: v for k, v in dataclasses.asdict(model).items() if k != "preset"}
    tokenizer = read_tokenizer_files(args.hf_dir)  # it travels with the weights, back out on export-hf
    extra = {"model.toml": toml_table("model", fields), **tokenizer}
    out = write_full_checkpoint(
        Config(model=model), state, args.out_dir, overwrite=args.overwrite, keep=keep, extra_files=extra
    )
    print(f"wrote {out} ({sum(t.numel() for t in state.values()):,} parameters)")
    if tokenizer:
        print(f"with its tokenizer ({', '.join(tokenizer)}): generate, eval and data prepare use it")
    else:
        print(
            f"no tokenizer.json in {args.hf_dir}: name one (--tokenizer) for generate, eval and data prepare"
        )
    print(f"train from it with this model section (also in {out / 'model.toml'}) and")
    print(f"[checkpoint]\nload = {toml_value(str(out))}\n")
    print(toml_table("model", fields))
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    import torch

    from threefold.checkpoint import read_full_state
    from threefold.config import ModelConfig
    from threefold.data.tokenizer import find_tokenizer, read_tokenizer_files
    from threefold.files import check_output_dir
    from threefold.model.hf import save_hf_checkpoint, to_hf_state_dict

    path = _checkpoint_path(args.checkpoint)
    keep = _inputs(args.checkpoint, path)
    check_output_dir(args.out_dir, overwrite=args.overwrite, keep=keep)  # before the reading
    model_fields, state = read_full_state(path)
    try:
        model = ModelConfig(**model_fields)
        model.check()
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {str(path)!r}: its config's model section is not usable: {e}") from None
    state = {k: v.to(getattr(torch, args.dtype)) for k, v in state.items()}
    to_hf_state_dict(model, state)  # checks names and shapes before anything is written
    tokenizer = find_tokenizer(path)  # the checkpoint's own, or its run directory's
    save_hf_checkpoint(
        model, state, args.out_dir, max_shard_bytes=int(args.max_shard_gb * 2**30),
        overwrite=args.overwrite, keep=keep,
        extra_files=read_tokenizer_files(tokenizer.parent) if tokenizer else None,
    )  # fmt: skip
    print(f"wrote {args.out_dir} from {path}")
    return 0
