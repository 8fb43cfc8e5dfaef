"""ZeRO stages 2 and 3: every layout reproduces the losses and final weights of one process training the
same model, alone and with tensor parallelism, pipeline parallelism and full recompute; stage 3 frees
what it gathers; a checkpoint saved under stage 3 continues identically under stage 0, and back."""

from dataclasses import replace

import pytest
from distributed import assert_same_training, assert_trains_like, train_merged
from tiny import ckpt_config, tiny_config, wide_model

STEPS = 5


@pytest.fixture(scope="module")
def config(sonnets_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("zero")

    def layout(arch: str, tp: int = 1, pp: int = 1, dp: int = 1, zero: int = 0, **training):
        return tiny_config(
            sonnets_dataset, run, tp=tp, pp=pp, dp=dp, zero=zero, model=wide_model(arch),
            optimizer=dict(warmup_steps=2), training=dict(max_steps=STEPS, seed=7, **training),
        )  # fmt: skip

    return layout


LAYOUTS = [  # arch, tp, pp, dp, zero, recompute
    ("llama", 1, 1, 2, 2, "none"),
    ("llama", 1, 1, 2, 3, "none"),
    ("llama", 1, 1, 4, 3, "none"),
    ("gpt2", 1, 1, 2, 3, "none"),  # the tied embedding is gathered for the embedding and the head
    ("llama", 2, 1, 2, 3, "none"),
    ("llama", 1, 2, 2, 2, "none"),
    ("gpt2", 1, 2, 2, 3, "none"),  # the tied embedding's gradient summed across stages, in shards
    ("llama", 1, 1, 2, 3, "full"),
]


@pytest.mark.parametrize(
    "arch,tp,pp,dp,zero,recompute",
    LAYOUTS,
    ids=[f"{a}-tp{t}-pp{p}-dp{d}-zero{z}{'-rc' if r != 'none' else ''}" for a, t, p, d, z, r in LAYOUTS],
)
def test_zero_stage_matches_single_process(config, reference, arch, tp, pp, dp, zero, recompute):
    got = train_merged(config(arch, tp, pp, dp, zero, recompute=recompute))
    assert_trains_like(got, reference(config(arch, recompute=recompute)))


@pytest.mark.parametrize(
    "before,after",
    [((1, 1, 2, 1, 3), (1, 1, 1, 1, 0)), ((1, 1, 1, 1, 0), (1, 2, 2, 1, 3))],
    ids=["zero3-dp2-to-zero0", "zero0-to-zero3-pp2-dp2"],
)
def test_checkpoint_moves_between_zero_stages(sonnets_dataset, tmp_path, whole_run, before, after):
    """Checkpoints hold whole tensors whatever the stage: a run continues under another stage and layout."""
    whole, saved = whole_run(before)
    step_2 = str(saved / "step_2")
    moved = train_merged(ckpt_config(sonnets_dataset, tmp_path / "b", *after, load=step_2))
    assert_same_training(moved, whole, from_step=2, exact=False)


def test_zero3_resume_is_bit_exact(sonnets_dataset, tmp_path, whole_run):
    whole, saved = whole_run((1, 1, 2, 1, 3))
    resumed = train_merged(
        ckpt_config(sonnets_dataset, tmp_path / "b", 1, 1, 2, 1, 3, load=str(saved / "step_2"))
    )
    assert_same_training(resumed, whole, from_step=2)


@pytest.mark.parametrize(
    "layout,fraction",
    [((1, 1, 1, 0), 1.0), ((1, 1, 2, 1), 0.5), ((1, 1, 2, 3), 1.0)],
    ids=["single-all", "dp2-zero1-half", "dp2-zero3-all"],
)
def test_offloaded_optimizer_gives_the_same_weights(config, monkeypatch, layout, fraction):
    """optimizer.offload: masters and moments in host memory, updated part by part as the gradients
    arrive (parts of 5,000 elements here, so that there are many), weights written back; on the CPU the
    same kernels, so the same weights bit for bit, whatever share stays on the device."""
    import threefold.offload

    monkeypatch.setattr(threefold.offload, "PART_NUMEL", 5000)  # the forked ranks inherit it
    base = config("llama", *layout)
    plain = train_merged(base)
    cfg = replace(base.optimizer, offload=True, offload_fraction=fraction)
    offloaded = train_merged(replace(base, optimizer=cfg))
    assert_same_training(offloaded, plain)


def test_offloaded_run_resumes_bit_exact(sonnets_dataset, tmp_path):
    """A run killed after an offloaded step's checkpoint continues exactly (masters and moments saved
    from host memory and loaded back there)."""

    def offloaded(run, **kw):
        c = ckpt_config(sonnets_dataset, tmp_path / run, 1, 1, 2, 1, 2, **kw)
        return replace(c, optimizer=replace(c.optimizer, offload=True))

    whole = train_merged(offloaded("a"))
    resumed = train_merged(offloaded("b", load=str(tmp_path / "a/ckpt/step_2")))
    assert_same_training(resumed, whole, from_step=2)


def test_zero_is_a_stage_and_true_still_means_one():
    from threefold.config import build_config

    def stage(value) -> int:
        return build_config({"parallel": {"zero": value, "dp_size": 2}}, check_paths=False).parallel.zero

    assert [stage(v) for v in (True, False, 2, 3)] == [1, 0, 2, 3]
    assert build_config({}, ["--parallel.zero=true"], check_paths=False).parallel.zero == 1
    assert build_config({}, ["--parallel.zero=3"], check_paths=False).parallel.zero == 3
    with pytest.raises(ValueError, match=r"parallel.zero must be a ZeRO stage 0, 1, 2 or 3 .* got 4"):
        stage(4)


def test_zero3_with_compile_is_refused():
    from threefold.config import build_config

    with pytest.raises(ValueError, match=r"parallel.zero = 3 cannot be combined with training.compile"):
        build_config(
            {"parallel": {"zero": 3, "dp_size": 2}, "training": {"compile": True}}, check_paths=False
        )


def test_offload_without_enough_host_memory_is_refused(sonnets_dataset, monkeypatch):
    import importlib

    from threefold.config import build_config

    validate = importlib.import_module(
        "threefold.config.validate"
    )  # the package exports a function of that name

    raw = {"model": {"preset": "llama-8b"}, "data": {"path": str(sonnets_dataset), "seq_len": 16},
           "training": {"device": "cpu"}, "optimizer": {"offload": True}}  # fmt: skip
    monkeypatch.setattr(validate, "host_memory_available", lambda: 64 * 2**30)
    with pytest.raises(ValueError, match=r"optimizer.offload needs 89\.\d GiB of host memory .* 64.0 GiB"):
        build_config(raw)
    raw["optimizer"]["offload_fraction"] = 0.25  # the rest of the state stays on the GPU
    assert build_config(raw).optimizer.offload_fraction == 0.25
    monkeypatch.setattr(validate, "host_memory_available", lambda: 128 * 2**30)
    assert build_config(raw | {"optimizer": {"offload": True}}).optimizer.offload


def test_offload_fraction_auto_is_a_word_or_a_number():
    from threefold.config import build_config

    def share(value, text: bool = False):
        if text:
            return build_config({}, [f"--optimizer.offload_fraction={value}"], check_paths=False)
        return build_config({"optimizer": {"offload_fraction": value}}, check_paths=False)

    assert share("auto").optimizer.offload_fraction == "auto"
    assert share("auto", text=True).optimizer.offload_fraction == "auto"
    assert share(0.25).optimizer.offload_fraction == 0.25
    assert share("0.25", text=True).optimizer.offload_fraction == 0.25
    with pytest.raises(
        ValueError, match=r"offload_fraction = 'half' is neither a float nor one of \('auto',\)"
    ):
        share("half")
    with pytest.raises(ValueError, match=r"offload_fraction must lie in \(0, 1\], got 1.5"):
        share(1.5)


def test_auto_offload_keeps_on_the_gpu_what_fits():
    """'auto' picks the smallest host share (steps of 0.01) whose estimated peak fits the GPU with 5% to
    spare: the next smaller share would not fit; all on the GPU when that fits, all on the host when
    nothing else does."""
    from threefold.config import build_config
    from threefold.plan.fit import AUTO_OFFLOAD_MARGIN, resolve_offload
    from threefold.plan.memory_model import estimate_memory

    raw = {"model": {"preset": "llama-8b"}, "data": {"seq_len": 4096},
           "training": {"device": "cuda", "dtype": "bfloat16", "micro_batch_size": 1, "global_batch_size": 32,
                        "recompute": "selective"},
           "optimizer": {"offload": True, "offload_fraction": "auto"}}  # fmt: skip
    config = build_config(raw, check_paths=False)

    def total(share: float) -> float:
        optimizer = replace(config.optimizer, offload_fraction=share)
        return estimate_memory(replace(config, optimizer=optimizer))["total"]

    for limit_gib in (100.0, 139.8):
        limit = limit_gib * 2**30
        share = resolve_offload(config, limit).optimizer.offload_fraction
        assert 0.0 < share < 1.0
        assert total(share) <= limit * (1 - AUTO_OFFLOAD_MARGIN) < total(round(share - 0.01, 2))
    assert resolve_offload(config, 10_000 * 2**30).optimizer.offload_fraction == 0.0
    assert resolve_offload(config, 20 * 2**30).optimizer.offload_fraction == 1.0
    fixed = replace(config, optimizer=replace(config.optimizer, offload_fraction=0.3))
    assert resolve_offload(fixed, 100 * 2**30) is fixed


def test_auto_offload_trains_like_no_offload(config, monkeypatch, capfd):
    """A run with offload_fraction 'auto', its device memory made small enough that about half the state
    goes to the host: the share is chosen at start-up and said, and the weights are those of a run
    without offload, bit for bit (on the CPU the host and device updates use the same kernels)."""
    import threefold.offload
    import threefold.plan.fit
    from threefold.plan.memory_model import estimate_memory

    monkeypatch.setattr(threefold.offload, "PART_NUMEL", 5000)
    base = config("llama", 1, 1, 2, 1)
    auto = replace(base, optimizer=replace(base.optimizer, offload=True, offload_fraction="auto"))

    def total(share: float) -> float:
        return estimate_memory(replace(auto, optimizer=replace(auto.optimizer, offload_fraction=share)))[
            "total"
        ]

    limit = (total(0.0) + total(1.0)) / 2 / (1 - threefold.plan.fit.AUTO_OFFLOAD_MARGIN)
    monkeypatch.setattr(threefold.plan.fit, "device_memory", lambda device, ranks: limit)  # forked ranks too
    plain = train_merged(base)
    offloaded = train_merged(auto)
    said = capfd.readouterr().out
    assert "optimizer.offload_fraction 'auto': 0.5 of the optimizer state on the host" in said
    assert_same_training(offloaded, plain)
