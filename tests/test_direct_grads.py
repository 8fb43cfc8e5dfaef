"""Direct gradients: one process, one micro-batch a step, the optimizer reading autograd's gradients
(parallel/data_parallel.py, GradSync(direct=True)) must train exactly as through the fp32 buffers."""

import pytest
import torch
from distributed import run_ranks, train_and_gather
from tiny import tiny_config
from torch import nn

from threefold.bench import synthetic_steps
from threefold.config import Config
from threefold.parallel.data_parallel import GradSync
from threefold.parallel.mesh import build_mesh
from threefold.train import build, train_step


def _train(rank: int, world: int, config: Config, direct: bool) -> dict:
    if not direct:
        Config.direct_grads = property(lambda self: False)  # type: ignore[method-assign]  # this rank's copy
    import threefold.train as train_module

    built = []
    real_build = train_module.build

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    train_module.build = build
    result = train_and_gather(rank, world, config)
    return {**result, "direct": [s.direct for t in built for s in t.grad_syncs.values()]}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_direct_gradients_train_bit_for_bit_as_the_fp32_buffers(sonnets_dataset, tmp_path, dtype):
    config = tiny_config(
        sonnets_dataset,
        tmp_path,
        training=dict(global_batch_size=2, micro_batch_size=2, max_steps=4, dtype=dtype),
        optimizer=dict(grad_clip=0.05),  # below every step's norm: clipping scales each update
    )
    direct, buffered = (run_ranks(1, _train, config, flag)[0] for flag in (True, False))
    assert direct["direct"] == [True] and buffered["direct"] == [False]
    assert min(direct["norms"]) > 0.05
    assert direct["losses"] == buffered["losses"] and direct["norms"] == buffered["norms"]
    assert direct["weights"].keys() == buffered["weights"].keys()
    for name, weight in direct["weights"].items():
        assert torch.equal(weight, buffered["weights"][name]), name


def test_direct_gradients_apply_alone_with_one_micro_batch_and_the_state_on_the_device(
    sonnets_dataset, tmp_path
):
    def config(dp: int = 1, micro: int = 2, offload: bool = False, zero: int = 0) -> Config:
        training = dict(global_batch_size=2 * dp, micro_batch_size=micro)
        return tiny_config(
            sonnets_dataset, tmp_path, dp=dp, zero=zero, training=training, optimizer=dict(offload=offload)
        )

    assert config().direct_grads
    assert not config(dp=2).direct_grads  # a gradient to reduce
    assert not config(micro=1).direct_grads  # two micro-batches to accumulate
    assert not config(offload=True).direct_grads  # the host update reads fp32 gradients
    for zero in (1, 2, 3):  # ZeRO alone on one process keeps its buffers, and trains
        alone = config(zero=zero)
        assert not alone.direct_grads
        assert run_ranks(1, _one_step, alone)[0] > 0


def _one_step(rank: int, world: int, config: Config) -> float:
    mesh = build_mesh(1, 1, 1)
    trainer = build(config, mesh, torch.device("cpu"))
    data = synthetic_steps(config, mesh, torch.device("cpu"), 1)
    return train_step(trainer, data[0], 0).read().loss


def _direct_sync(rank: int, world: int) -> dict:
    mesh = build_mesh(1, 1, 1)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="zero 1"):
        GradSync(list(model.parameters()), dp_group=mesh.dp_group, bucket_mb=1, zero=1, direct=True)
    sync = GradSync(list(model.parameters()), dp_group=mesh.dp_group, bucket_mb=1, direct=True)
    before = sync.owned_grads()
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    sync.finish()
    grads = sync.owned_grads()
    params = list(reversed(list(model.parameters())))
    out = {
        "buckets": len(sync.buckets),
        "main_grad": any(hasattr(p, "main_grad") for p in model.parameters()),
        "ranges": [(r[1], r[2]) for r in sync.owned_ranges()] == [(0, p.numel()) for p in params],
        "zeros_before": all(g.dtype == torch.bfloat16 and not g.any() for g in before),
        "are_grads": all(g.data_ptr() == p.grad.data_ptr() for g, p in zip(grads, params, strict=True)),
    }
    sync.reset()
    out["reset"] = all(p.grad is None for p in model.parameters())
    return out


def test_a_direct_grad_sync_keeps_no_buffers_and_hands_over_autograds_gradients():
    r = run_ranks(1, _direct_sync)[0]
    assert r == {"buckets": 0, "main_grad": False, "ranges": True, "zeros_before": True, "are_grads": True,
                 "reset": True}  # fmt: skip
