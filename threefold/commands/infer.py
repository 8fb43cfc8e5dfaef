"""`threefold generate` and `threefold eval`: a checkpoint of any layout, sampled from or scored.

Each reads the config the checkpoint was trained with (its model, dtype and data), under a layout of its
own (default: one process; `--parallel.tp_size=2` etc. to shard it) and the given overrides. Everything a
user can get wrong (the checkpoint, the tokenizer, the prompts' length, the sampling values, the dataset)
is checked once, before any worker starts; then one worker per rank runs the command.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from threefold.commands.args import add_command, positive_int
from threefold.config import Config, DataConfig, ModelConfig, build_config

if TYPE_CHECKING:
    import torch

    from threefold.parallel.mesh import Mesh
    from threefold.reliability.faults import FaultPlan

GENERATE_HELP = "continue prompts with a checkpoint's model (any layout; tp and pp with --parallel.*)"
EVAL_HELP = "loss and perplexity of a checkpoint's model over a prepared dataset split"
CHECKPOINT_ARG = "a checkpoint directory, or a run's checkpoint.dir (uses latest)"
KEPT_SECTIONS = ("model", "data", "training", "optimizer")
"""What a checkpoint's saved config lends generate and eval; the layout, checkpoint, logging and
reliability sections start from their defaults (a training layout says nothing about inference)."""


def register(sub: Any) -> None:
    """Add `generate` and `eval` to the top-level subparsers."""
    gen = add_command(sub, "generate", cmd_generate, help=GENERATE_HELP, overrides=True)
    gen.add_argument("checkpoint", help=CHECKPOINT_ARG)
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    gen.add_argument(
        "--prompt-file",
        action="append",
        default=[],
        metavar="F",
        help="a file whose text is one prompt (repeatable)",
    )
    gen.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="per prompt (64)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    gen.add_argument(
        "--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest (0: all)"
    )
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling, in (0, 1] (1)")
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (0)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    gen.add_argument(
        "--tokenizer", metavar="PATH", help="tokenizer.json or 'gpt2' (default: the checkpoint's)"
    )
    gen.add_argument("--json", action="store_true", help="print one JSON line per prompt")
    gen.add_argument(
        "--cuda-graph",
        action="store_true",
        help="compile the decode step and replay it as a CUDA graph (CUDA, pp 1)",
    )
    _add_nproc(gen)

    ev = add_command(sub, "eval", cmd_eval, help=EVAL_HELP, overrides=True)
    ev.add_argument("checkpoint", help=CHECKPOINT_ARG)
    ev.add_argument(
        "--data", required=True, metavar="DIR", help="a prepared dataset (threefold data prepare)"
    )
    ev.add_argument("--split", choices=["train", "val"], default="val")
    ev.add_argument("--seq-len", type=positive_int, metavar="S", help="window length (default: data.seq_len)")
    ev.add_argument("--batches", type=positive_int, metavar="N", help="micro-batches to score (default: all)")
    ev.add_argument("--json", action="store_true", help="print one JSON line")
    _add_nproc(ev)


def _add_nproc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc", type=positive_int, metavar="N",
        help="local worker processes (default: tp_size * pp_size * dp_size; ignored under torchrun)",
    )  # fmt: skip


def checkpoint_config(path: Path, overrides: list[str]) -> Config:
    """The config a checkpoint was trained with (KEPT_SECTIONS of it), then `overrides`."""
    from threefold.checkpoint import load_manifest

    saved = load_manifest(path)["config"]
    raw = {k: dict(v) for k, v in saved.items() if k in KEPT_SECTIONS and isinstance(v, dict)}
    # An imported checkpoint saved the default data section, whose windows may outrun the model's context.
    data = raw.setdefault("data", {})
    context = raw.get("model", {}).get("max_seq_len", ModelConfig().max_seq_len)
    data["seq_len"] = min(data.get("seq_len", DataConfig().seq_len), context)
    return build_config(raw, overrides, check_paths=False)


def _prompts(args: argparse.Namespace) -> list[str]:
    texts = list(args.prompt)
    for name in args.prompt_file:
        file = Path(name)
        if not file.is_file():
            raise ValueError(f"prompt file {name!r} does not exist")
        texts.append(file.read_text(encoding="utf-8"))
    if not texts:
        raise ValueError("give at least one --prompt TEXT or --prompt-file F")
    return texts


def cmd_generate(args: argparse.Namespace) -> int:
    from threefold.checkpoint import load_manifest
    from threefold.infer.generate import check_prompts
    from threefold.infer.load import checkpoint_dir
    from threefold.infer.sampling import SamplingParams
    from threefold.infer.text import load_codec
    from threefold.launch import run_workers, world_from_env

    path = checkpoint_dir(args.checkpoint)
    config = checkpoint_config(path, args.overrides)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    )  # fmt: skip
    params.check()
    codec = load_codec(path, args.tokenizer, load_manifest(path)["config"])
    texts = _prompts(args)
    prompts = [codec.encode(t, chat=args.chat) for t in texts]
    check_prompts(prompts, config.model.max_seq_len)
    own = [f"--max-new-tokens={args.max_new_tokens}", f"--temperature={args.temperature}",
           f"--top-k={args.top_k}", f"--top-p={args.top_p}", f"--seed={args.seed}"]  # fmt: skip
    own += [f"--prompt={t}" for t in args.prompt] + [f"--prompt-file={f}" for f in args.prompt_file]
    own += [
        flag
        for flag, on in (("--chat", args.chat), ("--json", args.json), ("--cuda-graph", args.cuda_graph))
        if on
    ]
    own += [f"--tokenizer={args.tokenizer}"] if args.tokenizer else []
    body = partial(
        _generate_body, path=path, prompts=prompts, texts=texts, params=params, codec=codec,
        as_json=args.json, cuda_graph=args.cuda_graph,
    )  # fmt: skip
    worker_argv = ["generate", str(args.checkpoint), *own, *args.overrides]
    return run_workers(
        config, body, world=world_from_env(), nproc=args.nproc, worker_argv=worker_argv, log_layout=False
    )


def _dtype(config: Config) -> torch.dtype:
    import torch

    return getattr(torch, config.training.dtype)


def _load_stage(config: Config, mesh: Mesh, device: torch.device, path: Path) -> Any:
    from threefold.infer.load import build_stage, load_checkpoint_weights

    model = build_stage(config.model, mesh, device=device, dtype=_dtype(config))
    load_checkpoint_weights(model, path)
    return model.eval()


def _generate_body(
    config: Config, mesh: Mesh, device: torch.device, faults: FaultPlan | None, *, path: Path,
    prompts: list[list[int]], texts: list[str], params: Any, codec: Any, as_json: bool, cuda_graph: bool,
) -> int:  # fmt: skip
    from threefold.infer.generate import Decoder, generate

    model = _load_stage(config, mesh, device, path)
    decoder = Decoder(cuda_graph=cuda_graph, compiled=cuda_graph)
    out = generate(model, prompts, params, eos_id=codec.eos_id(), mesh=mesh, decoder=decoder)
    if mesh.rank != 0:
        return 0
    for text, tokens, logprobs in zip(texts, out.tokens, out.logprobs, strict=True):
        continuation = codec.decode(tokens)
        if as_json:
            record = {"prompt": text, "text": continuation, "tokens": tokens, "logprobs": logprobs}
            print(json.dumps(record), flush=True)
        else:
            print(f"{text}{continuation}\n", flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from threefold.data.dataset import TokenDataset, check_dataset
    from threefold.infer.load import checkpoint_dir
    from threefold.launch import run_workers, world_from_env

    path = checkpoint_dir(args.checkpoint)
    config = checkpoint_config(path, args.overrides)
    seq_len = args.seq_len or config.data.seq_len
    if seq_len > config.model.max_seq_len:
        raise ValueError(
            f"--seq-len ({seq_len}) exceeds the model's context "
            f"(model.max_seq_len = {config.model.max_seq_len})"
        )
    check_dataset(args.data, model_vocab_size=config.model.vocab_size)
    TokenDataset(args.data, args.split, seq_len)  # a split too short for one window fails here, once
    own = [f"--data={args.data}", f"--split={args.split}", f"--seq-len={seq_len}"]
    own += ([f"--batches={args.batches}"] if args.batches else []) + (["--json"] if args.json else [])
    body = partial(_eval_body, path=path, data=args.data, split=args.split, seq_len=seq_len,
                   num_batches=args.batches, as_json=args.json)  # fmt: skip
    worker_argv = ["eval", str(args.checkpoint), *own, *args.overrides]
    return run_workers(
        config, body, world=world_from_env(), nproc=args.nproc, worker_argv=worker_argv, log_layout=False
    )


def _eval_body(
    config: Config, mesh: Mesh, device: torch.device, faults: FaultPlan | None, *, path: Path, data: str,
    split: str, seq_len: int, num_batches: int | None, as_json: bool,
) -> int:  # fmt: skip
    from threefold.data.dataset import TokenDataset
    from threefold.infer.evaluate import evaluate

    model = _load_stage(config, mesh, device, path)
    dataset = TokenDataset(data, split, seq_len)
    result = evaluate(
        model, dataset, mesh, micro_batch_size=config.training.micro_batch_size, num_batches=num_batches,
        device=device,
    )  # fmt: skip
    if mesh.rank == 0:
        if as_json:
            record = {"checkpoint": str(path), "split": split, "seq_len": seq_len, **result.__dict__}
            print(json.dumps(record), flush=True)
        else:
            windows = f"{result.num_windows} windows of {seq_len} tokens ({result.num_tokens:,} tokens)"
            print(
                f"{split}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f} over {windows}",
                flush=True,
            )
    return 0
