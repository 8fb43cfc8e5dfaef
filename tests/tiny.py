"""The tiny model the training tests build, as one validated Config.

`tiny_config(dataset, run)` is a 2-layer Llama of width 32 (4 query heads, 2 key/value heads) reading
16-token samples of a prepared dataset, in float32 on the CPU, with the progress bar, TensorBoard and the
plot off and its logs in run/logs. Each keyword section (model=, optimizer=, training=, ...) is merged
key by key over these defaults, so a test spells out only what it changes:

    tiny_config(dataset, tmp_path, tp=2, pp=2, training=dict(max_steps=4, seed=5))

Two rules beyond the merge: a model section that names a `preset` replaces the tiny shape (the preset is
the shape), and a checkpoint section without `dir` saves under run/ckpt (with no checkpoint section the
run saves none). A test that runs `threefold train` in real processes saves its Config with `write_toml`.
`ckpt_config` is the checkpoint tests' run, which tests of resuming and resharding elsewhere start from too;
`masked_config` the document-masking tests' run, which the FA4 tests share.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from threefold.config import Config, build_config, load_config

TINY_LLAMA: dict[str, Any] = dict(
    arch="llama", vocab_size=50257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
    ffn_hidden_size=64, max_seq_len=32,
)  # fmt: skip

_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": dict(seq_len=16),
    # eps 1e-6: Adam would turn a 1e-9 rounding difference in a near-zero gradient into a full lr-sized
    # step; the layouts' gradients agree to ~1e-7, which is what the parity tests are about.
    "optimizer": dict(lr=2e-3, min_lr=2e-4, warmup_steps=1, grad_clip=0.5, eps=1e-6),
    "training": dict(global_batch_size=8, micro_batch_size=2, eval_interval=0, eval_sequences=8,
                     dtype="float32", device="cpu"),
    "logging": dict(progress=False, tensorboard=False, plot=False),
}  # fmt: skip


def wide_model(arch: str = "llama") -> dict[str, Any]:
    """Model overrides for the layout-parity tests: 8 query heads, so tp_size = 4 still divides the heads
    (and the llama's 4 key/value heads); arch='gpt2' is the GPT-2 twin with tied embeddings."""
    if arch == "llama":
        return dict(num_heads=8, num_kv_heads=4)
    return dict(arch=arch, num_heads=8, num_kv_heads=8, tie_embeddings=True)


def defaults(section: type) -> dict[str, Any]:
    """The library's defaults of a config section (e.g. OptimizerConfig), to train with them instead."""
    return dataclasses.asdict(section())


def tiny_config(
    dataset: str | Path,
    run: str | Path,
    /,
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    v: int = 1,
    zero: bool | int = False,
    **sections: dict[str, Any],
) -> Config:
    """The tiny model on `dataset` (a prepared one) under a tp x pp x dp layout with v chunks per stage
    (the interleaved schedule when v > 1), logging under `run`; `sections` override the defaults."""
    layout = dict(tp_size=tp, pp_size=pp, dp_size=dp, num_model_chunks=v, zero=zero,
                  pipeline_schedule="interleaved" if v > 1 else "1f1b")  # fmt: skip
    clash = layout.keys() & sections.get("parallel", {}).keys() - {"pipeline_schedule"}
    assert not clash, f"give {sorted(clash)} as tiny_config's own arguments (tp, pp, dp, v, zero)"
    run = Path(run)
    model = sections.pop("model", {})
    raw: dict[str, dict[str, Any]] = {
        "model": ({} if "preset" in model else TINY_LLAMA) | model,
        "parallel": layout,
        **_DEFAULTS,
        "data": _DEFAULTS["data"] | dict(path=str(dataset)),
        "logging": _DEFAULTS["logging"] | dict(out_dir=str(run / "logs")),
    }
    if "checkpoint" in sections:
        raw["checkpoint"] = dict(dir=str(run / "ckpt"))
    for name, values in sections.items():
        raw[name] = raw.get(name, {}) | values
    return build_config(raw)


CKPT_STEPS = 4
"""How long `ckpt_config` trains: checkpoints at steps 2 and 4."""


def ckpt_config(
    dataset: str | Path,
    run: str | Path,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    v: int = 1,
    zero: bool | int = False,
    *,
    load: str = "",
    hidden: int = 32,
    asynchronous: bool = False,
    **training: Any,
) -> Config:
    """The checkpoint tests' run: the tiny model 8 layers deep (width `hidden`) under a layout, 4 steps of
    seed 5 (`training` overrides), saving under run/ckpt every 2 steps, keeping 3, loading `load` if set."""
    return tiny_config(
        dataset, run, tp=tp, pp=pp, dp=dp, v=v, zero=zero,
        model=dict(hidden_size=hidden, num_layers=8),
        training=dict(max_steps=CKPT_STEPS, seed=5) | training,
        checkpoint=dict(interval=2, keep_last=3, load=load, asynchronous=asynchronous),
    )  # fmt: skip


def masked_config(
    dataset: str | Path,
    run: str | Path,
    model: dict[str, Any],
    *,
    tp: int = 1,
    pp: int = 1,
    v: int = 1,
    parallel: dict[str, Any] | None = None,
    recompute: str = "none",
    masking: bool = True,
) -> Config:
    """The document-masking tests' run: `model` on a dataset of documents, 5 steps of seed 7, attention
    kept inside each document with positions restarting at each (or, `masking` False, neither)."""
    return tiny_config(
        dataset, run, tp=tp, pp=pp, v=v, model=model, parallel=parallel or {}, optimizer=dict(warmup_steps=2),
        data=dict(document_masking=masking, reset_position_ids=masking),
        training=dict(max_steps=5, seed=7, recompute=recompute),
    )  # fmt: skip


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, ints and floats read the same in TOML


def write_toml(path: Path, config: Config) -> Path:
    """Save `config` where `threefold train` can load it: every field spelled out (None ones left to
    their default), checked to load back into the same Config."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    path.write_text("\n".join(lines))
    assert load_config(path) == config, f"{path} does not load back into the config it was written from"
    return path
