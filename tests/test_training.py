"""Gradient synchronization, the optimizer, bf16 training, the schedule and the loop's cadence."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import nn

from threefold.config import OptimizerConfig
from threefold.optim import Optimizer, lr_at
from threefold.parallel.data_parallel import GradSync
from threefold.parallel.mesh import build_mesh


def _sync_once_per_step(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    group = dist.group.WORLD
    sync = GradSync(list(model.parameters()), dp_group=group, bucket_mb=16 * 4 / 2**20)  # several buckets
    launches = []
    original = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        launches.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        torch.manual_seed(10 + rank)  # each dp rank sees different data
        inputs = [torch.randn(3, 8) for _ in range(3)]
        launched_before_finish = []
        for i, x in enumerate(inputs):
            sync.sync_this_backward = i == len(inputs) - 1
            (model(x).square().mean() / len(inputs)).backward()
            launched_before_finish.append(len(launches))
        pending = [b.handle is not None for b in sync.buckets]
        sync.finish()
    finally:
        dist.all_reduce = original
    grads = {name: p.main_grad.clone() for name, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters()), "compute-dtype grads are freed after accumulation"
    return {
        "launches": launched_before_finish,
        "pending": pending,
        "buckets": len(sync.buckets),
        "grads": grads,
        "inputs": inputs,
    }


def test_grad_sync_accumulates_then_averages_once_per_step():
    results = run_ranks(2, _sync_once_per_step)
    for r in results:
        assert r["buckets"] >= 2
        # No communication for the first micro-batches; every bucket launched inside the last backward.
        assert r["launches"][:-1] == [0, 0]
        assert r["launches"][-1] == r["buckets"]
        assert all(r["pending"]), "all-reduces were launched during backward, before finish()"
    # Reference: one process, the union of both ranks' micro-batches, mean over ranks.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    for r in results:
        for x in r["inputs"]:
            (model(x).square().mean() / (len(r["inputs"]) * len(results))).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(results[0]["grads"][name], p.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(results[1]["grads"][name], p.grad, rtol=1e-5, atol=1e-7)


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 20) == pytest.approx(1.0)
    assert lr_at(12, cfg, 20) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, cfg, 20) == pytest.approx(0.1)
    assert lr_at(500, cfg, 20) == pytest.approx(0.1)
    values = [lr_at(s, cfg, 20) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False)), "cosine decay is monotone"


def _bf16_optimizer(rank: int, world: int) -> dict:
    mesh = build_mesh(1, 1, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    sync = GradSync(list(model.parameters()), dp_group=mesh.dp_group, bucket_mb=1)
    opt = Optimizer(
        sync.owned_ranges(),
        OptimizerConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, grad_clip=1e-3),
        mesh=mesh,
        max_steps=10,
    )
    before = [m.detach().clone() for m in opt.masters]
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    norm, lr = opt.step(0)
    decays = {id(p): g["weight_decay"] for g in opt.adam.param_groups for p in g["params"]}
    return {
        "master_dtypes": [m.dtype for m in opt.masters],
        "param_dtypes": [p.dtype for p in opt.params],
        "synced": all(
            torch.equal(p.detach().view(-1), m.detach().to(p.dtype))
            for p, m in zip(opt.params, opt.masters, strict=True)
        ),
        "moved": [not torch.equal(b, m.detach()) for b, m in zip(before, opt.masters, strict=True)],
        "decay": [decays[id(m)] for m in opt.masters],
        "ndims": [p.ndim for p in opt.params],
        "norm": float(norm),
        "lr": lr,
    }


def test_bf16_keeps_fp32_masters_and_skips_decay_on_norms_and_biases():
    r = run_ranks(1, _bf16_optimizer)[0]
    assert r["param_dtypes"] == [torch.bfloat16] * 4
    assert r["master_dtypes"] == [torch.float32] * 4
    assert r["synced"] and all(r["moved"])
    assert r["decay"] == [0.5 if nd >= 2 else 0.0 for nd in r["ndims"]]
    assert r["norm"] > 1e-3  # clipping was active, yet Adam still moved every parameter
    assert r["lr"] == 0.1


def _zero_gather_overlaps_forward(rank: int, world: int, data: str) -> dict:
    from threefold.bench import synthetic_steps
    from threefold.config import build_config
    from threefold.train import build, train_step

    config = build_config(
        {
            "model": dict(preset="tiny", num_layers=2, vocab_size=1000),
            "parallel": dict(dp_size=2, zero=True, dp_bucket_mb=0.05),  # several buckets
            "data": dict(path=data, seq_len=16),
            "training": dict(global_batch_size=4, micro_batch_size=2, device="cpu"),
        }
    )
    mesh = build_mesh(1, 2, 1)
    trainer = build(config, mesh, torch.device("cpu"))
    (sync,) = trainer.grad_syncs.values()
    batches = synthetic_steps(config, mesh, torch.device("cpu"), 2)
    train_step(trainer, batches[0], 0)
    pending_after_step = sum(b.gather is not None for b in sync.buckets)
    chunk = trainer.chunks[0]
    with torch.no_grad():
        chunk(batches[1][0][0], batches[1][0][1])  # the forward waits for each layer's buckets
    return {"buckets": len(sync.buckets), "pending": pending_after_step,
            "left": sum(b.gather is not None for b in sync.buckets)}  # fmt: skip


def test_zero_parameter_gather_runs_in_the_background_until_the_forward_needs_it(sonnets_dataset):
    r = run_ranks(2, _zero_gather_overlaps_forward, str(sonnets_dataset))[0]
    assert r["buckets"] > 2
    assert r["pending"] == r["buckets"], "the step returns with every all-gather still in flight"
    assert r["left"] == 0, "the forward waited for every bucket it read"


def test_cadence_says_when_each_duty_of_the_loop_is_due():
    from threefold.config import build_config
    from threefold.train import Cadence

    def cadence(**sections) -> Cadence:
        raw = {"model": {"preset": "tiny"}, "training": {"max_steps": 10}} | sections
        return Cadence(build_config(raw, check_paths=False))

    def due(duty: str, c: Cadence, stop_after: int | None = None) -> list[int]:
        """Steps (1-based) after which `duty` runs, in a run that stops early after `stop_after` if given."""
        final = stop_after or 10
        return [done for done in range(1, final + 1) if getattr(c, duty)(done, end=done == final)]

    c = cadence(logging={"log_interval": 4}, training={"max_steps": 10, "eval_interval": 3})
    assert due("log", c) == [4, 8, 10]
    assert due("evaluate", c) == [3, 6, 9, 10]
    assert due("evaluate", c, stop_after=5) == [3, 5]
    assert due("save", c) == [], "no checkpoint.dir: never saved"
    assert due("evaluate", cadence(training={"max_steps": 10, "eval_interval": 0})) == []
    assert due("save", cadence(checkpoint={"dir": "ckpt"})) == [10], "interval 0: only at the end"
    assert due("save", cadence(checkpoint={"dir": "ckpt", "interval": 4}), stop_after=7) == [4, 7]
    assert [c.last(done) for done in (9, 10)] == [False, True]
    late = sorted(set(due("log", c)) & set(due("log_late", c)))
    assert late == [4, 8], "the logs read late: not the one at the end"
    c = cadence(logging={"log_interval": 1}, training={"max_steps": 10, "eval_interval": 3})
    assert due("log_late", c) == [1, 2, 4, 5, 7, 8], "read at once before an evaluation and at the end"
    assert due("log_late", cadence(reliability={"spike_rollback": True})) == []
    assert not c.out_of_time(started=0.0), "no time limit by default"


def _when_steps_are_read(rank: int, world: int, config, queue_ahead: tuple[str, ...]) -> dict:
    """Train with train_step and PendingStats.read recorded, with `queue_ahead` as the device types whose work
    the host queues ahead (the CPU's is not, but here it stands in for CUDA): for each step read on the
    host, how many steps had been queued by then."""
    import threefold.train as train_module
    from threefold.train import train

    queued, read_after = [0], {}
    step_fn, read_fn = train_module.train_step, train_module.PendingStats.read

    def counting_step(*args, **kwargs):
        queued[0] += 1
        return step_fn(*args, **kwargs)

    def recording_read(self):
        read_after[self.step] = queued[0]
        return read_fn(self)

    train_module.train_step = counting_step
    train_module.PendingStats.read = recording_read
    train_module.QUEUED_DEVICES = queue_ahead
    result = train(config, build_mesh(1, 1, 1), torch.device("cpu"))
    return {"read_after": read_after, "losses": result.losses}


def test_the_loop_reads_each_step_while_the_next_one_runs(sonnets_dataset, tmp_path):
    """log_interval 1 on a device that queues work: step k's loss is read once step k + 1 is queued (the
    device is never left idle while the host logs), but at once before a duty that must see it (an
    evaluation, the run's end), on every step when a loss spike must roll back before the next one, and
    on the CPU. The losses are the same."""
    from tiny import tiny_config

    def run(name: str, queued: tuple[str, ...] = ("cuda", "cpu"), **reliability) -> dict:
        config = tiny_config(
            sonnets_dataset, tmp_path / name,
            training=dict(max_steps=6, eval_interval=3), logging=dict(log_interval=1),
            reliability=reliability,
        )  # fmt: skip
        return run_ranks(1, _when_steps_are_read, config, queued)[0]

    late, guarded, cpu = run("late"), run("guarded", spike_rollback=True), run("cpu", queued=("cuda",))
    # 0-based step -> steps queued when it was read: steps 3 and 6 (1-based) end an evaluation interval
    assert late["read_after"] == {0: 2, 1: 3, 2: 3, 3: 5, 4: 6, 5: 6}
    at_once = {k: k + 1 for k in range(6)}
    assert guarded["read_after"] == at_once
    assert cpu["read_after"] == at_once, "the CPU runs each step as it is called: read at once"
    assert late["losses"] == guarded["losses"] == cpu["losses"] and len(late["losses"]) == 6


def _logged_step_seconds(rank: int, world: int, config, queue_ahead: tuple[str, ...]) -> dict:
    """Train on a clock that moves only inside the work: 1 s a step, 10 s an evaluation, 5 s a save.
    Returns each logged step's perf/step_seconds by 1-based step."""
    import json
    import time as time_module

    import threefold.train as train_module
    from threefold.train import train

    now = [100.0]
    step_fn, evaluate_fn = train_module.train_step, train_module.evaluate
    save_fn = train_module.Checkpointer.save

    def timed(fn, seconds):
        def run(*args, **kwargs):
            result = fn(*args, **kwargs)
            now[0] += seconds
            return result

        return run

    time_module.perf_counter = lambda: now[0]  # this rank's process only (fork)
    train_module.train_step = timed(step_fn, 1.0)
    train_module.evaluate = timed(evaluate_fn, 10.0)
    train_module.Checkpointer.save = timed(save_fn, 5.0)
    train_module.QUEUED_DEVICES = queue_ahead
    train(config, build_mesh(1, 1, 1), torch.device("cpu"))
    records = (Path(config.logging.out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["perf/step_seconds"] for r in map(json.loads, records) if "perf/step_seconds" in r}


@pytest.mark.parametrize("log_interval", [1, 2])
def test_logged_speed_is_the_steps_time_however_late_it_is_read(sonnets_dataset, tmp_path, log_interval):
    """Each logged step took 1 s, whether its interval was read at once or once the next step was queued,
    and with evaluations and saves (inside an interval too, at log_interval 2) left out. Timing windows at
    the host's read instead made a late-read interval last two steps and the one read at once after it
    none."""
    from tiny import tiny_config

    for name, queued in [("late", ("cuda", "cpu")), ("at_once", ("cuda",))]:
        config = tiny_config(
            sonnets_dataset, tmp_path / f"{name}{log_interval}",
            training=dict(max_steps=8, eval_interval=3), logging=dict(log_interval=log_interval),
            checkpoint=dict(interval=5),
        )  # fmt: skip
        seconds = run_ranks(1, _logged_step_seconds, config, queued)[0]
        assert seconds == {step: pytest.approx(1.0) for step in range(2, 9)}, (name, seconds)
