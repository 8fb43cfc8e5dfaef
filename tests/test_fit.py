"""A run that cannot fit in memory stops before any worker starts, naming the estimate and the limit."""

import pytest

from threefold.cli import main
from threefold.config import build_config
from threefold.plan import fit
from threefold.plan.memory_model import estimate_memory

HUGE = ["--model.hidden_size=300000", "--model.num_heads=4", "--model.num_kv_heads=2"]


def _config(*overrides):
    return build_config({}, list(overrides), check_paths=False)


def test_the_limit_is_the_host_memory_shared_by_the_processes_of_a_node():
    one, text = fit.process_memory_limit(_config("--training.device=cpu"), procs_per_node=1)
    four, _ = fit.process_memory_limit(_config("--training.device=cpu"), procs_per_node=4)
    assert four == pytest.approx(one / 4) and "host memory" in text


def test_a_config_that_fits_passes_and_one_that_does_not_is_refused(monkeypatch):
    config = _config()
    need = estimate_memory(config)["total"]
    monkeypatch.setattr(fit, "process_memory_limit", lambda c, procs_per_node: (need * 1.01, "limit"))
    fit.check_fits(config, procs_per_node=4)
    monkeypatch.setattr(fit, "process_memory_limit", lambda c, procs_per_node: (need * 0.99, "only X"))
    with pytest.raises(ValueError, match=r"needs about .* GiB \(parameters .*optimizer .*\).* but only X"):
        fit.check_fits(config, procs_per_node=4)


def test_train_refuses_a_huge_model_before_starting_workers(tmp_path, monkeypatch, capsys):
    import threefold.launch

    started = []
    monkeypatch.setattr(threefold.launch, "launch_local", lambda *a, **k: started.append(a) or 0)
    code = main(["train", *HUGE, f"--logging.out_dir={tmp_path / 'run'}", "--training.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and not started
    assert "does not fit in memory" in err and "model.hidden_size 300000" in err and "host memory" in err
    assert not (tmp_path / "run").exists()
