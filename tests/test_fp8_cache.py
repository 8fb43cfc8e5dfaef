"""The float8 layers' weights cast once per optimizer step (threefold.parallel.fp8_cache), on the CPU: the
same bits as casting at every micro-batch under every layout that runs several micro-batches a step (each
layout under one recipe or both), the casts really made once a step and read by every GEMM that needs
them, compiled code included, and the rule of where the cache applies."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from tiny import tiny_config

from threefold.config import ModelConfig
from threefold.config.sections import caches_fp8_weights
from threefold.model.transformer import build_model
from threefold.parallel import fp8
from threefold.parallel.fp8_cache import CachedWeight, Float8WeightCache
from threefold.parallel.layers import TPContext, gather_full


def _train_recording_casts(rank: int, world_size: int, config) -> dict:
    """Train with the device rule lifted (float8 on the CPU), recording how many weights the cache cast
    and, for every float8 GEMM that reads a weight, whether it was handed the weight's kept operands."""
    import threefold.train as train_module
    from threefold.parallel.mesh import build_mesh

    train_module.check_fp8_device = lambda device, recipe: None
    handed = {"forward": [], "input gradient": []}
    real_forward, real_input = fp8.forward_gemm, fp8.grad_input_gemm

    def forward_gemm(x, weight, recipe, out_dtype, cast=None):
        handed["forward"].append(cast is not None)
        return real_forward(x, weight, recipe, out_dtype, cast)

    def grad_input_gemm(grad, weight, recipe, out_dtype, cast=None):
        handed["input gradient"].append(cast is not None)
        return real_input(grad, weight, recipe, out_dtype, cast)

    fp8.forward_gemm, fp8.grad_input_gemm = forward_gemm, grad_input_gemm
    import threefold.model.loss as loss_module
    import threefold.model.transformer as transformer_module

    output_casts = []
    real_output_casts = loss_module.output_weight_casts

    def output_weight_casts(*args, **kwargs):
        output_casts.append(1)
        return real_output_casts(*args, **kwargs)

    loss_module.output_weight_casts = transformer_module.output_weight_casts = output_weight_casts
    p = config.parallel
    mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size, p.cp_size)
    result = train_module.train(config, mesh, torch.device("cpu"))
    weights = {}
    for chunk in result.trainer.chunks.values():
        for name, param in chunk.named_parameters():
            if not getattr(param, "tied_copy", False):
                weights[name] = gather_full(param, mesh.tp_group)
    cache = result.trainer.fp8_weight_cache
    linears = sum(isinstance(m, CachedWeight) for c in result.trainer.chunks.values() for m in c.modules())
    if config.training.fp8_output_layer:  # the output weight's casts, kept by the loss
        linears += sum(c.has_head for c in result.trainer.chunks.values())
    return {
        "losses": result.losses, "weights": weights if mesh.tp_rank == 0 and mesh.dp_rank == 0 else {},
        "casts": None if cache is None else cache.casts, "linears": linears, "handed": handed,
        "output_casts": len(output_casts), "heads": sum(c.has_head for c in result.trainer.chunks.values()),
    }  # fmt: skip


LAYOUTS = {
    "tp1": dict(),
    "tp2": dict(tp=2),  # the column-parallel projections overlapped with the all-reduce (eager Function)
    "tp2-sp": dict(tp=2, parallel=dict(sequence_parallel=True)),
    "pp2-1f1b": dict(pp=2),
    "pp2-zb-h1": dict(pp=2, parallel=dict(pipeline_schedule="zb-h1")),  # deferred weight gradients
    "dp2-zero1": dict(dp=2, zero=1),
    "tp1-recompute": dict(training=dict(recompute="full")),  # each layer's forward again in the backward
    "tp2-output-layer": dict(tp=2, training=dict(fp8_output_layer=True)),  # the float8 output layer too
    "pp2-output-layer": dict(pp=2, training=dict(fp8_output_layer=True)),
}
# One process under both recipes; each other layout under one of them, the two recipes taking turns, so
# each recipe still meets tp, a pipeline and the output layer. (The cache keeps whatever operands the
# recipe's cast makes; what differs between layouts is when it casts and who reads the casts.)
ROWWISE = {"tp1", "tp2", "pp2-zb-h1", "tp1-recompute", "tp2-output-layer"}
TENSORWISE = {"tp1", "tp2-sp", "pp2-1f1b", "dp2-zero1", "pp2-output-layer"}
assert ROWWISE | TENSORWISE == LAYOUTS.keys()
RECIPES = {"tensorwise": TENSORWISE, "rowwise": ROWWISE}
CASES = [(layout, recipe) for layout in LAYOUTS for recipe, layouts in RECIPES.items() if layout in layouts]


@pytest.mark.parametrize("layout,recipe", CASES, ids=[f"{layout}-{recipe}" for layout, recipe in CASES])
def test_weights_cast_once_a_step_train_bit_for_bit_like_casts_at_every_micro_batch(
    sonnets_dataset, tmp_path, layout, recipe
):
    """Four micro-batches a step (two per rank under dp 2), three steps: the losses and every weight equal,
    bit for bit, the run that casts at every micro-batch; each float8 linear's weight was cast once a
    step; and in training every forward and input-gradient GEMM read the kept casts."""
    options = dict(LAYOUTS[layout])
    sections = {k: options.pop(k) for k in ("parallel",) if k in options}
    extra = options.pop("training", {})
    ranks = options.get("tp", 1) * options.get("pp", 1) * options.get("dp", 1)

    def run(cache: bool) -> list[dict]:
        config = tiny_config(
            sonnets_dataset, tmp_path / f"{layout}-{cache}", **options, **sections,
            model=dict(hidden_size=64, ffn_hidden_size=128, num_layers=4, vocab_size=50304),  # 16 | Vp / t
            training=dict(dtype="bfloat16", device="auto", fp8=recipe, max_steps=3, fp8_weight_cache=cache)
            | extra,
        )  # fmt: skip
        return run_ranks(ranks, _train_recording_casts, config, timeout=120)

    cached, plain = run(True), run(False)
    assert cached[0]["losses"] == plain[0]["losses"]
    for got, want in zip(cached, plain, strict=True):
        assert got["weights"].keys() == want["weights"].keys()
        for name, w in want["weights"].items():
            assert torch.equal(got["weights"][name], w), name
        assert want["casts"] is None and not any(want["handed"]["forward"] + want["handed"]["input gradient"])
        assert got["linears"] > 0 and got["casts"] == 3 * got["linears"]
        assert got["handed"]["forward"] and all(got["handed"]["forward"])
        assert got["handed"]["input gradient"] and all(got["handed"]["input gradient"])
        if "output-layer" in layout:  # the output weight cast at every micro-batch, or once a step
            assert want["output_casts"] == 3 * 4 * want["heads"] and got["output_casts"] == 3 * got["heads"]


def test_outside_a_step_the_linears_cast_their_weights_themselves():
    """Evaluation, sampling and any call of the model outside `Float8WeightCache.step` read no kept casts
    (they may be stale), and a step casts each weight at its first pass only."""
    run_ranks(1, _outside_and_inside)


def _outside_and_inside(rank: int, world_size: int) -> None:
    cfg = ModelConfig(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=128, vocab_size=128, max_seq_len=64)  # fmt: skip
    cache = Float8WeightCache("rowwise")
    model = build_model(cfg, TPContext(dist.group.WORLD, fp8="rowwise", fp8_weight_cache=cache), seed=1)
    kept = [m for m in model.modules() if isinstance(m, CachedWeight)]
    assert len(kept) == 2 * 7 and all(k.operands() is None for k in kept)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    with cache.step():
        for _ in range(3):
            model(ids[:, :-1], ids[:, 1:]).backward()
        assert cache.casts == 14 and all(k.operands() is not None for k in kept)
    assert all(k.operands() is None for k in kept)
    before = model(ids[:, :-1], ids[:, 1:]).item()
    with torch.no_grad():
        for m in model.modules():  # the weights change: a kept cast would now be stale
            if hasattr(m, "cached_weight"):
                m.weight.mul_(-1)
    assert model(ids[:, :-1], ids[:, 1:]).item() != before
    with cache.step():
        model(ids[:, :-1], ids[:, 1:])
    assert cache.casts == 28


def _compiled_graph_casts(rank: int, world_size: int, recipe: str, cached: bool) -> dict:
    """The amax reductions (one per float8 operand cast) in one compiled llama layer's forward and
    backward graphs, over two steps of two micro-batches, and how often the layer was compiled."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    counts = {"forward": 0, "backward": 0, "compiles": 0}

    def counting(name):
        def compiler(gm, example_inputs):
            counts[name] += sum(n.target is torch.ops.aten.amax.default for n in gm.graph.nodes)
            counts["compiles"] += name == "forward"
            return gm

        return compiler

    backend = aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"))
    cfg = ModelConfig(arch="llama", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=128, vocab_size=128, max_seq_len=64)  # fmt: skip
    cache = Float8WeightCache(recipe) if cached else None
    model = build_model(cfg, TPContext(dist.group.WORLD, fp8=recipe, fp8_weight_cache=cache), seed=1)
    torch._dynamo.reset()
    counters.clear()
    for layer in model.layers.values():
        layer.compile(backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        with cache.step() if cache is not None else contextlib.nullcontext():
            for _ in range(2):
                model(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
    return counts | {"graph_breaks": sum(counters["graph_break"].values())}


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_a_compiled_layer_reads_the_kept_casts_and_compiles_once(recipe):
    """With the cache the compiled layer's graphs cast no weight: the forward casts the 4 distinct
    inputs only (7 weights fewer), the backward no weight again (7 fewer). Compiled once for every step
    and micro-batch (the kept casts are updated in place), in one graph."""
    plain = run_ranks(1, _compiled_graph_casts, recipe, False)[0]
    cached = run_ranks(1, _compiled_graph_casts, recipe, True)[0]
    assert plain["forward"] == 7 + 4 and cached["forward"] == 4
    assert cached["backward"] == plain["backward"] - 7
    assert cached["compiles"] == plain["compiles"] == 1
    assert cached["graph_breaks"] == plain["graph_breaks"] == 0


@pytest.mark.parametrize(
    "fp8_setting,setting,num_microbatches,zero,applies",
    [
        ("rowwise", True, 4, 0, True),
        ("tensorwise", True, 2, 2, True),
        ("rowwise", True, 1, 0, False),  # one micro-batch: nothing to reuse
        ("rowwise", True, 4, 3, False),  # ZeRO-3 frees the weights between micro-batches
        ("rowwise", False, 4, 0, False),
        (False, True, 4, 0, False),
    ],
)
def test_where_the_cache_applies(fp8_setting, setting, num_microbatches, zero, applies):
    assert (
        caches_fp8_weights(fp8=fp8_setting, setting=setting, num_microbatches=num_microbatches, zero=zero)
        is applies
    )


def test_the_config_says_where_the_cache_applies(sonnets_dataset, tmp_path):
    """`Config.caches_fp8_weights` reads the layout: 4 micro-batches a step at dp 1, 1 at dp 4 (global
    batch 8, micro-batch 2)."""
    float8 = dict(dtype="bfloat16", device="auto", fp8="rowwise")
    assert tiny_config(sonnets_dataset, tmp_path, training=float8).caches_fp8_weights
    assert not tiny_config(sonnets_dataset, tmp_path, dp=4, training=float8).caches_fp8_weights
    off = float8 | dict(fp8_weight_cache=False)
    assert not tiny_config(sonnets_dataset, tmp_path, training=off).caches_fp8_weights
