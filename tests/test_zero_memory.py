"""The planner's memory model of ZeRO stages 2-3 and optimizer offload, against its own rules and against
the tensors a real stage-3 / stage-2 trainer holds."""

import dataclasses

import pytest
import torch
from distributed import run_ranks
from tiny import tiny_config

from threefold.config import ParallelConfig, build_config
from threefold.config.validate import OFFLOAD_HOST_OVERHEAD_BYTES
from threefold.metrics import count_parameters
from threefold.plan.layout import Layout, Workload
from threefold.plan.memory_model import estimate_host_memory, estimate_memory, memory_by_rank, rank_parameters


def _memory(zero: int, dp: int, offload: bool = False) -> dict[str, float]:
    raw = {"model": {"preset": "llama-8b"}, "parallel": {"dp_size": dp, "zero": zero},
           "training": {"dtype": "bfloat16", "global_batch_size": 16, "micro_batch_size": 1},
           "optimizer": {"offload": offload}}  # fmt: skip
    config = build_config(raw, check_paths=False)
    return estimate_memory(config) | {"host": estimate_host_memory(config)}


def test_each_stage_shards_one_more_term_and_offload_moves_the_optimizer_to_the_host():
    config = build_config({"model": {"preset": "llama-8b"}}, check_paths=False)
    total = count_parameters(config.model)["total"]
    counts = count_parameters(config.model)
    unit = counts["output_weight"] + counts["final_norm"]  # the head: llama-8b's largest unit
    z0, z1, z2, z3 = (_memory(z, 8) for z in range(4))
    assert z1["optimizer"] == pytest.approx(12 * total / 8) and z0["optimizer"] == pytest.approx(12 * total)
    assert z2["parameters"] == z1["parameters"] == 2 * total
    # In hand: the vocabulary matrix (its own bucket, larger than dp_bucket_mb) and a layer's MLP matrix.
    in_hand = counts["output_weight"] + 4096 * 14336
    assert z2["gradients"] == pytest.approx(4 * (total / 8 + in_hand))
    assert z3["parameters"] == pytest.approx(2 * (total / 8 + 2 * unit))  # two whole units
    assert z3["gradients"] == pytest.approx(4 * (total / 8 + 2 * unit))
    assert z0["total"] > z1["total"] > z2["total"] > z3["total"]
    off = _memory(0, 1, offload=True)
    runtime = OFFLOAD_HOST_OVERHEAD_BYTES  # a GPU rank's CUDA runtime and staging buffers, on top
    assert off["optimizer"] == 0 and off["host"] == 12 * total + runtime  # master, two moments
    assert _memory(1, 8, offload=True)["host"] == pytest.approx(12 * total / 8 + runtime)
    assert z0["host"] == 0


def _live_bytes(rank: int, world: int, config) -> dict:
    """Parameter and gradient bytes of a stage-2/3 trainer: at rest after a step, and the most alive at
    any layer boundary of a step's forward and backward."""
    from threefold.bench import synthetic_steps
    from threefold.parallel.mesh import build_mesh
    from threefold.train import build, train_step

    mesh = build_mesh(1, world, 1)
    trainer = build(config, mesh, torch.device("cpu"))
    (sync,) = trainer.grad_syncs.values()

    def live() -> int:
        nbytes = 0
        for b in sync.buckets:
            nbytes += b.buffer.untyped_storage().nbytes() + b.grad_shard.untyped_storage().nbytes()
            nbytes += b.param_buffer.untyped_storage().nbytes()
            if b.param_shard is not None:
                nbytes += b.param_shard.untyped_storage().nbytes()
        return nbytes

    peak = [0]

    def sample(*_) -> None:
        peak[0] = max(peak[0], live())

    chunk = trainer.chunks[0]
    for module in [chunk.embed_tokens, *chunk.layers.values(), chunk.lm_head]:
        module.register_forward_pre_hook(sample)
        module.register_forward_hook(sample)
        module.register_full_backward_pre_hook(sample)
        module.register_full_backward_hook(sample)
    for batches in synthetic_steps(config, mesh, torch.device("cpu"), 2):
        train_step(trainer, batches, 0)
    params = sum(p.numel() for p in chunk.parameters())
    return {"rest": live(), "peak": peak[0], "params": params}


@pytest.mark.parametrize("zero", [2, 3])
def test_a_real_trainer_holds_what_the_model_says(sonnets_dataset, tmp_path, zero):
    # Layers larger than the vocabulary matrices, so that what is sharded dominates.
    model = dict(num_layers=6, vocab_size=256, hidden_size=64, ffn_hidden_size=256)
    config = tiny_config(sonnets_dataset, tmp_path, dp=2, zero=zero, model=model,
                         parallel=dict(dp_bucket_mb=0.05))  # fmt: skip
    got = run_ranks(2, _live_bytes, config)[0]
    w = Workload(model=config.model, seq_len=16, global_batch_size=8, dtype="float32")
    lay = Layout(parallel=ParallelConfig(dp_size=2, zero=zero, dp_bucket_mb=0.05), micro_batch_size=2)
    (rank,) = memory_by_rank(w, lay)
    assert got["params"] == rank_parameters(w, lay, 0)
    sharded = 4 * got["params"] / 2  # fp32: 1/d of the gradients, and at stage 3 of the parameters
    whole_params = 4 * got["params"] if zero == 2 else sharded
    # At rest: the shards (and at stage 2 the whole parameters), within the padding to a multiple of d.
    assert got["rest"] == pytest.approx(whole_params + sharded, abs=4 * 2 * 8)
    # During the step: never more than the model's parameters + gradients terms, and well above rest.
    assert got["rest"] < got["peak"] <= rank.parameters + rank.gradients
    # Neither the whole gradient (both stages) nor the whole parameters (stage 3) were ever alive at once.
    assert got["peak"] < whole_params + sharded + 4 * got["params"] * 0.7
    if zero == 3:
        assert got["peak"] < 4 * got["params"] + sharded


def test_the_time_model_charges_stage_3_gathers_and_the_offloaded_update():
    from threefold.plan.hardware import PRESETS
    from threefold.plan.time_model import estimate_layout_time

    hw = PRESETS["h200"]
    config = build_config({"model": {"preset": "llama-8b"}}, check_paths=False)
    w = Workload(model=config.model, seq_len=4096, global_batch_size=64)

    def step(link=hw, **kw):
        offload = kw.pop("offload", False)
        lay = Layout(
            parallel=ParallelConfig(**kw), micro_batch_size=1, recompute="selective", offload=offload
        )
        return estimate_layout_time(w, lay, link, gpus_per_node=8)

    # On a slow link stage 3's gathers before every forward and backward, and stage 2's reduce-scatter
    # every micro-batch (8 here), cost more than stage 1's once-a-step reduce-scatter and gather.
    slow = dataclasses.replace(hw, intra_node_gbps=1.0)
    z1, z2, z3 = (step(slow, dp_size=8, zero=z) for z in (1, 2, 3))
    assert z3.dp_exposed > z2.dp_exposed > z1.dp_exposed and z3.compute == z1.compute
    alone, offloaded = step(), step(offload=True)
    total = count_parameters(config.model)["total"]
    expected = max(28 * total / (hw.host_adam_gbps * 1e9), 4 * total / (hw.host_link_gbps * 1e9))
    assert offloaded.optimizer == pytest.approx(expected)
    assert offloaded.optimizer > 10 * alone.optimizer and offloaded.compute == alone.compute


def test_plan_proposes_offload_and_stage_3_only_when_nothing_else_fits():
    from threefold.plan.hardware import PRESETS
    from threefold.plan.search import plan

    config = build_config({"model": {"preset": "llama-8b"}}, check_paths=False)
    w = Workload(model=config.model, seq_len=4096, global_batch_size=8)
    # One H200: 18 bytes per parameter (144 GiB) do not fit; with the optimizer on the host they do. Two
    # micro-batches a step keep the fp32 gradient buffers: at one, direct gradients (16 bytes per parameter)
    # with full recomputation fit, by less than a GiB.
    two = dataclasses.replace(w, global_batch_size=16)
    one = plan(two, PRESETS["h200"], num_gpus=1, gpus_per_node=1, fixed={"tp_size": 1})
    assert one.ranked and all(c.layout.offload for c in one.ranked)
    # Eight GPUs fit without either: they are not proposed.
    eight = plan(w, PRESETS["h200"], num_gpus=8, gpus_per_node=8)
    assert eight.ranked and not any(c.layout.offload or c.layout.parallel.zero > 1 for c in eight.ranked)
