"""Context parallelism: ring and all-to-all attention against whole-sequence attention, whole-model
parity of cp layouts (alone and with tp, sp, pp, dp + ZeRO, recompute) against one process, the checks
on bad configs, and checkpoints moving between cp sizes."""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import assert_same_training, assert_trains_like, run_ranks, train_merged
from tiny import tiny_config, wide_model

from threefold.model.attention import attend
from threefold.parallel.context import (
    ContextParallel,
    context_attention,
    load_balanced_positions,
    split_sequence,
)

STEPS = 4


def test_load_balanced_layout():
    # 8 tokens over cp 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    x = torch.arange(8).view(1, 8)
    assert split_sequence(x, 0, 2).tolist() == [[0, 1, 6, 7]]
    assert split_sequence(x, 1, 2).tolist() == [[2, 3, 4, 5]]
    for cp in (2, 4):
        every = torch.cat([load_balanced_positions(16, r, cp, torch.device("cpu")) for r in range(cp)])
        assert sorted(every.tolist()) == list(range(16))
        for r in range(cp):
            assert torch.equal(load_balanced_positions(16, r, cp, torch.device("cpu")), split_sequence(
                torch.arange(16).view(1, 16), r, cp)[0])  # fmt: skip


def _attention_rank(rank: int, world: int, mode: str, num_kv_heads: int) -> dict:
    """Every rank builds the same q, k, v; attention of its chunks must equal its rows of the full one."""
    gen = torch.Generator().manual_seed(0)
    b, a, s, d = 2, 4, 16, 8
    q = torch.randn(b, a, s, d, generator=gen)
    k = torch.randn(b, num_kv_heads, s, d, generator=gen)
    v = torch.randn(b, num_kv_heads, s, d, generator=gen)
    grad = torch.randn(b, a, s, d, generator=gen)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    group = a // num_kv_heads
    ref = F.scaled_dot_product_attention(
        full[0], full[1].repeat_interleave(group, 1), full[2].repeat_interleave(group, 1), is_causal=True
    )
    ref.backward(grad)
    cp = ContextParallel(dist.group.WORLD, mode)  # type: ignore[arg-type]
    local = [split_sequence(t, rank, world, dim=2).requires_grad_() for t in (q, k, v)]
    out = context_attention(*local, cp)
    out.backward(split_sequence(grad, rank, world, dim=2))
    # The local gradients of k and v come from every rank's queries: sum them is not needed, each rank
    # receives the complete gradient of its own chunks.
    return {
        "out": (out.detach(), split_sequence(ref.detach(), rank, world, dim=2)),
        "grads": [
            (t.grad, split_sequence(f.grad, rank, world, dim=2)) for t, f in zip(local, full, strict=True)
        ],
    }


def _masked_attention_rank(rank: int, world: int, mode: str) -> dict:
    """As _attention_rank, inside documents: ids change at chosen tokens, one document spans several cp
    chunks, others sit inside one chunk, and one is a single token."""
    gen = torch.Generator().manual_seed(1)
    b, a, kv, s, d = 2, 4, 2, 32, 8
    q, k, v, grad = (torch.randn(b, n, s, d, generator=gen) for n in (a, kv, kv, a))
    starts = [[0, 3, 4, 13, 21, 30], [0, 9, 10, 11, 27]]  # document starts per sample
    doc_ids = torch.zeros(b, s, dtype=torch.long)
    for row, row_starts in enumerate(starts):
        for start in row_starts[1:]:
            doc_ids[row, start:] += 1
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attend(*full, doc_ids=doc_ids)
    ref.backward(grad)
    cp = ContextParallel(dist.group.WORLD, mode)  # type: ignore[arg-type]
    local = [split_sequence(t, rank, world, dim=2).requires_grad_() for t in (q, k, v)]
    out = context_attention(*local, cp, doc_ids=doc_ids, whole=functools.partial(attend, doc_ids=doc_ids))
    out.backward(split_sequence(grad, rank, world, dim=2))
    unmasked = context_attention(*(t.detach() for t in local), cp)
    return {
        "out": (out.detach(), split_sequence(ref.detach(), rank, world, dim=2)),
        "differs": (out.detach() - unmasked).abs().max().item(),
        "grads": [
            (t.grad, split_sequence(f.grad, rank, world, dim=2)) for t, f in zip(local, full, strict=True)
        ],
        "gathered": cp.gather(split_sequence(doc_ids, rank, world)),
        "doc_ids": doc_ids,
    }


@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
@pytest.mark.parametrize("cp", [2, 4])
def test_masked_attention_matches_whole_sequence(mode, cp):
    """Document masks across cp shards: no query reads another document's keys, across ring blocks too."""
    results = run_ranks(cp, _masked_attention_rank, mode, timeout=60)
    assert max(r["differs"] for r in results) > 1e-3, "the mask must matter for the test to mean much"
    for result in results:
        assert torch.equal(result["gathered"], result["doc_ids"])  # ContextParallel.gather undoes shard
        got, want = result["out"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for name, (got, want) in zip("qkv", result["grads"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"d{name}")


@pytest.mark.parametrize("mode", ["ring", "all_to_all"])
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_attention_matches_whole_sequence(mode, cp, num_kv_heads):
    for result in run_ranks(cp, _attention_rank, mode, num_kv_heads, timeout=60):
        got, want = result["out"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for name, (got, want) in zip("qkv", result["grads"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"d{name}")


@pytest.fixture(scope="module")
def config(sonnets_dataset, tmp_path_factory):
    """config(arch, tp, dp, pp, cp, **parallel): the tiny model under a layout, STEPS steps."""
    run = tmp_path_factory.mktemp("cp")

    def layout(arch: str = "llama", tp: int = 1, dp: int = 1, pp: int = 1, cp: int = 1, **sections):
        parallel = sections.pop("parallel", {}) | ({"cp_size": cp} if cp > 1 else {})
        training = dict(max_steps=STEPS, seed=7) | sections.pop("training", {})
        return tiny_config(
            sonnets_dataset, run, tp=tp, dp=dp, pp=pp, zero=sections.pop("zero", False),
            v=sections.pop("v", 1), model=wide_model(arch) | sections.pop("model", {}), parallel=parallel,
            optimizer=dict(warmup_steps=2), training=training, **sections,
        )  # fmt: skip

    return layout


LAYOUTS = {
    # name: (arch, tp, dp, pp, cp, extra sections); each layout adds what it proves to the plain ring.
    "cp2": ("llama", 1, 1, 1, 2, {}),
    "cp4": ("llama", 1, 1, 1, 4, {}),
    "cp4-all_to_all": ("llama", 1, 1, 1, 4, {"parallel": {"cp_attention": "all_to_all"}}),
    "cp2-gpt2-selective": ("gpt2", 1, 1, 1, 2, {"training": {"recompute": "selective"}}),
    "cp2-tp2-sp-full": ("llama", 2, 1, 1, 2, {"parallel": {"sequence_parallel": True},
                                              "training": {"recompute": "full"}}),
    "cp2-pp2-interleaved": ("llama", 1, 1, 2, 2, {"v": 2, "model": {"num_layers": 4}}),
    "cp2-dp2-zero": ("llama", 1, 2, 1, 2, {"zero": True}),
    "cp2-zero3": ("llama", 1, 1, 1, 2, {"zero": 3}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cp_layout_matches_single_process(config, reference, name):
    arch, tp, dp, pp, cp, extra = LAYOUTS[name]
    extra = {k: dict(v) if isinstance(v, dict) else v for k, v in extra.items()}
    layout = config(arch, tp, dp, pp, cp, **extra)
    # The same model in one process, without recomputation: recomputing must not change the math.
    single = {k: v for k, v in extra.items() if k == "model"}
    assert_trains_like(train_merged(layout), reference(config(arch, **single)))


def test_checkpoint_moves_between_cp_sizes(config, tmp_path):
    """cp is a layout: a cp 2 (ZeRO over the cp ranks) checkpoint resumes at cp 1, and that one at cp 2."""

    def run(cp: int, where: str, load: str = "", zero: bool = False):
        ckpt = dict(dir=str(tmp_path / where), interval=1, keep_last=4, load=load)
        return train_merged(config(cp=cp, zero=zero, checkpoint=ckpt))

    first = run(2, "a", zero=True)
    second = run(1, "b", load=str(tmp_path / "a" / "step_2"))
    assert_same_training(second, first, from_step=2, exact=False)
    third = run(2, "c", load=str(tmp_path / "b" / "step_3"))
    assert_same_training(third, second, from_step=1, exact=False)


WIDE = dict(num_heads=8, num_kv_heads=4)
BAD = [
    # (parallel, model, data.seq_len, training, message): each trips exactly one rule
    (dict(cp_size=3), {}, 20, {}, r"data.seq_len \(20\) must be divisible by 2 \* parallel.cp_size \(3\) ="),
    (dict(cp_size=4, tp_size=2, cp_attention="all_to_all"), {}, 16, {},
     r"model.num_heads \(4\) / parallel.tp_size \(2\) = 2 heads per tp rank to be divisible by "
     r"parallel.cp_size \(4\)"),
    (dict(cp_size=2), {}, 16, dict(attention_backend="cudnn"),
     r"training.attention_backend = 'cudnn' cannot run context parallelism"),
    (dict(cp_size=2, tp_size=4, sequence_parallel=True), WIDE, 20, {},
     r"parallel.cp_size \(2\) \* parallel.tp_size \(4\) must divide data.seq_len \(20\)"),
    (dict(cp_size=0), {}, 16, {}, r"parallel.cp_size must be positive, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("parallel,model,seq_len,training,message", BAD)
def test_bad_cp_config_is_refused(sonnets_dataset, tmp_path, parallel, model, seq_len, training, message):
    parallel = dict(parallel)
    tp = parallel.pop("tp_size", 1)
    with pytest.raises(ValueError, match=message):
        tiny_config(sonnets_dataset, tmp_path, tp=tp, parallel=parallel, model=model, training=training,
                    data=dict(seq_len=seq_len))  # fmt: skip


def test_document_masking_with_the_ring_on_a_gpu_is_refused(sonnets_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"runs the ring's blocks through exact fp32 math.*'all_to_all'"):
        tiny_config(sonnets_dataset, tmp_path, parallel=dict(cp_size=2), training=dict(device="cuda"),
                    data=dict(seq_len=16, document_masking=True))  # fmt: skip


def test_world_size_counts_cp(sonnets_dataset, tmp_path):
    from threefold.config import check_world_size

    cfg = tiny_config(sonnets_dataset, tmp_path, tp=2, parallel=dict(cp_size=2))
    assert cfg.world_size == 4
    with pytest.raises(ValueError, match=r"parallel.cp_size \(2\)"):
        check_world_size(cfg, 2)


def _llama_1b(tmp_path, cp: int, **parallel):
    from threefold.config import build_config

    return build_config(
        {"model": {"preset": "llama-1b", "max_seq_len": 32768},
         "data": {"seq_len": 32768, "path": str(tmp_path)},
         "parallel": {"cp_size": cp, **parallel},
         "training": {"micro_batch_size": 1, "global_batch_size": 8, "dtype": "bfloat16"}},
        check_paths=False,
    )  # fmt: skip


def test_planner_knows_cp(tmp_path):
    """Activations per GPU shrink by cp; ZeRO shards over dp x cp; compute per GPU halves at cp 2, and the
    ring's transfers are charged only where they outlast the attention core."""
    from threefold.plan.hardware import PRESETS
    from threefold.plan.layout import from_config
    from threefold.plan.memory_model import estimate_memory
    from threefold.plan.time_model import context_parallel_comm, estimate_step_time

    one, two = _llama_1b(tmp_path, 1), _llama_1b(tmp_path, 2)
    mem_one, mem_two = estimate_memory(one), estimate_memory(two)
    assert mem_two["activations"] == pytest.approx(mem_one["activations"] / 2, rel=0.02)
    assert mem_two["parameters"] == mem_one["parameters"]
    zero = estimate_memory(_llama_1b(tmp_path, 2, zero=True))
    assert zero["optimizer"] == pytest.approx(mem_one["optimizer"] / 2)
    hw = PRESETS["h200"]
    time_one, time_two = estimate_step_time(one, hw), estimate_step_time(two, hw)
    assert time_two.compute == pytest.approx(time_one.compute / 2, rel=0.05)
    w, lay = from_config(two)
    forward, backward = context_parallel_comm(w, lay, hw, core=0.0, intra_cp=True)
    assert forward > 0 and backward > forward  # dK/dV travel in fp32 in backward
    assert context_parallel_comm(w, lay, hw, core=1.0, intra_cp=True) == (0.0, 0.0)  # hidden by the core


def test_plan_proposes_cp_for_long_sequences(tmp_path):
    """llama-8b at 128k tokens does not fit one H200 per sequence without splitting it: the best layout
    on 8 GPUs uses cp; at 4k tokens cp is never tried."""
    from threefold.config import build_config
    from threefold.plan.hardware import PRESETS
    from threefold.plan.layout import from_config
    from threefold.plan.search import enumerate_layouts, plan

    def workload(seq_len: int):
        raw = {"model": {"preset": "llama-8b", "max_seq_len": seq_len},
               "data": {"seq_len": seq_len, "path": str(tmp_path)},
               "training": {"global_batch_size": 8, "dtype": "bfloat16"}}  # fmt: skip
        return from_config(build_config(raw, check_paths=False))[0]

    result = plan(workload(131072), PRESETS["h200"], num_gpus=8, gpus_per_node=8)
    assert result.ranked and result.ranked[0].layout.parallel.cp_size > 1
    assert all(lay.parallel.cp_size == 1 for lay in enumerate_layouts(workload(4096), 8))
