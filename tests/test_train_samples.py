"""Samples during training (logging.sample_every): the texts are what `generate` makes of the same
weights, under tp 2 (with sequence parallelism too), pp 2 (one, interleaved and V-shaped chunks), dp 2
with ZeRO-1 and ZeRO-3, and cp 2 as in one process; sampling leaves every layout's losses bit-identical;
the texts land in metrics.jsonl; the config errors; and the optional Weights & Biases run (offline)."""

import json
from pathlib import Path

import pytest
import torch
from distributed import run_ranks
from tiny import tiny_config

from threefold.config import build_config
from threefold.infer.samples import Sampler
from threefold.pipeline.schedules import V_SHAPED

PROMPTS = ["Shall I compare thee", "From fairest creatures we desire"]
SAMPLING = dict(sample_prompts=PROMPTS, sample_every=2, sample_max_new_tokens=6)


def _samples_of(jsonl: Path) -> dict[int, list[dict]]:
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return {r["step"]: r["samples"] for r in records if "samples" in r}


def _train_and_sample(rank: int, world_size: int, config) -> dict:
    """Train; then `generate` from the prompts with the final weights, every rank taking part."""
    from threefold.parallel.mesh import build_mesh
    from threefold.train import train

    p = config.parallel
    mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size, p.cp_size)
    result = train(config, mesh, torch.device("cpu"))
    rng = torch.get_rng_state()
    chunks = result.trainer.chunks
    for chunk in chunks.values():
        chunk.eval()
    after = []
    if config.logging.sample_prompts:
        v_shape = p.pipeline_schedule in V_SHAPED
        samples = Sampler.for_run(config).sample(chunks, mesh, v_shape=v_shape)
        after = [(s.prompt, s.completion) for s in samples]
    return {"losses": result.losses, "after": after, "rng": rng}


def _run(dataset, run: Path, *, world: int = 1, logging: dict | None = None, **layout) -> dict:
    config = tiny_config(dataset, run, training=dict(max_steps=4), logging=logging or {}, **layout)
    return run_ranks(world, _train_and_sample, config)[0]


def test_samples_are_generate_on_the_same_weights_and_leave_the_losses_unchanged(
    sonnets_dataset, tmp_path, monkeypatch
):
    sample = Sampler.sample

    def drawing_sample(self, model, mesh, **kwargs):
        torch.rand(7)  # as a sampler drawing on the global generator would (the ranks fork after this)
        return sample(self, model, mesh, **kwargs)

    monkeypatch.setattr(Sampler, "sample", drawing_sample)
    sampled = _run(sonnets_dataset, tmp_path / "on", logging=SAMPLING)
    plain = _run(sonnets_dataset, tmp_path / "off")
    assert sampled["losses"] == plain["losses"]  # bit for bit
    assert torch.equal(sampled["rng"], plain["rng"])  # the global generator's state is restored
    logged = _samples_of(tmp_path / "on" / "logs" / "metrics.jsonl")
    assert sorted(logged) == [2, 4]
    assert [(s["prompt"], s["completion"]) for s in logged[4]] == sampled["after"]
    assert [s["prompt"] for s in logged[2]] == PROMPTS
    assert all(s["completion"] for s in logged[4])  # six new tokens are not all EOS
    assert not (tmp_path / "off" / "logs" / "metrics.jsonl").read_text().count('"samples"')


@pytest.fixture(scope="module")
def one_process(sonnets_dataset, tmp_path_factory):
    """one_process(model): the one-process run with sampling of a model section, trained once per module
    (most layouts below compare with the same one)."""
    runs: dict[str, dict] = {}

    def one(model: dict) -> dict:
        key = repr(sorted(model.items()))
        if key not in runs:
            run = tmp_path_factory.mktemp("one")
            runs[key] = _run(sonnets_dataset, run, logging=SAMPLING, **({"model": model} if model else {}))
        return runs[key]

    return one


@pytest.mark.parametrize(
    "layout",
    [
        dict(tp=2),
        dict(tp=2, parallel=dict(sequence_parallel=True)),
        dict(pp=2),
        dict(pp=2, parallel=dict(pipeline_schedule="zb-h1")),
        dict(dp=2, zero=1),
        dict(dp=2, zero=3),
        dict(parallel=dict(cp_size=2)),
        dict(pp=2, v=2, model=dict(num_layers=4)),
        dict(pp=2, v=2, model=dict(num_layers=4), parallel=dict(pipeline_schedule="zb-v")),
    ],
    ids=["tp2", "tp2-sp", "pp2", "pp2-zb-h1", "dp2-zero1", "dp2-zero3", "cp2", "pp2-interleaved", "pp2-zb-v"],
)
def test_samples_under_tp_and_pp_match_one_process(sonnets_dataset, tmp_path, one_process, layout):
    one = one_process(layout.get("model", {}))
    split = _run(sonnets_dataset, tmp_path / "split", world=2, logging=SAMPLING, **layout)
    logged = _samples_of(tmp_path / "split" / "logs" / "metrics.jsonl")
    assert [(s["prompt"], s["completion"]) for s in logged[4]] == split["after"] == one["after"]
    plain = _run(sonnets_dataset, tmp_path / "plain", world=2, **layout)
    assert split["losses"] == plain["losses"]  # sampling leaves this layout's training as it was


def test_sampling_with_temperature_is_seeded(sonnets_dataset, tmp_path):
    logging = SAMPLING | dict(sample_temperature=1.0, sample_seed=7, progress=True)
    first = _run(sonnets_dataset, tmp_path / "a", logging=logging)
    second = _run(sonnets_dataset, tmp_path / "b", logging=logging)
    assert _samples_of(tmp_path / "a" / "logs" / "metrics.jsonl") == _samples_of(
        tmp_path / "b" / "logs" / "metrics.jsonl"
    )
    assert first["losses"] == second["losses"]


def test_samples_go_to_the_metrics_file_and_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from threefold.monitor import MetricsWriter

    with MetricsWriter(tmp_path, tensorboard=True) as writer:
        writer.samples(3, [("a | b", "c\nd"), ("e", "")])
    assert _samples_of(tmp_path / "metrics.jsonl") == {
        3: [{"prompt": "a | b", "completion": "c\nd"}, {"prompt": "e", "completion": ""}]
    }
    (run,) = (tmp_path / "tb").iterdir()
    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("samples/text_summary")
    assert text.step == 3
    assert "| a \\| b | c<br>d |" in text.tensor_proto.string_val[0].decode()


def _config(dataset, tmp_path, **logging):
    return tiny_config(dataset, tmp_path, logging=logging)


@pytest.mark.parametrize(
    ("logging", "layout", "message"),
    [
        (dict(sample_every=5), {}, "sample_every = 5 needs at least one logging.sample_prompts"),
        (dict(sample_every=-1), {}, "logging.sample_every must be >= 0, got -1"),
        (SAMPLING | dict(sample_temperature=-0.5), {}, "sample_temperature must be >= 0, got -0.5"),
        (SAMPLING | dict(sample_max_new_tokens=0), {}, "sample_max_new_tokens must be positive, got 0"),
        (SAMPLING | dict(sample_max_new_tokens=32), {}, "(32) must be below model.max_seq_len (32)"),
        (dict(sample_prompts=["a", ""]), {}, "logging.sample_prompts[1] is empty"),
    ],
)
def test_config_errors_name_the_values(sonnets_dataset, tmp_path, logging, layout, message):
    with pytest.raises(ValueError) as e:
        tiny_config(sonnets_dataset, tmp_path, logging=logging, **layout)
    assert message in str(e.value)


def test_a_prompt_too_long_for_the_context_is_named_with_its_length(sonnets_dataset, tmp_path):
    config = _config(sonnets_dataset, tmp_path, **SAMPLING | dict(sample_prompts=["Hi", " word" * 40]))
    with pytest.raises(ValueError, match=r"sample_prompts\[1\] is 40 tokens long; it must be 1 to 26"):
        Sampler.for_run(config)


def test_prompts_load_from_toml_lists_and_override_text(sonnets_dataset, tmp_path):
    raw = {"data": {"path": str(sonnets_dataset)}, "logging": {"sample_prompts": ["a", "b c"]}}
    assert build_config(raw).logging.sample_prompts == ("a", "b c")
    assert build_config(raw, ['--logging.sample_prompts=["x", "y"]']).logging.sample_prompts == ("x", "y")
    assert build_config(raw, ["--logging.sample_prompts=Once upon"]).logging.sample_prompts == ("Once upon",)
    with pytest.raises(ValueError, match="must be a list of strings"):
        build_config({"data": {"path": str(sonnets_dataset)}, "logging": {"sample_prompts": [1, 2]}})


def test_wandb_offline_run_holds_the_scalars_and_samples(sonnets_dataset, tmp_path):
    pytest.importorskip("wandb")
    logging = SAMPLING | dict(wandb=True, wandb_mode="offline", wandb_dir=str(tmp_path / "wb"))
    _run(sonnets_dataset, tmp_path / "run", logging=logging)
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    (records,) = run_dir.glob("*.wandb")
    data = records.read_bytes()
    for key in (b"train/loss", b"train/lr", b"samples", b"sample_every"):
        assert key in data, key


def test_wandb_without_the_package_names_the_extra(sonnets_dataset, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    hidden = lambda name: None if name == "wandb" else find_spec(name)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(ValueError, match=r"pip install 'threefold\[wandb\]'"):
        _config(sonnets_dataset, tmp_path, wandb=True)
