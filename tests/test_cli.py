"""The `threefold` command line: errors, help, `config`, `schedule`. Training itself is tested elsewhere."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import threefold.launch
from threefold.cli import main
from threefold.commands.args import load_run_config, split_overrides
from threefold.commands.toml_writer import toml_value
from threefold.config import describe_fields, load_config

COMMANDS = ["train", "bench", "data", "config", "schedule", "plan", "import-hf", "export-hf", "checkpoint",
            "generate", "eval"]  # fmt: skip


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """These tests must fail before any worker starts: outside torchrun, and with launching forbidden."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("a CLI test reached launch_local: the config was accepted")

    monkeypatch.setattr(threefold.launch, "launch_local", forbidden)


def error_of(capsys, argv: list[str]) -> str:
    """Run the CLI, expect exit status 2, return the single error line from stderr."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("threefold: error: "), err
    return err.strip()


def test_train_rejects_tp_not_dividing_heads(capsys):
    # The packaged demo has 4 heads and 2 kv heads.
    err = error_of(capsys, ["train", "--parallel.tp_size=3"])
    assert err == "threefold: error: parallel.tp_size (3) must divide model.num_heads (4)"


def test_train_rejects_tp_not_dividing_kv_heads(capsys):
    # tp 4 on 2 kv heads now shares each head over 2 ranks; 6 kv heads over tp 4 cannot be split either way.
    model = ["--model.num_heads=12", "--model.num_kv_heads=6", "--model.hidden_size=192"]
    err = error_of(capsys, ["train", "--parallel.tp_size=4", "--parallel.dp_size=1", *model])
    assert err.startswith(
        "threefold: error: parallel.tp_size (4) must divide model.num_kv_heads (6) or be a multiple"
    )


@pytest.mark.parametrize("nproc", [["--nproc", "3"], ["--nproc=3"]])
def test_train_rejects_nproc_not_matching_world(capsys, nproc):
    err = error_of(capsys, ["train", *nproc])
    assert "world size (3)" in err
    assert "tp_size (2)" in err and "dp_size (2)" in err and "= 4" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--nproc", "zero"], "--nproc must be a positive integer, got 'zero'"),
        (["train", "--nproc"], "--nproc expected one argument"),
        (["train", "a.toml", "b.toml"], "unexpected argument 'b.toml': one config file at most"),
        (["train", "--training.max_steps=abc"], "training.max_steps = 'abc' is not a valid int"),
        (["train", "--training.max_steps", "abc"], "training.max_steps = 'abc' is not a valid int"),
        (["train", "--training.steps=3"], "unknown key(s) ['steps'] in [training]"),
        (["train", "--training.max_steps"], "override '--training.max_steps' has no value"),
        (["train", "--training.max_steps", "--nproc", "2"], "'--training.max_steps' has no value"),
        (["train", "--nope.key=1"], "unknown config section 'nope'"),
        (["train", "--verbose"], "unknown option '--verbose': overrides look like --section.key=value"),
        (["train", "--layout", "fastest"], "--layout 'fastest' is unknown; the only choice is 'auto'"),
        (["bench", "--step", "3"], "unknown option '--step'"),  # no abbreviations of --steps
        (["bench", "--steps", "0"], "--steps must be a positive integer, got '0'"),
        (["bench", "--warmup=-1"], "--warmup must be a non-negative integer, got '-1'"),
        (["bench", "--tokens", "random"], "--tokens must be 'synthetic' or 'real', got 'random'"),
        (["config", "--model.preset=nope"], "unknown model preset 'nope'"),
        (["config", "--reference", "--model.preset=tiny"], "--reference prints every key"),
        (["schedule", "stray"], "unrecognized arguments: stray"),
        (
            ["schedule", "--pp=2", "--training.max_steps=3"],
            "takes no config overrides: --training.max_steps=3",
        ),
        (["checkpoint"], "the following arguments are required: ACTION"),
    ],
)
def test_bad_arguments_name_the_problem(capsys, argv, expected):
    assert expected in error_of(capsys, argv)


def test_missing_config_file(capsys, tmp_path):
    path = tmp_path / "absent.toml"
    err = error_of(capsys, ["train", str(path)])
    assert err == f"threefold: error: config file {str(path)!r} does not exist"


def test_missing_dataset(capsys, tmp_path):
    path = tmp_path / "empty"
    err = error_of(capsys, ["train", f"--data.path={path}", "--data.prepare_shakespeare=false"])
    assert f"data.path {str(path)!r} holds no prepared dataset" in err


def test_config_reference(capsys):
    assert main(["config", "--reference"]) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == describe_fields().strip()
    assert "[parallel]" in out and "tp_size" in out


def test_config_prints_resolved_toml(capsys):
    assert main(["config", "--model.preset=llama-1b"]) == 0
    resolved = tomllib.loads(capsys.readouterr().out)
    assert resolved["model"]["hidden_size"] == 2048
    assert resolved["model"]["num_kv_heads"] == 8
    assert resolved["parallel"]["tp_size"] == 2  # the rest comes from the packaged default
    assert "decay_steps" not in resolved["optimizer"]  # None: TOML has no null, the default stands


def test_config_reads_a_file(capsys, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "gpt2-124m"\n\n[parallel]\ntp_size = 1\ndp_size = 1\n')
    assert main(["config", str(path), "--training.max_steps=5"]) == 0
    resolved = tomllib.loads(capsys.readouterr().out)
    assert resolved["model"]["arch"] == "gpt2"
    assert resolved["training"]["max_steps"] == 5


ODD_PATH = 'runs/a "quoted" \\ dir\twith tab, é and \x7f'


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["--model.preset=llama-1b", "--optimizer.lr=1e-05", "--optimizer.min_lr=1e-06",
         "--optimizer.decay_steps=500"],
        ["--model.preset=gpt2-124m", "--parallel.tp_size=1", "--training.max_minutes=0.25",
         f"--logging.out_dir={ODD_PATH}", "--checkpoint.load=ckpt/x", "--model.tie_embeddings=true"],
    ],
)  # fmt: skip
def test_config_toml_round_trip(capsys, tmp_path, overrides):
    """What `threefold config` prints, saved as a file, loads back as the same Config."""
    assert main(["config", *overrides]) == 0
    saved = tmp_path / "resolved.toml"
    saved.write_text(capsys.readouterr().out)
    expected = load_run_config(None, overrides, check_paths=False)
    assert load_config(saved, check_paths=False) == expected
    assert main(["config", str(saved)]) == 0  # and printing it again changes nothing but the header
    again = capsys.readouterr().out
    assert again.split("\n", 1)[1] == saved.read_text().split("\n", 1)[1]


@pytest.mark.parametrize(
    "value",
    [0, -3, 1e-05, 3.0, 1e16, -2.5e-300, float("inf"), True, False, "", 'a"b\\c\n\x00\x1f\x7f é', [1, "x"]],
)
def test_toml_values_read_back_exactly(value):
    assert tomllib.loads(f"x = {toml_value(value)}")["x"] == value


def test_toml_writer_refuses_what_toml_cannot_hold():
    with pytest.raises(TypeError, match="cannot write"):
        toml_value({"nested": 1})


def test_space_separated_overrides(capsys, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "gpt2-124m"\n')
    for argv in (
        ["config", str(path), "--training.max_steps", "7", "--optimizer.lr", "1e-3"],
        ["config", "--training.max_steps", "7", str(path), "--optimizer.lr=1e-3"],  # the file after them
    ):
        assert main(argv) == 0
        resolved = tomllib.loads(capsys.readouterr().out)
        assert resolved["model"]["arch"] == "gpt2"
        assert (resolved["training"]["max_steps"], resolved["optimizer"]["lr"]) == (7, 1e-3)


def test_a_bare_value_never_becomes_the_config_path(capsys):
    # argparse alone would read '7' as CONFIG here and look for a file named '7'.
    assert main(["config", "--training.max_steps", "7"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["training"]["max_steps"] == 7


def test_split_overrides():
    argv = ["train", "run.toml", "--a.b", "-1e-3", "--c.d=x", "--nproc", "2", "--e.f", "g h", "--g.h=i=j"]
    rest, overrides = split_overrides(argv)
    assert rest == ["train", "run.toml", "--nproc", "2"]
    assert overrides == ["--a.b=-1e-3", "--c.d=x", "--e.f=g h", "--g.h=i=j"]


def test_a_stray_word_after_the_config_is_rejected(capsys, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("")
    err = error_of(capsys, ["config", str(path), "--training.max_steps=3", "extra"])
    assert f"unexpected argument 'extra': one config file at most ({str(path)!r} is the config)" in err
    assert "see 'threefold config --help'" in err


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help(capsys, flag):
    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: threefold")
    assert all(f"\n    {name}" in out for name in COMMANDS), out


def test_bare_threefold_prints_help_and_launches_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the old behaviour, the demo, would prepare data here before launching
    assert main([]) == 0  # launching would hit the no_launch fixture's AssertionError
    out = capsys.readouterr().out
    assert out.startswith("usage: threefold") and "train" in out and "threefold COMMAND --help" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        (["train"], ["CONFIG.toml", "--nproc", "--layout", "--section.key=value", "--section.key value"]),
        (["bench"], ["CONFIG.toml", "--nproc", "--steps", "--warmup", "--tokens", "--json-out"]),
        (["data", "prepare"], ["INPUT", "--out", "--shakespeare", "--tokenizer", "--val-fraction"]),
        (["config"], ["CONFIG.toml", "--reference", "--section.key=value"]),
        (["schedule"], ["--pp", "--v", "--microbatches", "--schedule", "--forward-cost"]),
        (["plan"], ["--model", "--gpus", "--gpu", "--global-batch", "--seq", "--calibrate", "--json"]),
        (["import-hf"], ["hf_dir", "out_dir"]),
        (["export-hf"], ["checkpoint", "out_dir", "--dtype", "--max-shard-gb"]),
        (["checkpoint", "convert"], ["src", "dst"]),
        (
            ["generate"],
            ["checkpoint", "--prompt", "--prompt-file", "--max-new-tokens", "--temperature", "--top-p"],
        ),
        (["eval"], ["checkpoint", "--data", "--split", "--seq-len", "--batches", "--json"]),
        (["data"], ["prepare"]),
        (["checkpoint"], ["convert"]),
    ],
)
def test_each_command_has_its_own_help(capsys, argv, options):
    assert main([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: threefold {' '.join(argv)}"), out
    missing = [o for o in options if o not in out]
    assert not missing, out


def test_help_command_shows_a_commands_help(capsys):
    assert main(["help", "schedule"]) == 0
    assert capsys.readouterr().out.startswith("usage: threefold schedule")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"threefold {metadata.version('threefold')}"


def test_unknown_command_names_it_and_lists_the_commands(capsys):
    assert main(["fly"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("threefold: error: unknown command 'fly'; the commands are: train, bench")
    assert all(name in err for name in COMMANDS)


def test_python_dash_m_threefold(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "threefold", "config", "--model.preset", "tiny"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    resolved = tomllib.loads(result.stdout)
    assert resolved["model"]["preset"] == "tiny"
    assert resolved["model"]["hidden_size"] == 128


def test_world_from_env_reads_the_local_world_size(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    world = threefold.launch.world_from_env()
    assert world is not None and (world.rank, world.world_size, world.local_world_size) == (5, 8, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    world = threefold.launch.world_from_env()
    assert world is not None and world.local_world_size == 4


def test_only_launch_reads_the_launchers_environment():
    package = Path(threefold.launch.__file__).parent
    readers = sorted(
        str(p.relative_to(package)) for p in package.rglob("*.py") if "LOCAL_WORLD_SIZE" in p.read_text()
    )
    assert readers == ["launch.py"]


def test_schedule_command_prints_timeline_and_bubble(capsys):
    assert main(["schedule", "--pp", "4", "--v", "2", "-m", "8"]) == 0
    out = capsys.readouterr().out
    assert "F0.0" in out and "B7.7" in out
    assert "bubble fraction: 0.1875 (simulated), 0.1875 = (p-1)/(v*m)" in out


def test_schedule_command_rejects_impossible_counts(capsys):
    assert main(["schedule", "--pp", "4", "--v", "2", "-m", "6"]) == 2
    assert "num_microbatches (6) to be a multiple of pp_size (4)" in capsys.readouterr().err
