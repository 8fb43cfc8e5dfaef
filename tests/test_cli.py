"""The `threefold` command line: errors, `config`, help. Training itself is tested elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import threefold.launch
from threefold.cli import main
from threefold.config import describe_fields


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
    err = error_of(capsys, ["train", "--parallel.tp_size=4", "--parallel.dp_size=1"])
    assert err == "threefold: error: parallel.tp_size (4) must divide model.num_kv_heads (2)"


@pytest.mark.parametrize("nproc", [["--nproc", "3"], ["--nproc=3"]])
def test_train_rejects_nproc_not_matching_world(capsys, nproc):
    err = error_of(capsys, ["train", *nproc])
    assert "world size (3)" in err
    assert "tp_size (2)" in err and "dp_size (2)" in err and "= 4" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "--nproc", "zero"], "--nproc must be a positive integer, got 'zero'"),
        (["train", "--nproc"], "--nproc needs a number"),
        (["train", "a.toml", "b.toml"], "unexpected argument 'b.toml'"),
        (["train", "--training.max_steps=abc"], "training.max_steps = 'abc' is not a valid int"),
        (["train", "--training.steps=3"], "unknown key(s) ['steps'] in [training]"),
        (["train", "--training.max_steps"], "must look like --section.key=value"),
        (["config", "--model.preset=nope"], "unknown model preset 'nope'"),
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


def test_config_prints_resolved_json(capsys):
    assert main(["config", "--model.preset=llama-1b"]) == 0
    out, _ = capsys.readouterr()
    resolved = json.loads(out)
    assert resolved["model"]["hidden_size"] == 2048
    assert resolved["model"]["num_kv_heads"] == 8
    assert resolved["parallel"]["tp_size"] == 2  # the rest comes from the packaged default


def test_config_reads_a_file(capsys, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "gpt2-124m"\n\n[parallel]\ntp_size = 1\ndp_size = 1\n')
    assert main(["config", str(path), "--training.max_steps=5"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["model"]["arch"] == "gpt2"
    assert resolved["training"]["max_steps"] == 5


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help(capsys, flag):
    assert main([flag]) == 0
    assert "usage: threefold train" in capsys.readouterr().out


def test_unknown_command_prints_usage(capsys):
    assert main(["fly"]) == 2
    assert "usage: threefold" in capsys.readouterr().err


def test_python_dash_m_threefold(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "threefold", "config", "--model.preset=tiny"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["model"]["preset"] == "tiny"
    assert resolved["model"]["hidden_size"] == 128


def test_schedule_command_prints_timeline_and_bubble(capsys):
    assert main(["schedule", "--pp", "4", "--v", "2", "-m", "8"]) == 0
    out = capsys.readouterr().out
    assert "F0.0" in out and "B7.7" in out
    assert "bubble fraction: 0.1875 (simulated), 0.1875 = (p-1)/(v*m)" in out


def test_schedule_command_rejects_impossible_counts(capsys):
    assert main(["schedule", "--pp", "4", "--v", "2", "-m", "6"]) == 2
    assert "num_microbatches (6) to be a multiple of pp_size (4)" in capsys.readouterr().err
