"""Config loading, overrides, presets and validation: every user error is a ValueError naming its values."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from threefold.cli import _load
from threefold.config import (
    DTYPE_NAMES,
    SECTIONS,
    Config,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
    build_config,
    check_world_size,
    describe_fields,
    load_config,
    validate,
)
from threefold.presets import MODEL_PRESETS

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def build(*overrides: str, raw: dict | None = None) -> Config:
    return build_config(raw or {}, list(overrides), check_paths=False)


# --- Impossible combinations and bad values --------------------------------------------------------


def test_world_size_mismatch_names_every_factor():
    config = build("--parallel.tp_size=2", "--parallel.pp_size=2", "--parallel.dp_size=2")
    message = r"world size \(6\) must equal .*tp_size \(2\).*pp_size \(2\).*dp_size \(2\) = 8"
    with pytest.raises(ValueError, match=message):
        check_world_size(config, 6)
    with pytest.raises(ValueError, match=message):
        validate(config, world_size=6, check_paths=False)
    validate(config, world_size=8, check_paths=False)  # the matching size passes


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # tp must divide the query heads: 32 heads over tp=3.
        (
            ["--model.preset=llama-1b", "--parallel.tp_size=3"],
            r"tp_size \(3\) must divide model\.num_heads \(32\)",
        ),
        # The 12 heads split over tp=4, but the 6 kv heads neither split over 4 ranks nor replicate evenly.
        (
            [
                "--model.hidden_size=96",
                "--model.num_heads=12",
                "--model.num_kv_heads=6",
                "--parallel.tp_size=4",
            ],
            r"tp_size \(4\) must divide model\.num_kv_heads \(6\) or be a multiple of it",
        ),
        # kv heads must divide the query heads (grouped-query attention).
        (
            ["--model.num_heads=4", "--model.num_kv_heads=3"],
            r"num_kv_heads \(3\) must divide model\.num_heads \(4\)",
        ),
        (
            ["--model.hidden_size=128", "--model.num_heads=6", "--model.num_kv_heads=6"],
            r"num_heads \(6\) must divide model\.hidden_size \(128\)",
        ),
        (
            [
                "--model.num_heads=4",
                "--model.num_kv_heads=4",
                "--model.ffn_hidden_size=390",
                "--parallel.tp_size=4",
            ],
            r"tp_size \(4\) must divide model\.ffn_hidden_size \(390\)",
        ),
        (
            ["--training.global_batch_size=10", "--training.micro_batch_size=2", "--parallel.dp_size=4"],
            r"global_batch_size \(10\) must be divisible by .*micro_batch_size \(2\) \* "
            r"parallel\.dp_size \(4\) = 8",
        ),
        (
            ["--training.global_batch_size=4294967296", "--training.micro_batch_size=1"],
            r"= 4294967296 micro-batches per step, more than the 65536 a step can schedule",
        ),
        (
            ["--parallel.sequence_parallel=true"],
            r"sequence_parallel needs parallel\.tp_size > 1 \(got tp_size = 1\)",
        ),
        (
            [
                "--parallel.sequence_parallel=true",
                "--parallel.tp_size=2",
                "--data.seq_len=127",
                "--model.num_kv_heads=4",
            ],
            r"tp_size \(2\) must divide data\.seq_len \(127\)",
        ),
        (
            ["--data.seq_len=512", "--model.max_seq_len=256"],
            r"data\.seq_len \(512\) exceeds model\.max_seq_len \(256\)",
        ),
        (
            ["--optimizer.lr=1e-4", "--optimizer.min_lr=1e-3"],
            r"min_lr \(0\.001\) must lie in \[0, optimizer\.lr \(0\.0001\)\]",
        ),
        (
            ["--model.num_layers=4", "--parallel.pp_size=8"],
            r"pp_size \(8\) exceeds model\.num_layers \(4\)",
        ),
        (
            ["--model.num_layers=4", "--parallel.pp_size=2", "--parallel.num_model_chunks=3"],
            r"pp_size \(2\) \* parallel\.num_model_chunks \(3\) exceeds model\.num_layers \(4\)",
        ),
        # schedules.check_schedule_args owns this rule (1f1b would first object to the two chunks).
        (
            ["--parallel.num_model_chunks=2", "--parallel.pipeline_schedule=interleaved"],
            r"parallel\.pipeline_schedule = 'interleaved': num_model_chunks \(2\) > 1 needs pp_size > 1",
        ),
        (
            ["--model.hidden_size=96", "--model.num_heads=32", "--model.num_kv_heads=32"],
            r"even head dim; hidden_size/num_heads = 3",
        ),
        (
            ["--optimizer.beta2=1.0"],
            r"betas must lie in \[0, 1\), got beta1=0\.9, beta2=1\.0",
        ),
        (
            ["--model.rope_scaling_factor=0.5"],
            r"model\.rope_scaling_factor must be >= 1 \(1 = no scaling\), got 0\.5",
        ),
        (
            [
                "--model.rope_scaling_factor=8",
                "--model.rope_low_freq_factor=4",
                "--model.rope_high_freq_factor=2",
            ],
            r"model\.rope_high_freq_factor \(2\.0\) must exceed model\.rope_low_freq_factor \(4\.0\) "
            r"when model\.rope_scaling_factor \(8\.0\) != 1",
        ),
        (
            ["--model.rope_scaling_factor=8", "--model.rope_low_freq_factor=-1"],
            r"model\.rope_low_freq_factor must be positive, got -1\.0",
        ),
        (
            ["--model.arch=gpt2", "--model.attention_bias=true"],
            r"model\.attention_bias applies to arch 'llama' only; model\.arch is 'gpt2'",
        ),
        (
            ["--reliability.straggler_threshold=0.5"],
            r"reliability\.straggler_threshold \(0\.5\) must exceed 1 .* or be 0 to disable the check",
        ),
        (
            ["--reliability.spike_factor=1"],
            r"reliability\.spike_factor \(1\.0\) must exceed 1 \(a ratio to the mean loss\)",
        ),
    ],
    ids=[
        "heads-not-divisible-by-tp",
        "kv-heads-not-divisible-by-tp",
        "kv-heads-not-dividing-heads",
        "heads-not-dividing-hidden",
        "ffn-not-divisible-by-tp",
        "global-batch-not-divisible",
        "too-many-microbatches",
        "sequence-parallel-without-tp",
        "sequence-parallel-seq-len",
        "seq-len-over-max",
        "min-lr-over-lr",
        "pp-over-layers",
        "pp-times-chunks-over-layers",
        "chunks-without-pp",
        "odd-rope-head-dim",
        "beta-out-of-range",
        "rope-scaling-below-one",
        "rope-high-freq-not-above-low",
        "rope-low-freq-negative",
        "attention-bias-on-gpt2",
        "straggler-threshold-at-most-one",
        "spike-factor-at-most-one",
    ],
)
def test_impossible_combination(overrides, message):
    with pytest.raises(ValueError, match=message):
        build(*overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["--model.preset=llama-1b", "--parallel.tp_size=16"],  # 8 kv heads, each on 2 ranks
        ["--model.num_heads=8", "--model.num_kv_heads=1", "--parallel.tp_size=4"],  # multi-query
        ["--model.num_heads=8", "--model.num_kv_heads=2", "--parallel.tp_size=8"],
    ],
    ids=["llama-1b-tp16", "multi-query-tp4", "kv2-tp8"],
)
def test_tp_over_the_kv_heads_is_valid(overrides):
    """tp_size may exceed num_kv_heads when it is a multiple of it: each kv head is then replicated."""
    build(*overrides)


def test_llama3_rope_scaling_and_qwen2_biases_are_valid():
    m = build("--model.rope_scaling_factor=8", "--model.attention_bias=true").model
    assert (m.rope_scaling_factor, m.rope_low_freq_factor, m.rope_high_freq_factor) == (8.0, 1.0, 4.0)
    assert m.rope_original_max_len == 8192 and m.attention_bias
    # Without scaling the frequency factors are unused, so any values pass.
    build("--model.rope_low_freq_factor=4", "--model.rope_high_freq_factor=1")


@pytest.mark.parametrize(
    ("override", "got"),
    [
        ("--model.vocab_size=0", "0"),
        ("--model.hidden_size=-128", "-128"),
        ("--model.num_layers=0", "0"),
        ("--model.num_heads=0", "0"),
        ("--model.num_kv_heads=0", "0"),
        ("--model.ffn_hidden_size=0", "0"),
        ("--model.max_seq_len=0", "0"),
        ("--model.rope_theta=0", "0.0"),
        ("--model.rope_original_max_len=0", "0"),
        ("--model.norm_eps=-1e-5", "-1e-05"),
        ("--parallel.tp_size=0", "0"),
        ("--parallel.pp_size=-1", "-1"),
        ("--parallel.dp_size=0", "0"),
        ("--parallel.num_model_chunks=0", "0"),
        ("--data.seq_len=0", "0"),
        ("--training.max_steps=0", "0"),
        ("--training.global_batch_size=-8", "-8"),
        ("--training.micro_batch_size=0", "0"),
        ("--training.eval_sequences=0", "0"),
        ("--logging.log_interval=0", "0"),
        ("--optimizer.decay_steps=0", "0"),
        ("--optimizer.eps=0", "0.0"),
        ("--checkpoint.keep_last=0", "0"),
        ("--reliability.straggler_intervals=0", "0"),
        ("--reliability.preemption_deadline=-1", "-1.0"),
        ("--reliability.max_consecutive_skips=0", "0"),
        ("--reliability.spike_window=0", "0"),
    ],
)
def test_zero_or_negative_size(override, got):
    name = override[2:].split("=")[0]
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} must be positive, got {re.escape(got)}$"):
        build(override)


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ("--optimizer.lr=-1e-3", "optimizer.lr"),
        ("--optimizer.warmup_steps=-1", "optimizer.warmup_steps"),
        ("--optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
        ("--optimizer.grad_clip=-1", "optimizer.grad_clip"),
        ("--training.eval_interval=-5", "training.eval_interval"),
        ("--training.max_minutes=-1", "training.max_minutes"),
        ("--training.gc_interval=-1", "training.gc_interval"),
        ("--parallel.dp_bucket_mb=-25", "parallel.dp_bucket_mb"),
        ("--model.init_std=-0.02", "model.init_std"),
        ("--checkpoint.interval=-1", "checkpoint.interval"),
        ("--reliability.watchdog_timeout=-1", "reliability.watchdog_timeout"),
        ("--reliability.straggler_threshold=-2", "reliability.straggler_threshold"),
    ],
)
def test_negative_amount(override, name):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} must be >= 0, got -"):
        build(override, "--optimizer.min_lr=0")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    "key",
    [
        "optimizer.grad_clip",
        "optimizer.lr",
        "model.rope_theta",
        "model.rope_scaling_factor",
        "training.max_minutes",
    ],
)
def test_non_finite_float(key, value):
    # NaN compares false with everything, so only an explicit check stops it.
    with pytest.raises(ValueError, match=rf"^{re.escape(key)} must be a finite number, got -?(nan|inf)$"):
        build(f"--{key}={value}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.preset=llama-70b", r"unknown model preset 'llama-70b'; known: tiny, gpt2-124m, llama-1b"),
        (
            "--training.dtype=float16",
            r"training\.dtype 'float16' is unknown; choose one of \('float32', 'bfloat16'\)",
        ),
        ("--training.dtype=bf16", r"training\.dtype 'bf16' is unknown"),
        ("--model.arch=mamba", r"model\.arch 'mamba' is unknown; choose one of \('llama', 'gpt2'\)"),
        ("--training.device=tpu", r"training\.device 'tpu' is unknown"),
        (
            "--training.attention_backend=triton",
            r"^training\.attention_backend 'triton' is unknown; choose one of \('auto', 'flash', ",
        ),
        (
            "--parallel.pipeline_schedule=zigzag",
            r"^parallel\.pipeline_schedule 'zigzag' is unknown; "
            r"choose one of \('gpipe', '1f1b', 'interleaved', 'zb-h1', 'zb-v'\)$",
        ),
    ],
)
def test_unknown_name(override, message):
    with pytest.raises(ValueError, match=message):
        build(override)
    # The same name from a file is rejected the same way.
    section, key = override[2:].split("=")[0].split(".")
    with pytest.raises(ValueError, match=message):
        build(raw={section: {key: override.split("=", 1)[1]}})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        (ModelConfig, "arch", "mamba"),
        (ParallelConfig, "pipeline_schedule", "zigzag"),
        (TrainingConfig, "dtype", "float16"),
        (TrainingConfig, "device", "tpu"),
        (TrainingConfig, "recompute", "some"),
        (TrainingConfig, "attention_backend", "triton"),
    ],
)
def test_unknown_name_in_a_config_built_in_python(section, key, value):
    # Loading rejects these before the dataclass exists; validate must catch a config built in code too.
    config = Config(**{section.section: section(**{key: value})})
    name = f"{section.section}.{key}"
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} '{value}' is unknown; choose one of \("):
        validate(config, check_paths=False)


def test_dtype_names_are_the_dtypes_train_maps():
    from threefold.train import DTYPES

    assert set(DTYPE_NAMES) == set(DTYPES)


def test_missing_data_path(tmp_path):
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(
        ValueError,
        match=rf"data\.path '{re.escape(str(missing))}' holds no prepared dataset \(no meta\.json\)",
    ):
        build_config({"data": {"path": str(missing)}})
    # An empty directory is not a dataset either.
    missing.mkdir()
    with pytest.raises(ValueError, match=r"holds no prepared dataset"):
        build_config({"data": {"path": str(missing)}})


def test_prepared_data_path_passes(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    config = build_config({"data": {"path": str(tmp_path)}})
    assert config.data.path == str(tmp_path)


def test_missing_data_path_passes_when_preparation_is_asked(tmp_path):
    raw = {"data": {"path": str(tmp_path / "later"), "prepare_shakespeare": True}}
    assert build_config(raw).data.prepare_shakespeare is True


# --- Unknown keys, types, syntax, files -----------------------------------------------------------


def test_unknown_section():
    with pytest.raises(ValueError, match=r"unknown config section \[trainer\]; known: model, parallel"):
        build(raw={"trainer": {"max_steps": 3}})
    with pytest.raises(ValueError, match=r"unknown config section 'trainer' in '--trainer\.max_steps=3'"):
        build("--trainer.max_steps=3")


def test_section_must_be_a_table():
    with pytest.raises(ValueError, match=r"\[model\] must be a table of key = value pairs, got 3"):
        build(raw={"model": 3})


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_head'\] in \[model\]; known: \["):
        build(raw={"model": {"num_head": 4}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['grad_acc_steps'\] in \[training\]"):
        build("--training.grad_acc_steps=4")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--training.max_steps=abc", r"^training\.max_steps = 'abc' is not a valid int$"),
        ("--training.max_steps=1.5", r"^training\.max_steps = '1\.5' is not a valid int$"),
        ("--optimizer.lr=fast", r"^optimizer\.lr = 'fast' is not a valid float$"),
        ("--training.compile=maybe", r"^training\.compile = 'maybe' is not a valid bool$"),
        ("--model.num_kv_heads=two", r"^model\.num_kv_heads = 'two' is not a valid int$"),
    ],
)
def test_wrong_type_from_override(override, message):
    with pytest.raises(ValueError, match=message):
        build(override)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"num_layers": 2.5}}, r"^model\.num_layers = 2\.5 is not a valid int$"),
        ({"model": {"num_layers": True}}, r"^model\.num_layers = True is not a valid int$"),
        ({"training": {"dtype": 16}}, r"^training\.dtype = 16 is not a valid str$"),
        ({"training": {"compile": 1}}, r"^training\.compile = 1 is not a valid bool$"),
        ({"optimizer": {"lr": [1e-3]}}, r"^optimizer\.lr = \[0\.001\] is not a valid float$"),
    ],
)
def test_wrong_type_from_toml(raw, message):
    with pytest.raises(ValueError, match=message):
        build(raw=raw)


@pytest.mark.parametrize(
    "arg",
    ["--training.max_steps", "training.max_steps=3", "--max_steps=3", "-training.max_steps=3"],
)
def test_bad_override_syntax(arg):
    with pytest.raises(
        ValueError, match=rf"^override '{re.escape(arg)}' must look like --section\.key=value$"
    ):
        build(arg)


@pytest.mark.parametrize(
    ("key", "text", "value", "message"),
    [
        (
            "max_steps",
            "5",
            5,
            r"^training\.max_steps = '5' is not a valid int \(write the int without quotes\)$",
        ),
        (
            "max_minutes",
            "1.5",
            1.5,
            r"^training\.max_minutes = '1\.5' is not a valid float \(write the float ",
        ),
        (
            "compile",
            "true",
            True,
            r"^training\.compile = 'true' is not a valid bool \(write the bool without ",
        ),
    ],
)
def test_quoted_value_in_toml_file_is_rejected(tmp_path, key, text, value, message):
    path = tmp_path / "run.toml"
    path.write_text(f'[training]\n{key} = "{text}"\n')
    with pytest.raises(ValueError, match=message):
        load_config(path, check_paths=False)
    # Override text is always a string, so there it is parsed.
    assert getattr(build(f"--training.{key}={text}").training, key) == value


def test_quoted_number_for_optional_key_in_toml_file_is_rejected(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optimizer]\ndecay_steps = "50"\n')
    with pytest.raises(ValueError, match=r"^optimizer\.decay_steps = '50' is not a valid int \(write "):
        load_config(path, check_paths=False)
    # TOML has no null: "none" is how a file empties an optional key.
    path.write_text('[model]\npreset = "tiny"\nnum_kv_heads = "none"\n')
    assert load_config(path, check_paths=False).model.num_kv_heads == MODEL_PRESETS["tiny"]["num_heads"]


def test_every_field_round_trips_through_file_and_override():
    """Each field's type is one loading knows: its value read back from a file and from override text."""
    default = Config().to_dict()
    assert build(raw=default).to_dict() == default
    texts = [
        f"--{section}.{key}={'none' if value is None else value}"
        for section, values in default.items()
        for key, value in values.items()
    ]
    assert build(*texts).to_dict() == default


def test_invalid_toml_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\npreset = tiny\n")
    with pytest.raises(ValueError, match=rf"config file '{re.escape(str(path))}' is not valid TOML: "):
        load_config(path, check_paths=False)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ValueError, match=rf"config file '{re.escape(str(path))}' does not exist"):
        load_config(path, check_paths=False)


# --- Presets and overrides ------------------------------------------------------------------------


def model_shape(config: Config) -> dict:
    m = config.model
    return dict(
        arch=m.arch,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        vocab_size=m.vocab_size,
        tie_embeddings=m.tie_embeddings,
    )


def test_llama_1b_preset_matches_benchmarks():
    config = build("--model.preset=llama-1b", "--data.seq_len=2048")
    assert model_shape(config) == dict(
        arch="llama",
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=8192,
        vocab_size=128256,
        tie_embeddings=False,
    )
    assert config.model.rope_theta == 5e5
    assert config.model.max_seq_len >= 2048


def test_llama_8b_preset_matches_benchmarks():
    config = build("--model.preset=llama-8b", "--data.seq_len=4096")
    assert model_shape(config) == dict(
        arch="llama",
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        ffn_hidden_size=14336,
        vocab_size=128256,
        tie_embeddings=False,
    )
    assert config.model.rope_theta == 5e5
    assert config.model.max_seq_len >= 4096


def test_gpt2_124m_preset():
    config = build("--model.preset=gpt2-124m")
    assert model_shape(config) == dict(
        arch="gpt2",
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        ffn_hidden_size=3072,
        vocab_size=50257,
        tie_embeddings=True,
    )
    assert config.model.max_seq_len == 1024


# SYSTEM.md, the paper's weak-scaling family: (preset, heads, hidden, layers).
PAPER_FAMILY = [
    ("gpt3-1.7b", 24, 2304, 24),
    ("gpt3-3.6b", 32, 3072, 30),
    ("gpt3-7.5b", 32, 4096, 36),
    ("gpt3-18b", 48, 6144, 40),
    ("gpt3-39b", 64, 8192, 48),
    ("gpt3-76b", 80, 10240, 60),
    ("gpt3-145b", 96, 12288, 80),
    ("gpt3-310b", 128, 16384, 96),
    ("gpt3-530b", 128, 20480, 105),
    ("gpt3-1t", 160, 25600, 128),
]


@pytest.mark.parametrize(("name", "heads", "hidden", "layers"), PAPER_FAMILY)
def test_paper_family_preset(name, heads, hidden, layers):
    config = build(f"--model.preset={name}", "--data.seq_len=2048")
    assert model_shape(config) == dict(
        arch="gpt2",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        ffn_hidden_size=4 * hidden,
        vocab_size=51200,
        tie_embeddings=True,
    )
    assert config.model.max_seq_len == 2048


def test_every_preset_is_listed_and_valid():
    expected = {"tiny", "gpt2-124m", "llama-1b", "llama-8b", *(row[0] for row in PAPER_FAMILY)}
    assert set(MODEL_PRESETS) == expected
    for name in MODEL_PRESETS:
        assert build(f"--model.preset={name}").model.preset == name


def test_override_wins_over_preset():
    raw = {"model": {"preset": "llama-1b", "num_layers": 4}}
    config = build("--model.hidden_size=1024", raw=raw)
    assert config.model.hidden_size == 1024  # override on the command line
    assert config.model.num_layers == 4  # key next to the preset in the file
    assert config.model.num_heads == 32  # untouched keys keep the preset's value
    assert config.model.vocab_size == 128256


def test_override_wins_over_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "tiny"\n\n[training]\nmax_steps = 10\n')
    config = load_config(path, ["--training.max_steps=20", "--model.preset=gpt2-124m"], check_paths=False)
    assert config.training.max_steps == 20
    assert config.model.hidden_size == 768


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("--training.compile=true", "training", "compile", True),
        ("--training.compile=True", "training", "compile", True),
        ("--training.compile=yes", "training", "compile", True),
        ("--training.compile=1", "training", "compile", True),
        ("--logging.plot=false", "logging", "plot", False),
        ("--logging.plot=off", "logging", "plot", False),
        ("--logging.plot=0", "logging", "plot", False),
        ("--training.max_steps=7", "training", "max_steps", 7),
        ("--optimizer.lr=1e-3", "optimizer", "lr", 1e-3),
        ("--optimizer.grad_clip=2", "optimizer", "grad_clip", 2.0),
        ("--optimizer.decay_steps=none", "optimizer", "decay_steps", None),
        ("--optimizer.decay_steps=50", "optimizer", "decay_steps", 50),
        ("--model.preset=None", "model", "preset", None),
        ("--data.path=elsewhere/data", "data", "path", "elsewhere/data"),
    ],
)
def test_override_coerces_type(override, section, key, expected):
    value = getattr(getattr(build(override), section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_none_kv_heads_means_multi_head_attention():
    config = build("--model.num_heads=8", "--model.num_kv_heads=none")
    assert config.model.num_kv_heads == 8


def test_toml_integer_for_float_field_becomes_float():
    config = build(raw={"model": {"rope_theta": 500000}})
    assert config.model.rope_theta == 5e5
    assert isinstance(config.model.rope_theta, float)


# --- The packaged default, the example configs, the reference -------------------------------------


def test_packaged_default_is_the_tiny_tp2_dp2_demo():
    config = _load(None, [], check_paths=False)
    validate(config, world_size=4, check_paths=False)
    assert config.model.preset == "tiny"
    assert config.model.hidden_size == MODEL_PRESETS["tiny"]["hidden_size"]
    assert (config.parallel.tp_size, config.parallel.pp_size, config.parallel.dp_size) == (2, 1, 2)
    assert config.world_size == 4
    assert config.training.device == "cpu"
    assert config.data.prepare_shakespeare is True
    ckpt = config.checkpoint  # only the final checkpoint, inside the demo's own directory
    assert (ckpt.dir, ckpt.interval, ckpt.keep_last) == (f"{config.logging.out_dir}/ckpt", 0, 1)


def test_example_configs_load_and_validate():
    paths = sorted(CONFIGS_DIR.glob("*.toml"))
    names = {p.name for p in paths}
    assert {"tiny-cpu.toml", "gpt2-124m.toml", "llama-1b-h100.toml"} <= names
    for path in paths:
        config = load_config(path, check_paths=False)
        validate(config, world_size=config.world_size, check_paths=False)


def test_tiny_cpu_example_equals_packaged_default():
    example = load_config(CONFIGS_DIR / "tiny-cpu.toml", check_paths=False)
    assert example.to_dict() == _load(None, [], check_paths=False).to_dict()


def test_llama_1b_h100_example_is_the_benchmark():
    config = load_config(CONFIGS_DIR / "llama-1b-h100.toml", check_paths=False)
    assert config.model.preset == "llama-1b"
    assert config.data.seq_len == 2048
    assert config.training.dtype == "bfloat16"
    assert (config.training.micro_batch_size, config.training.global_batch_size) == (4, 4)
    assert config.world_size == 1
    assert config.training.device == "cuda" and config.training.compile


def test_describe_fields_mentions_every_field():
    reference = describe_fields()
    for section, cls in SECTIONS.items():
        assert f"[{section}]" in reference
        for f in dataclasses.fields(cls):
            line = next((x for x in reference.splitlines() if x.startswith(f"  {f.name} = ")), None)
            assert line is not None, f"{section}.{f.name} missing from the reference"
            assert line.split("  # ", 1)[1].strip(), f"{section}.{f.name} has no description"


PIPELINE = ("--model.num_layers=8", "--training.global_batch_size=16", "--training.micro_batch_size=2")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("--parallel.pp_size=4", "--parallel.num_model_chunks=2"),
         r"1f1b schedule runs one model chunk per rank \(num_model_chunks = 2\)"),
        (("--parallel.pp_size=4", "--parallel.num_model_chunks=2", "--parallel.pipeline_schedule=interleaved",
          "--training.global_batch_size=12"),
         r"needs num_microbatches \(6\) to be a multiple of pp_size \(4\)"),
        (("--parallel.pp_size=2", "--parallel.pipeline_schedule=zigzag"),
         r"parallel.pipeline_schedule 'zigzag' is unknown"),
        (("--parallel.pp_size=4", "--parallel.num_model_chunks=4"),
         r"parallel.pp_size \(4\) \* parallel.num_model_chunks \(4\) exceeds model.num_layers \(8\)"),
        (("--parallel.pp_size=9",), r"parallel.pp_size \(9\) exceeds model.num_layers \(8\)"),
        (("--training.recompute=some",), r"training.recompute 'some' is unknown"),
        (("--parallel.dp_size=4", "--training.eval_sequences=3"),
         r"training.eval_sequences \(3\) must be at least parallel.dp_size \(4\)"),
        (("--training.eval_batches=3",),
         r"training.eval_batches was replaced by training.eval_sequences"),
    ],
)  # fmt: skip
def test_bad_pipeline_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        build(*PIPELINE, *overrides)


def test_good_pipeline_settings():
    config = build(*PIPELINE, "--parallel.pp_size=4", "--parallel.num_model_chunks=2",
                   "--parallel.pipeline_schedule=interleaved", "--training.recompute=selective")  # fmt: skip
    assert config.num_microbatches == 8 and config.world_size == 4


def test_readme_holds_the_current_config_reference():
    """The README's reference block is `threefold config --reference` verbatim (regenerate it when a key
    changes)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert describe_fields().rstrip("\n") in readme
