"""Weighted blends of prepared datasets: the blended stream's shares, determinism and resume, its config,
and a short training run on two sources (per-source tokens and validation losses, exact resume)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import run_ranks
from tiny import tiny_config

from threefold.config import Config, build_config
from threefold.data.blend import BLOCK, BlendLoader, BlendSource, apportion, block_sequence
from threefold.data.dataset import BatchLoader, TokenDataset
from threefold.data.prepare import prepare_dataset

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"
SEQ_LEN = 4


def _counting(path: Path, num_tokens: int, first: int) -> TokenDataset:
    """A hand-made dataset whose tokens count up from `first`, so a sample shows where it came from."""
    path.mkdir(parents=True)
    for split, n in (("train", num_tokens), ("val", 9)):
        np.arange(first, first + n, dtype=np.uint16).tofile(path / f"{split}.bin")
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": 65536, "eos_token_id": 0,
            "tokenizer": "gpt2", "num_tokens": {"train": num_tokens, "val": 9}, "sources": []}  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))
    return TokenDataset(path, "train", SEQ_LEN)


@pytest.fixture
def three(tmp_path: Path) -> list[BlendSource]:
    """Three sources of 25, 10 and 40 samples: token t of source s is 20000 * s + t."""
    sizes = [101, 41, 161]
    return [
        BlendSource(f"s{i}", _counting(tmp_path / f"s{i}", n, 20000 * i), w)
        for i, (n, w) in enumerate(zip(sizes, [0.5, 0.3, 0.2], strict=True))
    ]


def _blend(sources: list[BlendSource], **overrides: Any) -> BlendLoader:
    kwargs = dict(micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=1, seed=3) | overrides
    return BlendLoader(sources, **kwargs)


def _ids(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """The first token of each sample: (source, sample) as 20000 * source + 4 * sample."""
    return [int(t) for x, _ in batches for t in x[:, 0]]


def _global_stream(sources: list[BlendSource], steps: int, start_step: int = 0, **layout: Any) -> list[int]:
    """Every dp rank's samples of `steps` steps from `start_step`, concatenated in rank order per step."""
    dp = layout.get("dp_size", 1)
    loaders = [_blend(sources, dp_rank=r, start_sample=start_step * 8, **layout) for r in range(dp)]
    return [i for _ in range(steps) for loader in loaders for i in _ids(loader.next_batch())]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 1], [0.5, 0.25, 0.2, 0.05], [0, 2, 1], [0.123, 9]])
def test_every_prefix_keeps_its_share(weights: list[float]) -> None:
    counts = apportion(weights, BLOCK)
    assert counts.sum() == BLOCK
    share = np.asarray(weights) / sum(weights)
    assert np.abs(counts - share * BLOCK).max() < 1
    sources, ranks = block_sequence(counts)
    # Over two blocks: within one sample of the quantized share, and of the weight within 1 + k / BLOCK.
    seq = np.concatenate([sources, sources])
    given = np.cumsum(np.eye(len(weights), dtype=np.int64)[seq], axis=0)
    k = np.arange(1, 2 * BLOCK + 1)[:, None]
    assert np.abs(given - counts / BLOCK * k).max() < 1
    assert (np.abs(given - share * k) <= 1 + k / BLOCK).all()
    # block_rank counts the source's earlier positions in the block.
    for s in range(len(weights)):
        assert np.array_equal(ranks[sources == s], np.arange(counts[s]))


def test_blend_is_deterministic_and_draws_each_source_in_its_epochs(three: list[BlendSource]) -> None:
    a, b = _global_stream(three, 40), _global_stream(three, 40)
    assert a == b
    assert a != _global_stream(three, 40, seed=4)
    by_source = [[i - 20000 * s for i in a if i // 20000 == s] for s in range(3)]
    for s, ids in enumerate(by_source):
        n = len(three[s].dataset)
        assert sorted(ids[:n]) == [SEQ_LEN * j for j in range(n)], "the first epoch visits every sample once"
    counts = [len(ids) for ids in by_source]
    assert all(abs(c - w * 320) <= 1 for c, w in zip(counts, [0.5, 0.3, 0.2], strict=True))
    assert _blend(three, start_sample=320).samples_per_source() == {f"s{i}": c for i, c in enumerate(counts)}


@pytest.mark.parametrize("layout", [dict(dp_size=2), dict(dp_size=4, micro_batch_size=1), dict(dp_size=1)])
def test_resume_under_another_layout_continues_the_same_stream(
    three: list[BlendSource], layout: dict
) -> None:
    whole = _global_stream(three, 12)
    for start in (0, 1, 5, 11):
        assert _global_stream(three, 12 - start, start_step=start, **layout) == whole[start * 8 :]
    loader = _blend(three)
    for _ in range(3):
        loader.next_batch()
    resumed = _blend(three, dp_size=2, micro_batch_size=1)
    resumed.load_state_dict(loader.state_dict())
    assert resumed.consumed_samples == 24


def test_resume_refuses_another_blend(three: list[BlendSource]) -> None:
    state = _blend(three).state_dict()
    reweighted = [BlendSource(s.name, s.dataset, w) for s, w in zip(three, [0.2, 0.3, 0.5], strict=True)]
    with pytest.raises(ValueError, match=r"loader state has blend=.*this blend has blend="):
        _blend(reweighted).load_state_dict(state)
    with pytest.raises(ValueError, match=r"loader state has seed=3 but this blend has seed=4"):
        _blend(three, seed=4).load_state_dict(state)
    _blend(three).load_state_dict({"consumed_samples": 16})  # a single dataset's checkpoint holds only this


def test_one_source_is_the_plain_loader(three: list[BlendSource]) -> None:
    dataset = three[0].dataset
    for layout in (dict(), dict(dp_size=2, dp_rank=1, micro_batch_size=1)):
        kwargs = dict(micro_batch_size=2, global_batch_size=8, dp_rank=0, dp_size=1, seed=3) | layout
        plain, blend = BatchLoader(dataset, **kwargs), BlendLoader([BlendSource("a", dataset, 0.4)], **kwargs)
        for _ in range(9):  # almost three epochs
            assert _ids(plain.next_batch()) == _ids(blend.next_batch())


def test_loader_errors_and_a_zero_weight(three: list[BlendSource], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"blend weights \[0.5, -1\] must be finite, >= 0"):
        apportion([0.5, -1], BLOCK)
    with pytest.raises(ValueError, match=r"need distinct names, got \['s0', 's0'\]"):
        _blend([three[0], three[0]])
    other = BlendSource("long", TokenDataset(tmp_path / "s0", "train", SEQ_LEN + 1), 1.0)
    with pytest.raises(ValueError, match=r"must share seq_len, got \[4, 5\]"):
        _blend([three[0], other])
    muted = [three[0], BlendSource("s1", three[1].dataset, 0.0)]
    assert all(i < 20000 for i in _global_stream(muted, 5))
    assert _blend(muted, start_sample=40).samples_per_source() == {"s0": 40, "s1": 0}


# --- Config -------------------------------------------------------------------------------------------


def _raw(config: Config) -> dict[str, dict[str, Any]]:
    return {s: {k: v for k, v in values.items() if v is not None} for s, values in config.to_dict().items()}


def _blend_config(base: Config, sources: list[dict[str, Any]], **data: Any) -> Config:
    raw = _raw(base)
    raw["data"] = {k: v for k, v in raw["data"].items() if k not in ("path", "sources")} | data
    raw["data"]["sources"] = sources
    return build_config(raw)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Two small GPT-2 datasets (sonnets split in halves) and one with another tokenizer."""
    root = tmp_path_factory.mktemp("blend")
    lines = SONNETS.read_text().splitlines()
    half = len(lines) // 2
    (root / "poems.txt").write_text("\n".join(lines[:half]))
    with open(root / "more.jsonl", "w") as f:
        for i in range(0, len(lines) - half, 14):
            f.write(json.dumps({"text": "\n".join(lines[half + i : half + i + 14])}) + "\n")
    prepare_dataset([root / "poems.txt"], root / "poems", val_fraction=0.2)
    prepare_dataset([root / "more.jsonl"], root / "more", val_fraction=0.2)
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"<eos>": 0, "shall": 1, "thee": 2}, unk_token="<eos>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(root / "words.json"))
    (root / "tiny.txt").write_text("shall I compare thee\n" * 200)
    prepare_dataset([root / "tiny.txt"], root / "words", tokenizer=str(root / "words.json"), val_fraction=0.2)
    return {name: root / name for name in ("poems", "more", "words")}


@pytest.mark.parametrize(
    "sources, data, message",
    [
        (
            [dict(path="P", weight=-0.2), dict(path="M")],
            {},
            r"data.sources\[0\].weight \(-0.2\) must be >= 0",
        ),
        ([dict(path="P", weight=0), dict(path="M", weight=0.0)], {}, r"data.sources weights sum to 0"),
        (
            [dict(path="P", weight=1e-6), dict(path="M", weight=1.0)],
            {},
            r"data.sources\[0\] \('poems'\) has weight 1e-06, 1.00e-06 of the total, below the blend's "
            r"resolution of 1/65,536: it would get no samples",
        ),
        (
            [dict(path="P")],
            dict(path="P"),
            r"data.path \('.*poems'\) and data.sources \(1 of them\) are exclusive",
        ),
        (
            [dict(path="P", name="x"), dict(path="M", name="x")],
            {},
            r"data.sources\[0\] and data.sources\[1\] ",
        ),
        ([dict(path="P"), dict(path="W")], {}, r"data.sources 'poems' and 'words' differ in tokenizer"),
        ([dict(path="P", wieght=1)], {}, r"unknown key\(s\) \['wieght'\] in data.sources\[0\]"),
        ([dict(path="P", weight="1")], {}, r"data.sources\[0\].weight = '1' is not a valid float"),
        ([dict(weight=1)], {}, r"data.sources\[0\] needs a path"),
        ([dict(path="P")], dict(prepare_shakespeare=True), r"prepare_shakespeare works with data.path only"),
    ],
)
def test_config_errors(datasets: dict[str, Path], tmp_path: Path, sources, data, message) -> None:
    base = tiny_config(datasets["poems"], tmp_path)
    paths = {"P": datasets["poems"], "M": datasets["more"], "W": datasets["words"]}
    sources = [s | ({"path": str(paths[s["path"]])} if "path" in s else {}) for s in sources]
    data = {k: str(paths[v]) if k == "path" else v for k, v in data.items()}
    with pytest.raises(ValueError, match=message):
        _blend_config(base, sources, **data)


def test_config_blend_form_and_overrides(datasets: dict[str, Path], tmp_path: Path) -> None:
    base = tiny_config(datasets["poems"], tmp_path)
    config = _blend_config(
        base, [dict(path=str(datasets["poems"]), weight=3), dict(name="rest", path=str(datasets["more"]))]
    )
    assert [(s.label, s.weight) for s in config.data.datasets()] == [("poems", 3.0), ("rest", 1.0)]
    assert [s.label for s in base.data.datasets()] == ["poems"]
    assert build_config(_raw(config)) == config
    with pytest.raises(ValueError, match="data.path .* and data.sources .* are exclusive"):
        build_config(_raw(config), [f"--data.path={datasets['more']}"])
    with pytest.raises(ValueError, match=r"--data.sources=x: a blend is .* only --data.sources=\[\] "):
        build_config(_raw(base), ["--data.sources=x"])
    single = build_config(_raw(config), ["--data.sources=[]", f"--data.path={datasets['more']}"])
    assert single.data.datasets()[0].path == str(datasets["more"])
    assert build_config(_raw(base), [f"--data.path={datasets['more']}"]).data.path == str(datasets["more"])


# --- Training on a blend ---------------------------------------------------------------------------------


def _train_body(rank: int, world_size: int, config: Config) -> dict:
    from threefold.parallel.mesh import build_mesh
    from threefold.train import train

    p = config.parallel
    result = train(config, build_mesh(p.tp_size, p.dp_size, p.pp_size, p.cp_size), torch.device("cpu"))
    return {"losses": result.losses, "val": result.val_losses, "per_source": result.source_val_losses}


def _train_or_error(rank: int, world_size: int, config: Config) -> dict | str:
    try:
        return _train_body(rank, world_size, config)
    except ValueError as e:
        return str(e)


def _metrics(config: Config) -> list[dict]:
    path = Path(config.logging.out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _training_config(
    datasets: dict[str, Path],
    run: Path,
    dp: int = 1,
    weights: tuple[float, float] = (0.75, 0.25),
    **checkpoint: Any,
) -> Config:
    base = tiny_config(
        datasets["poems"], run, dp=dp,
        training=dict(max_steps=4, seed=5, eval_interval=2),
        logging=dict(log_interval=2),
        checkpoint=dict(interval=2) | checkpoint,
    )  # fmt: skip
    sources = [
        dict(path=str(datasets["poems"]), weight=weights[0]),
        dict(path=str(datasets["more"]), weight=weights[1]),
    ]
    return _blend_config(base, sources)


def test_training_on_a_blend_reports_each_source_and_resumes_exactly(
    datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = _training_config(datasets, tmp_path / "a")
    whole = run_ranks(1, _train_body, config, timeout=240)[0]
    records = _metrics(config)
    tokens = [r for r in records if "data/poems/tokens" in r]
    assert [r["step"] for r in tokens] == [2, 4]
    for r in tokens:
        assert r["data/poems/tokens"] + r["data/more/tokens"] == r["step"] * 8 * 16
        assert r["data/poems/tokens"] == 0.75 * r["step"] * 8 * 16
    assert sorted(whole["per_source"]) == [0, 2, 4]
    for step, losses in whole["per_source"].items():
        assert sorted(losses) == ["more", "poems"]
        val = [r for r in records if r["step"] == step and "val/loss" in r][0]
        assert val["val/poems/loss"] == pytest.approx(losses["poems"])
        assert whole["val"][step] == pytest.approx(0.75 * losses["poems"] + 0.25 * losses["more"])

    # Resumed from step 2 under dp 2: the same samples, so the same losses (to float summation order).
    resumed_config = _training_config(
        datasets, tmp_path / "b", dp=2, load=str(tmp_path / "a" / "ckpt" / "step_2")
    )
    resumed = run_ranks(2, _train_body, resumed_config, timeout=240)[0]
    assert resumed["losses"] == pytest.approx(whole["losses"][2:], rel=1e-5)
    assert resumed["per_source"][4] == pytest.approx(whole["per_source"][4], rel=1e-5)
    last = [r for r in _metrics(resumed_config) if "data/more/tokens" in r][-1]
    assert last["data/more/tokens"] == tokens[-1]["data/more/tokens"]

    # Another blend would give other samples at the checkpoint's position: refused.
    other = _training_config(
        datasets, tmp_path / "c", weights=(0.5, 0.5), load=str(tmp_path / "a" / "ckpt" / "step_2")
    )
    error = run_ranks(1, _train_or_error, other, timeout=240)[0]
    assert isinstance(error, str) and "loader state has blend=[['poems', 0.75], ['more', 0.25]]" in error


def test_the_config_resolution_is_the_blocks():
    from threefold.config.sections import BLEND_RESOLUTION
    from threefold.data.blend import BLOCK, apportion

    assert BLEND_RESOLUTION == BLOCK
    # The smallest share the config lets through still gets a sample in every block.
    assert apportion([1.0, BLOCK - 1.0], BLOCK)[0] == 1
