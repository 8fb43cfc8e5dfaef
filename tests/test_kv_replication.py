"""Fewer key/value heads than TP ranks (multi-query attention, or tp 8 on 4 kv heads): each rank holds the
one kv head its query heads read, replicated over tp_size / num_kv_heads consecutive ranks.

Training matches one process; checkpoints save each kv head once and move between replicated and split kv
heads; per-rank parameter counts match the built model; Hugging Face export and import round-trip.
The models carry Qwen2's q/k/v biases, so the replicated k and v biases are covered too.
"""

import json

import pytest
import torch
import torch.distributed as dist
from distributed import assert_same_training, assert_trains_like, run_ranks, train_merged
from tiny import tiny_config

from threefold.checkpoint import load_checkpoint, load_manifest, read_full_state
from threefold.checkpoint.load import ShardReader
from threefold.config import ModelConfig
from threefold.metrics import count_parameters
from threefold.model.hf import load_hf_checkpoint, save_hf_checkpoint
from threefold.model.transformer import build_model, gather_logits
from threefold.parallel.layers import TPContext, gather_full, shard_of
from threefold.parallel.mesh import build_mesh
from threefold.train import build

STEPS = 5
K_PROJ = "layers.0.self_attn.k_proj.weight"


def kv_model(num_kv_heads: int) -> dict:
    """8 query heads of width 4 over `num_kv_heads` kv heads, with q/k/v biases."""
    return dict(num_heads=8, num_kv_heads=num_kv_heads, attention_bias=True)


# --- Training parity ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config(sonnets_dataset, tmp_path_factory):
    """config(num_kv_heads, tp, pp, dp, zero, **parallel): the tiny model under a layout, 5 steps."""
    run = tmp_path_factory.mktemp("kv-parity")

    def layout(num_kv_heads: int, tp: int = 1, pp: int = 1, dp: int = 1, zero: bool = False, **parallel):
        return tiny_config(
            sonnets_dataset, run, tp=tp, pp=pp, dp=dp, zero=zero, model=kv_model(num_kv_heads),
            parallel=parallel, optimizer=dict(warmup_steps=2), training=dict(max_steps=STEPS, seed=7),
        )  # fmt: skip

    return layout


# (num_kv_heads, tp, pp, dp, sequence_parallel, zero); the 4-rank runs are few: two cores run them.
LAYOUTS = [
    (1, 2, 1, 1, False, False),
    (1, 4, 1, 1, True, False),
    (2, 4, 1, 1, False, False),
    (1, 2, 2, 1, False, False),
    (1, 2, 1, 2, False, True),
]


def _layout_id(layout: tuple) -> str:
    kv, tp, pp, dp, sp, zero = layout
    return f"kv{kv}-tp{tp}-pp{pp}-dp{dp}" + ("-sp" if sp else "") + ("-zero" if zero else "")


@pytest.mark.parametrize("layout", LAYOUTS, ids=[_layout_id(t) for t in LAYOUTS])
def test_layout_matches_single_process(config, reference, layout):
    kv, tp, pp, dp, sp, zero = layout
    # A kv head on several ranks: counted once in the norm, its gradients summed across its replicas.
    got = train_merged(config(kv, tp, pp, dp, zero, sequence_parallel=sp))
    assert_trains_like(got, reference(config(kv)))


def _replicas_agree(rank: int, world: int, config) -> dict:
    """After training, the local k and v tensors (weights and Adam moments) of one rank."""
    from threefold.train import train

    mesh = build_mesh(config.parallel.tp_size, 1, 1)
    trainer = train(config, mesh, torch.device("cpu")).trainer
    assert trainer is not None
    state = trainer.optimizer.state_dict().params
    names = [n for n in state if ".k_proj." in n or ".v_proj." in n]
    return {n: (state[n].master.clone(), *(m.clone() for m in state[n].moments.values())) for n in names}


def test_replicas_of_a_kv_head_stay_identical(config):
    """Ranks sharing a kv head apply the same update: their weights and moments stay bit-identical."""
    ranks = run_ranks(2, _replicas_agree, config(1, 2))
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) == 2 * 2 * 2  # k, v; weight, bias; 2 layers
    for name, tensors in ranks[0].items():
        for mine, theirs in zip(tensors, ranks[1][name], strict=True):
            assert torch.equal(mine, theirs), name


# --- Checkpoints ----------------------------------------------------------------------------------------


def _ckpt_config(data, run, tp: int, *, load: str = "", max_steps: int = 4):
    return tiny_config(
        data, run, tp=tp, model=kv_model(2), training=dict(max_steps=max_steps, seed=5),
        checkpoint=dict(interval=2, keep_last=3, load=load),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tp4_run(sonnets_dataset, tmp_path_factory):
    """A 2-kv-head model trained 4 steps under tp=4 (pairs of ranks share a kv head), saving steps 2 and 4."""
    run = tmp_path_factory.mktemp("kv-tp4")
    return run, train_merged(_ckpt_config(sonnets_dataset, run, 4))


def test_tp4_checkpoint_saves_each_kv_head_once(tp4_run):
    run, _ = tp4_run
    tensors = json.loads((run / "ckpt" / "step_2" / "manifest.json").read_text())["tensors"]
    for key in (K_PROJ, "layers.1.self_attn.v_proj.bias", f"{K_PROJ}::exp_avg"):
        pieces = sorted((e["tp_rank"], e["tp_size"], e["file"], e["shape"][0]) for e in tensors[key])
        # kv head 0 from TP rank 0, kv head 1 from TP rank 2: 4 rows (one head) each
        assert pieces == [(0, 2, "rank00000.safetensors", 4), (1, 2, "rank00002.safetensors", 4)], key
    assert sorted(e["tp_rank"] for e in tensors["layers.0.self_attn.q_proj.weight"]) == [0, 1, 2, 3]


def test_tp4_checkpoint_resumes_bit_exact(sonnets_dataset, tmp_path, tp4_run):
    run, whole = tp4_run
    resumed = train_merged(_ckpt_config(sonnets_dataset, tmp_path, 4, load=str(run / "ckpt" / "step_2")))
    assert_same_training(resumed, whole, from_step=2)  # steps 3 and 4, bit for bit


def _load_and_gather(rank: int, world: int, config, path: str) -> dict:
    """Load `path` into a freshly built trainer; the full weights, and the parameters whose loaded Adam
    moments are not exactly this rank's slice of the saved full moments."""
    mesh = build_mesh(config.parallel.tp_size, 1, 1)
    trainer = build(config, mesh, torch.device("cpu"))
    load_checkpoint(trainer, path)
    reader = ShardReader(path, load_manifest(path))
    params = dict(trainer.chunks[0].named_parameters())
    wrong = []
    for name, piece in trainer.optimizer.state_dict().params.items():
        for moment, tensor in piece.moments.items():
            want = shard_of(reader.full(f"{name}::{moment}"), params[name], mesh.tp_rank, mesh.tp_size)
            if not torch.equal(tensor.view(want.shape), want):
                wrong.append(f"{name}::{moment}")
    return {"weights": {n: gather_full(p, mesh.tp_group) for n, p in params.items()}, "wrong_moments": wrong}


def _check_loads(config, path) -> None:
    """`path` loads under `config`'s layout with the weights and moments it saved, bit for bit."""
    _, saved = read_full_state(path)
    for got in run_ranks(config.world_size, _load_and_gather, config, path, timeout=240):
        assert got["wrong_moments"] == []
        assert got["weights"].keys() == saved.keys()
        for name, w in saved.items():
            assert torch.equal(got["weights"][name], w), name


@pytest.mark.parametrize("tp", [1, 2])
def test_tp4_checkpoint_loads_under_smaller_tp(sonnets_dataset, tmp_path, tp4_run, tp):
    """Replicated kv heads (tp 4) into split ones (tp 2: one head per rank) or whole ones (tp 1)."""
    run, whole = tp4_run
    path = run / "ckpt" / "step_4"
    _, saved = read_full_state(path)
    for name, w in whole["weights"].items():  # what the tp=4 ranks held is what the checkpoint holds
        assert torch.equal(saved[name], w), name
    _check_loads(_ckpt_config(sonnets_dataset, tmp_path, tp), path)


@pytest.mark.parametrize("tp", [1, 2])
def test_checkpoint_of_smaller_tp_loads_under_tp4(sonnets_dataset, tmp_path, tp):
    train_merged(_ckpt_config(sonnets_dataset, tmp_path / "a", tp))
    _check_loads(_ckpt_config(sonnets_dataset, tmp_path / "b", 4), tmp_path / "a" / "ckpt" / "step_2")


def test_checkpoint_moved_to_tp1_continues_like_tp4(sonnets_dataset, tmp_path, tp4_run):
    """Steps 3 and 4 after a tp=4 -> tp=1 move match the tp=4 run (the optimizer state moved too)."""
    run, whole = tp4_run
    moved = train_merged(_ckpt_config(sonnets_dataset, tmp_path, 1, load=str(run / "ckpt" / "step_2")))
    assert_same_training(moved, whole, from_step=2, exact=False)


# --- Parameter counts -----------------------------------------------------------------------------------


def _local_numel(rank: int, world: int, cfg: ModelConfig) -> dict:
    model = build_model(cfg, TPContext(dist.group.WORLD))
    layer = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.0."))
    return {"total": sum(p.numel() for p in model.parameters()), "per_layer": layer}


def _counted_model(num_kv_heads: int) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=1001, hidden_size=32, num_layers=2, ffn_hidden_size=64,
                       max_seq_len=16, **kv_model(num_kv_heads))  # fmt: skip


@pytest.mark.parametrize("kv,tp", [(1, 2), (1, 4), (2, 4)])
def test_count_parameters_per_rank_matches_the_built_model(kv, tp):
    cfg = _counted_model(kv)
    counts = count_parameters(cfg, tp_size=tp)
    for got in run_ranks(tp, _local_numel, cfg):
        assert got == {"total": counts["total"], "per_layer": counts["per_layer"]}
    # By hand: q and o split (2 h^2 / t), k and v one head each (2 h d), q/k/v biases h/t + 2 d, MLP 3 h f / t
    h, d, f = 32, 4, 64
    assert counts["per_layer"] == 2 * h * h // tp + 2 * h * d + h // tp + 2 * d + 3 * h * f // tp + 2 * h


# --- Hugging Face export and import ----------------------------------------------------------------------


def _export_hf(rank: int, world: int, cfg: ModelConfig, out_dir: str) -> dict:
    """Build the model at tp=world and export its gathered full weights (rank 0 writes)."""
    model = build_model(cfg, TPContext(dist.group.WORLD), seed=3)
    full = {name: gather_full(p, dist.group.WORLD) for name, p in model.named_parameters()}
    if rank == 0:
        save_hf_checkpoint(cfg, full, out_dir)
    return full


def _import_hf(rank: int, world: int, hf_dir: str, ids: torch.Tensor) -> dict:
    """Load an HF checkpoint into a model at tp=world (other seed); its local k_proj and full logits."""
    cfg, state = load_hf_checkpoint(hf_dir)
    model = build_model(cfg, TPContext(dist.group.WORLD), seed=4)
    local = {name: shard_of(state[name], p, rank, world) for name, p in model.named_parameters()}
    model.load_state_dict(local, strict=True)
    with torch.no_grad():
        logits = gather_logits(model(ids), dist.group.WORLD, cfg.vocab_size)
    return {"k_proj": local[K_PROJ], "logits": logits}


def test_hf_round_trip_of_replicated_kv_heads(tmp_path):
    cfg = _counted_model(1)  # multi-query: one kv head on all 4 ranks
    full = run_ranks(4, _export_hf, cfg, str(tmp_path / "hf"))[0]
    assert full[K_PROJ].shape == (4, 32)  # the one head, not four copies
    imported_cfg, state = load_hf_checkpoint(tmp_path / "hf")
    assert (imported_cfg.num_heads, imported_cfg.num_kv_heads) == (8, 1)
    assert state.keys() == full.keys()
    for name, w in full.items():
        assert torch.equal(state[name], w), name
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    split = run_ranks(4, _import_hf, str(tmp_path / "hf"), ids)
    whole = run_ranks(1, _import_hf, str(tmp_path / "hf"), ids)[0]
    for got in split:
        assert torch.equal(got["k_proj"], full[K_PROJ])  # every rank holds the whole (only) kv head
    torch.testing.assert_close(split[0]["logits"], whole["logits"], rtol=1e-5, atol=1e-5)


def test_the_planner_considers_tp_beyond_the_kv_heads():
    """tp 8 on llama-8b's 8 KV heads was the limit; 16 (each KV head on two ranks) is now a layout too."""
    from threefold.plan.hardware import PRESETS
    from threefold.plan.layout import Workload
    from threefold.plan.search import plan
    from threefold.presets import MODEL_PRESETS

    work = Workload(model=ModelConfig(**MODEL_PRESETS["llama-8b"]), seq_len=4096, global_batch_size=64)
    result = plan(work, PRESETS["h100"], num_gpus=16, gpus_per_node=16, fixed={"tp_size": 16})
    layouts = result.ranked + result.too_big
    assert layouts and all(c.layout.parallel.tp_size == 16 for c in layouts)
