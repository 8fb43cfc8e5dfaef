"""Float8 training (threefold.parallel.fp8) on the CPU: the scaling against plain references, the GEMMs
against dequantized float64 matmuls, the linear's forward and backward against float32, tensor
parallelism (tp 2 against tp 1 with the same float8 math), and the config's rules.

torch._scaled_mm runs on the CPU in torch 2.13 (fp32 accumulation, any dims, any float8 pairing), so
these tests run the same code as the GPU; only the kernel differs. The GPU's stricter rules (dims a
multiple of 16, the gradient as the left e5m2 operand) are kept by the code and the config checks here.
"""

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from float8_reference import emulated, nearest, relative_error, train_fp8_on_cpu
from tiny import tiny_config

from threefold.config import ModelConfig, TrainingConfig
from threefold.model.transformer import build_model
from threefold.parallel import fp8
from threefold.parallel.layers import TPContext, gather_full
from threefold.train import check_fp8_device, fp8_notice

E4M3, E5M2 = fp8.E4M3, fp8.E5M2
RECIPES = ["tensorwise", "rowwise"]


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


# --- Scales and casts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("amax", [3e-5, 0.02, 1.0, 448.0, 7e4])
def test_scale_is_the_largest_power_of_two_within_range(dtype, amax):
    t = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    t = t / t.abs().max() * amax
    scale = fp8.scale_for(t, dtype, None)
    limit = torch.finfo(dtype).max
    assert scale.dtype == torch.float32 and scale.shape == ()
    assert torch.log2(scale) == torch.log2(scale).round(), "a power of two"
    assert limit / 2 < amax * scale <= limit, f"amax {amax} x scale {scale} must lie in (max/2, max]"


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_quantize_rounds_to_the_nearest_float8_value(dtype):
    t = torch.randn(128, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 64)
    # Ties, half way between two neighbours: e4m3 steps by 1/8 in [0.5, 1), e5m2 by 1/4.
    t[0, :7] = torch.tensor([8.5, 9.0, 9.5, 11.0, 11.5, -13.0, -15.0]) / 16
    q = fp8.quantize(t, dtype, None)
    assert q.data.dtype == dtype
    scale = 1 / q.scale
    want = nearest(t * scale, dtype) / scale  # the reference: search the format's values
    torch.testing.assert_close(q.data.float() * q.scale, want, rtol=0, atol=0)
    # The format's bound on normal numbers: half a unit in the last place, 2^-4 (e4m3) or 2^-3 (e5m2).
    normal = (t * scale).abs() >= torch.finfo(dtype).smallest_normal
    mantissa_bits = 3 if dtype == E4M3 else 2
    error = (q.data.float() * q.scale - t).abs()[normal] / t.abs()[normal]
    assert error.max() <= 2.0 ** -(mantissa_bits + 1)


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_casts_saturate_instead_of_overflowing(dtype):
    limit = torch.finfo(dtype).max
    t = torch.tensor([1.0, -1.0, 0.5, 3.0])
    out = fp8.to_fp8(t, torch.tensor(limit * 4), dtype).float()  # a scale too large on purpose
    assert out.isfinite().all(), f"overflow gave {out}"
    assert out.tolist() == [limit, -limit, limit, limit]


def test_an_all_zero_tensor_gets_a_finite_scale_and_stays_zero():
    for dim in (None, 1):
        q = fp8.quantize(torch.zeros(16, 32), E4M3, dim)
        assert q.scale.isfinite().all() and (q.scale > 0).all()
        assert (q.data.float() == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [None, 0, 1])
def test_amax_reads_the_tensor_once_and_equals_the_largest_magnitude(dtype, dim):
    """fp8.amax: max |t| exactly, from t's least and greatest values, without writing |t|: no abs in
    eager code. Rows whose largest magnitude is negative, all -0.0, and NaN (which must propagate)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    t = (torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 1e3).to(dtype)
    t[1, 7] = -5e4  # a row (and a column) whose largest magnitude is negative
    t[2] = -0.0
    t[:, 3] = -0.0
    t[4, 9] = float("nan")
    expected = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        got = fp8.amax(t, dim)
    assert "abs" not in ops.seen and "aminmax" in ops.seen, ops.seen
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)  # -0.0 == 0.0: scales alike


def test_compiled_code_takes_the_largest_magnitude_as_abs_then_amax():
    """Under torch.compile fp8.amax stays abs().amax(), which the compiler fuses into one read."""
    t = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)) - 0.5
    compiled = torch.compile(lambda x: fp8.amax(x, 1), backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    graphs = [str(g.graph) for g in torch._dynamo.explain(lambda x: fp8.amax(x, 1))(t).graphs]
    assert any("abs" in g for g in graphs) and not any("aminmax" in g for g in graphs), graphs
    torch.testing.assert_close(compiled(t), t.abs().amax(dim=1, keepdim=True), rtol=0, atol=0)


def test_rowwise_operands_scale_each_row_or_column_over_the_contraction_dimension():
    t = _randn(32, 48) * torch.logspace(-2, 2, 32)[:, None]  # rows of very different sizes
    a = fp8.operand(t, E4M3, "rowwise", "a")  # (M, K): one scale per row
    assert a.scale.shape == (32, 1) and a.data.is_contiguous()
    for i in (0, 17, 31):
        assert a.scale[i, 0] == 1 / fp8.scale_for(t[i], E4M3, None)
    b = fp8.operand(t, E4M3, "rowwise", "b")  # (K, N): one scale per column
    assert b.scale.shape == (1, 48) and b.data.t().is_contiguous(), "right operands are column-major"
    for j in (0, 47):
        assert b.scale[0, j] == 1 / fp8.scale_for(t[:, j], E4M3, None)
    w = fp8.operand(t, E4M3, "tensorwise", "b")
    assert w.scale.shape == () and w.data.t().is_contiguous()


def test_rowwise_keeps_small_rows_that_one_tensorwise_scale_loses():
    """A row 10^6 below the largest falls into float8's subnormals under one scale for the tensor."""
    t = _randn(16, 64)
    t[0] *= 1e4
    t[1:] *= 1e-2
    small = slice(1, None)
    errors = {}
    for recipe in RECIPES:
        q = fp8.operand(t, E4M3, recipe, "a")
        dequantized = q.data.float() * q.scale  # the scale broadcasts: () or (rows, 1)
        errors[recipe] = relative_error(dequantized[small], t[small])
    assert errors["rowwise"] < 0.04, errors
    assert errors["tensorwise"] > 0.5, errors


# --- The GEMMs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_matmul_is_the_product_of_the_dequantized_operands(recipe):
    """_scaled_mm's scales are dequantization scales: (a.data a.scale) @ (b.data b.scale)."""
    a = fp8.operand(_randn(32, 64) * 3, E5M2, recipe, "a")
    b = fp8.operand(_randn(64, 48) / 5, E4M3, recipe, "b")
    want = (a.data.double() * a.scale.double()) @ (b.data.double() * b.scale.double())
    got = fp8.matmul(a, b, torch.float32, fast_accum=False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rowwise_on_cpu", [True, False])
def test_cpu_tensorwise_matmul_passes_the_scales_this_torch_takes(monkeypatch, rowwise_on_cpu):
    """On the CPU, one scale per operand goes to _scaled_mm as a scale per row and column where this
    torch's CPU kernel takes those (the faster kernel), and as it is where it does not (torch 2.11)."""
    a = fp8.operand(_randn(32, 64) * 3, E5M2, "tensorwise", "a")
    b = fp8.operand(_randn(64, 48) / 5, E4M3, "tensorwise", "b")
    shapes = []
    scaled_mm = torch._scaled_mm

    def spy(x, y, scale_a, scale_b, **kwargs):
        shapes.append((tuple(scale_a.shape), tuple(scale_b.shape)))
        return scaled_mm(x, y, scale_a, scale_b, **kwargs)

    monkeypatch.setattr(fp8, "cpu_has_rowwise_scaled_mm", lambda: rowwise_on_cpu)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    got = fp8.matmul(a, b, torch.float32, fast_accum=False)
    assert shapes == [((32, 1), (1, 48)) if rowwise_on_cpu else (tuple(a.scale.shape), tuple(b.scale.shape))]
    want = (a.data.double() * a.scale.double()) @ (b.data.double() * b.scale.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_cpu_rowwise_check_says_what_torch_does():
    one = torch.ones(4, 16).to(E4M3)
    try:
        torch._scaled_mm(one, one.t(), torch.ones(4, 1), torch.ones(1, 4), out_dtype=torch.float32)
        takes_rowwise = True
    except RuntimeError:
        takes_rowwise = False
    assert fp8.cpu_has_rowwise_scaled_mm() == takes_rowwise


@pytest.mark.parametrize("recipe,grad_dtype", [("tensorwise", E5M2), ("rowwise", E4M3)])
def test_linear_forward_and_backward_are_the_float8_gemms(recipe, grad_dtype):
    """Forward x in e4m3 @ W in e4m3; grad_x: dy @ W in e4m3; grad_W: dy^T @ x in e4m3, with dy in e5m2
    (tensorwise) or e4m3 (rowwise), each scaled over the dimension its GEMM contracts (rowwise): matched
    against float64 emulation, and against float32 within float8's error."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 64, generator=gen).requires_grad_()
    w = (torch.randn(48, 64, generator=gen) * 0.05).requires_grad_()
    dy = torch.randn(2, 16, 48, generator=gen) * 1e-3
    y = fp8.fp8_linear(x, w, recipe)
    y.backward(dy)

    rows = recipe == "rowwise"
    x2, g2 = x.detach().reshape(32, 64).double(), dy.reshape(32, 48).double()
    wd = w.detach().double()
    want_y = emulated(x2, E4M3, 1 if rows else None) @ emulated(wd, E4M3, 1 if rows else None).t()
    want_gx = emulated(g2, grad_dtype, 1 if rows else None) @ emulated(wd, E4M3, 0 if rows else None)
    want_gw = emulated(g2.t(), grad_dtype, 1 if rows else None) @ emulated(x2, E4M3, 0 if rows else None)
    for got, want, name in ((y, want_y, "y"), (x.grad, want_gx, "grad_x"), (w.grad, want_gw, "grad_w")):
        torch.testing.assert_close(got.detach().reshape(want.shape).double(), want, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip

    # Against float32: float8's error, and not less (the GEMMs really ran in float8).
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = torch.nn.functional.linear(xr, wr)
    yr.backward(dy)
    grad_bound = 0.08 if grad_dtype == E5M2 else 0.05  # e4m3 rounds to half the error of e5m2
    for got, want, bound in ((y, yr, 0.04), (x.grad, xr.grad, grad_bound), (w.grad, wr.grad, grad_bound)):
        assert 1e-4 < relative_error(got.detach(), want.detach()) < bound


# --- Tensor parallelism: tp 2 against tp 1, both in float8 ------------------------------------------

SHAPE = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=128, max_seq_len=32)  # fmt: skip
"""Every GEMM dimension a multiple of 16 at tp 2, as the GPU needs (head dim 16, kv heads 1 per rank)."""
VARIANTS = {
    "overlap": dict(),
    "plain": dict(overlap_comm=False),
    "sp": dict(sequence_parallel=True),
    "recompute": dict(recompute="full"),  # the float8 forward runs again in backward: the same casts
}


def _loss_and_grads(rank: int, world_size: int, recipes: list, variants: dict) -> dict:
    """Loss and full gradients of one forward/backward of the model per (recipe, TP variant)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE.vocab_size, (2, 17), generator=gen)  # 2 x 16 = 32 tokens per GEMM
    out = {}
    for recipe in recipes:
        for name, options in variants.items():
            tp = TPContext(dist.group.WORLD, fp8=recipe, **options)
            model = build_model(SHAPE, tp, seed=3)
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            grads = {n: _full_grad(p, tp) for n, p in model.named_parameters()}
            out[(recipe, name)] = (loss.item(), grads)
    return out


def _full_grad(param: torch.nn.Parameter, tp: TPContext) -> torch.Tensor:
    """The full gradient of a parameter: shards gathered, partial sums (sequence parallelism) summed."""
    grad = param.grad
    assert grad is not None
    if getattr(param, "sequence_parallel", False):
        grad = grad.clone()
        dist.all_reduce(grad, group=tp.group)
    shaped = torch.nn.Parameter(grad)
    for attr in ("tp_dim", "tp_full_size", "tp_replicas"):
        if hasattr(param, attr):
            setattr(shaped, attr, getattr(param, attr))
    return gather_full(shaped, tp.group)


@pytest.fixture(scope="module")
def single_process():
    """tp 1: float32 (recipe None) and each float8 recipe."""
    return run_ranks(1, _loss_and_grads, [None, *RECIPES], {"tp1": {}}, timeout=120)[0]


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(2, _loss_and_grads, RECIPES, VARIANTS, timeout=120)[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_tensor_parallel_float8_matches_one_process(single_process, two_ranks, recipe, variant):
    """Power-of-two scales make float8 rounding independent of which rank's amax set the scale, so tp 2
    reproduces tp 1's float8 run closely (summation order aside), while both sit float8's error away
    from float32: the comparison tells a TP mistake (errors of order one) from float8's own."""
    loss, grads = two_ranks[(recipe, variant)]
    ref_loss, ref_grads = single_process[(recipe, "tp1")]
    f32_loss, f32_grads = single_process[(None, "tp1")]
    assert abs(loss - ref_loss) < 1e-6 * abs(ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert grads[name].shape == ref.shape, name
        assert relative_error(grads[name], ref) < 1e-4, name
        if "proj" in name:  # the float8 linears: really float8, and within its error of float32
            assert 1e-3 < relative_error(ref, f32_grads[name]) < 0.2, name


@pytest.fixture(scope="module")
def fp8_runs(sonnets_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("fp8-train")

    def config(tp: int, fp8):
        return tiny_config(sonnets_dataset, run, tp=tp, model=dict(hidden_size=64, ffn_hidden_size=128),
                           training=dict(dtype="bfloat16", device="auto", fp8=fp8, max_steps=3))  # fmt: skip

    return {
        (tp, fp8): run_ranks(tp, train_fp8_on_cpu, config(tp, fp8), timeout=120)[0]
        for tp, fp8 in [(1, False), (1, "tensorwise"), (2, "tensorwise")]
    }


def test_training_with_fp8_from_the_config(fp8_runs):
    """`training.fp8` reaches the model through train.build (which asks for the device check), trains
    under tp 1 and tp 2 alike, and differs from bf16 by float8's rounding only."""
    bf16, one, two = fp8_runs[(1, False)], fp8_runs[(1, "tensorwise")], fp8_runs[(2, "tensorwise")]
    assert bf16["checked"] == [] and one["checked"] == [("cpu", "tensorwise")]
    assert bf16["notices"] == [] and one["notices"] == two["notices"] == [
        fp8_notice(TrainingConfig(dtype="bfloat16", fp8="tensorwise"))
    ]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=2e-3, atol=0)
    gaps = [abs(a / b - 1) for a, b in zip(one["losses"], bf16["losses"], strict=True)]
    assert 0 < max(gaps) < 0.02, gaps


def test_float8_adds_no_state_to_checkpoints():
    """An fp8 run's checkpoint loads in bf16 and back: the same parameters, names and shapes, no buffers."""

    def state(rank, world_size):
        plain = build_model(SHAPE, TPContext(dist.group.WORLD)).state_dict()
        float8 = build_model(SHAPE, TPContext(dist.group.WORLD, fp8="rowwise")).state_dict()
        return {k: v.shape for k, v in plain.items()}, {k: v.shape for k, v in float8.items()}

    plain, float8 = run_ranks(1, state, timeout=60)[0]
    assert plain == float8


# --- Configuration ------------------------------------------------------------------------------------


def _config(tmp_path, sonnets_dataset, **training):
    shape = dict(hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128)
    return tiny_config(sonnets_dataset, tmp_path, tp=2, model=shape,
                       training=dict(dtype="bfloat16", device="auto") | training)  # fmt: skip


@pytest.mark.parametrize("value", ["tensorwise", "rowwise", False])
def test_fp8_setting_loads(tmp_path, sonnets_dataset, value):
    assert _config(tmp_path, sonnets_dataset, fp8=value).training.fp8 == value


def test_fp8_override_text(tmp_path, sonnets_dataset):
    from threefold.config import load_config

    path = tmp_path / "c.toml"
    path.write_text(f'[data]\npath = "{sonnets_dataset}"\n[training]\ndtype = "bfloat16"\nfp8 = "rowwise"\n')
    assert load_config(path).training.fp8 == "rowwise"
    assert load_config(path, ["--training.fp8=false"]).training.fp8 is False
    assert load_config(path, ["--training.fp8=tensorwise"]).training.fp8 == "tensorwise"
    with pytest.raises(
        ValueError, match=r"training.fp8 True is unknown; choose one of \(False, 'tensorwise'"
    ):
        load_config(path, ["--training.fp8=true"])
    with pytest.raises(ValueError, match="training.fp8 'blockwise' is unknown"):
        load_config(path, ["--training.fp8=blockwise"])


@pytest.mark.parametrize(
    "training,model,message",
    [
        (dict(dtype="float32"), {}, r"fp8 = 'rowwise' needs training.dtype = 'bfloat16' \(got 'float32'\)"),
        (dict(device="cpu"), {}, "needs a CUDA GPU of compute capability >= 8.9; training.device is 'cpu'"),
        (dict(micro_batch_size=1, global_batch_size=8), {}, r"micro_batch_size \(1\) \* data.seq_len \(8\)"),
        ({}, dict(ffn_hidden_size=80), r"model.ffn_hidden_size \(80\) / parallel.tp_size \(2\) = 40 is not"),
        ({}, dict(hidden_size=72), r"multiple of 16; model.hidden_size = 72 is not"),
        ({}, dict(num_heads=8), r"kv_heads \(2\) / parallel.tp_size \(2\)\) \* head dim \(8\) = 8 is not"),
    ],
    ids=["float32", "cpu", "tokens", "ffn", "hidden", "kv"],
)  # fmt: skip
def test_fp8_config_errors_name_the_values(tmp_path, sonnets_dataset, training, model, message):
    shape = dict(hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128) | model
    raw_training = dict(dtype="bfloat16", device="auto", fp8="rowwise") | training
    data = dict(seq_len=8) if "micro_batch_size" in training else {}
    with pytest.raises(ValueError, match=message):
        tiny_config(sonnets_dataset, tmp_path, tp=2, model=shape, training=raw_training, data=data)


def test_the_fp8_notice_asks_for_compile_only_when_float8_runs_uncompiled():
    notice = fp8_notice(TrainingConfig(dtype="bfloat16", fp8="rowwise"))
    assert notice is not None and "training.fp8 = 'rowwise'" in notice and "training.compile = true" in notice
    assert fp8_notice(TrainingConfig(dtype="bfloat16", fp8="rowwise", compile=True)) is None
    assert fp8_notice(TrainingConfig(dtype="bfloat16")) is None


def test_fp8_device_check_refuses_the_cpu():
    with pytest.raises(
        ValueError, match="training.fp8 = 'tensorwise' needs a CUDA GPU; this rank runs on cpu"
    ):
        check_fp8_device(torch.device("cpu"), "tensorwise")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a machine without a GPU")
def test_fp8_without_a_gpu_stops_before_the_workers_start(tmp_path, sonnets_dataset):
    from threefold.launch import run_workers

    config = _config(tmp_path, sonnets_dataset, fp8="tensorwise")  # training.device = 'auto'

    def body(*args):
        raise AssertionError("no worker may start")

    with pytest.raises(ValueError, match="training.fp8 = 'tensorwise' needs a CUDA GPU .* none is available"):
        run_workers(config, body, world=None, nproc=None, worker_argv=["train"])


@pytest.mark.parametrize(
    "tp,schedule,recipe", [(1, "zb-h1", "tensorwise"), (2, "zb-v", "rowwise")], ids=["tp1-zb-h1", "tp2-zb-v"]
)
def test_zero_bubble_defers_the_float8_weight_gradients(sonnets_dataset, tmp_path, tp, schedule, recipe):
    """The zero-bubble schedules' W steps run the float8 weight-gradient GEMMs that B put off (plain linears
    at tp 1; the overlapped column-parallel projections at tp 2): the run equals 1F1B's on the same two
    stages, and the float8 GEMMs did run (it differs from bf16)."""

    def run(schedule: str, fp8) -> dict:
        config = tiny_config(
            sonnets_dataset, tmp_path / f"{schedule}-{fp8}", tp=tp, pp=2, v=2 if schedule == "zb-v" else 1,
            model=dict(hidden_size=64, ffn_hidden_size=128, num_layers=4),
            parallel=dict(pipeline_schedule=schedule),
            training=dict(dtype="bfloat16", device="auto", fp8=fp8, max_steps=3),
        )  # fmt: skip
        out = run_ranks(2 * tp, train_fp8_on_cpu, config, timeout=120)
        weights = {k: v for o in out for k, v in o["weights"].items()}
        return {"losses": out[0]["losses"], "norms": out[0]["norms"], "weights": weights}

    zero_bubble, one_f_one_b, bf16 = run(schedule, recipe), run("1f1b", recipe), run(schedule, False)
    assert zero_bubble["losses"] == pytest.approx(one_f_one_b["losses"], rel=1e-6, abs=0)
    assert zero_bubble["norms"][0] == pytest.approx(one_f_one_b["norms"][0], rel=1e-5)
    assert zero_bubble["weights"].keys() == one_f_one_b["weights"].keys()
    for name, w in one_f_one_b["weights"].items():  # bf16 weights: within one rounding step at their scale,
        # but for one element in 100,000 at most: Adam turns the rounding of the smallest gradients into
        # lr-sized steps (2 of the 3.2M embedding elements 2.6 steps apart, tp2-zb-v, 2026-12-07)
        step = 2.0 ** (torch.floor(torch.log2(w.float().abs().max())).item() - 7)
        off = (zero_bubble["weights"][name].float() - w.float()).abs()
        outliers = int((off > step).sum())
        assert outliers <= max(1, off.numel() // 100_000), (name, outliers)
        assert off.max() <= 4 * step, (name, off.max())
    gaps = [abs(a / b - 1) for a, b in zip(zero_bubble["losses"], bf16["losses"], strict=True)]
    assert 0 < max(gaps) < 0.02, gaps


@pytest.mark.parametrize("zero", [1, 3])
def test_float8_with_zero_matches_one_rank(sonnets_dataset, tmp_path, zero):
    """fp8 under data parallelism with ZeRO (stage 3 gathers each layer's bf16 weights before its float8
    casts): dp 2 trains as dp 1 does, up to the summation order of the gradient reduction."""

    def run(dp: int, stage: int) -> dict:
        config = tiny_config(
            sonnets_dataset, tmp_path / f"dp{dp}-zero{stage}", dp=dp, zero=stage,
            model=dict(hidden_size=64, ffn_hidden_size=128),
            training=dict(dtype="bfloat16", device="auto", fp8="tensorwise", max_steps=3),
        )  # fmt: skip
        return run_ranks(dp, train_fp8_on_cpu, config, timeout=120)[0]

    one, two = run(1, 0), run(2, zero)
    assert two["checked"] == [("cpu", "tensorwise")]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=2e-3, atol=0)
    for name, w in one["weights"].items():
        step = 2.0 ** (torch.floor(torch.log2(w.float().abs().max())).item() - 7)  # one bf16 rounding step
        torch.testing.assert_close(two["weights"][name].float(), w.float(), rtol=0, atol=2 * step, msg=name)


@pytest.mark.parametrize(("recipe", "cp_attention"), [("rowwise", "ring"), ("tensorwise", "all_to_all")])
def test_float8_with_context_parallelism_trains_as_one_rank(sonnets_dataset, tmp_path, recipe, cp_attention):
    """fp8 linears under context parallelism (each rank's q/k/v, o and MLP GEMMs over its two chunks of
    every sequence): cp 2 trains as cp 1 does, up to float8's rounding. The scales come from each rank's
    own tokens (a weight gradient's operands along its tokens, tensorwise's amax over its tensor), as data
    parallelism takes them from each rank's own sequences, so the runs are not bit for bit. Held to: the
    losses within 2e-3 (the data-parallel test's bound), the first step's gradient norm within 1e-3 (a
    gradient not summed over the cp ranks would be far off), and the weights after three steps closer to
    the one-rank float8 run's than a bf16 run's are (Adam turns the smallest gradients' rounding into
    lr-sized steps either way, so no element-wise bound holds even for bf16)."""

    def run(cp: int, fp8_recipe: str | bool) -> dict:
        parallel = dict(cp_size=cp, cp_attention=cp_attention) if cp > 1 else {}
        config = tiny_config(
            sonnets_dataset, tmp_path / f"cp{cp}-{fp8_recipe}", parallel=parallel,
            model=dict(hidden_size=64, ffn_hidden_size=128),
            training=dict(dtype="bfloat16", device="auto", fp8=fp8_recipe, max_steps=3),
        )  # fmt: skip
        return run_ranks(cp, train_fp8_on_cpu, config, timeout=120)[0]

    def distance(a: dict, b: dict) -> float:
        return sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a) ** 0.5

    one, two, bf16 = run(1, recipe), run(2, recipe), run(1, False)
    assert two["checked"] == [("cpu", recipe)] and bf16["checked"] == []
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=2e-3, atol=0)
    assert two["norms"][0] == pytest.approx(one["norms"][0], rel=1e-3)
    # 0.152 against 0.260 (rowwise, ring), 0.066 against 0.308 (tensorwise, all-to-all); the first step's
    # norms 1.3e-4 and 3.4e-5 apart (dev machine, 2026-12-07). With the gradients summed over dp alone, not
    # dp x cp: the norm 40% off, the distance 7.1x bf16's.
    assert distance(two["weights"], one["weights"]) < 0.75 * distance(bf16["weights"], one["weights"])


def _train_counting_float8_gathers(rank: int, world_size: int, config, bf16_transport: bool = False) -> dict:
    """`train_fp8_on_cpu`, counting the all-gathers that carried float8 bytes; `bf16_transport`: the
    float8 gather's buckets sent as bf16 instead (the same buckets, so the same gradient-norm sums)."""
    import threefold.parallel.data_parallel as data_parallel
    import threefold.parallel.fp8_gather as fp8_gather

    if bf16_transport:

        def as_bf16(bucket, dp_group):
            return data_parallel.all_gather_flat(
                bucket.param_buffer, bucket.param_shard, group=dp_group, async_op=True
            )

        data_parallel.gather_float8 = as_bf16
    sent = []
    plain = fp8_gather.all_gather_flat

    def counting(out, inp, **kw):
        sent.append(inp.dtype)
        return plain(out, inp, **kw)

    fp8_gather.all_gather_flat = counting
    return train_fp8_on_cpu(rank, world_size, config) | {"float8_gathers": len(sent)}


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["dp2", "dp2-tp2", "dp2-pp2"])
def test_zero3_float8_gather_trains_bit_for_bit_like_the_bf16_gather(sonnets_dataset, tmp_path, tp, pp):
    """parallel.zero_fp8_gather sends the float8 linears' weights as float8 bytes; the GEMMs cast the same
    float8 values as from a bf16 gather of the same buckets, so the run is the same to the bit (see
    parallel/fp8_gather.py), also with the weights sharded over tp or split over pipeline stages. (Against
    zero_fp8_gather = false the buckets differ, and with them the order of the gradient-norm sum.)"""

    def run(bf16_transport: bool) -> dict:
        training = dict(dtype="bfloat16", device="auto", fp8="tensorwise", max_steps=3, global_batch_size=8)
        config = tiny_config(
            sonnets_dataset, tmp_path / f"gather-{bf16_transport}", dp=2, tp=tp, pp=pp, zero=3,
            model=dict(hidden_size=64, ffn_hidden_size=128, num_layers=4),
            parallel=dict(zero_fp8_gather=True), training=training,
        )  # fmt: skip
        out = run_ranks(2 * tp * pp, _train_counting_float8_gathers, config, bf16_transport, timeout=120)
        gathers = sum(o["float8_gathers"] for o in out)
        return {"losses": out[0]["losses"], "weights": {k: v for o in out for k, v in o["weights"].items()},
                "gathers": gathers}  # fmt: skip

    bf16_gather, float8_gather = run(True), run(False)
    assert bf16_gather["gathers"] == 0
    assert float8_gather["gathers"] >= 4 * 2 * 3  # each of 4 layers, forward and backward, 3 steps
    assert float8_gather["losses"] == bf16_gather["losses"]
    assert float8_gather["weights"].keys() == bf16_gather["weights"].keys()
    for name, w in bf16_gather["weights"].items():
        assert torch.equal(float8_gather["weights"][name], w), name


@pytest.mark.parametrize(
    "overrides", [dict(zero=1, fp8="tensorwise"), dict(zero=3, fp8="rowwise"), dict(zero=3, fp8=False)]
)
def test_zero_fp8_gather_needs_zero3_and_tensorwise(overrides):
    from threefold.config import build_config

    raw = {"parallel": {"zero": overrides["zero"], "dp_size": 2, "zero_fp8_gather": True},
           "training": {"dtype": "bfloat16", "fp8": overrides["fp8"]}}  # fmt: skip
    with pytest.raises(ValueError, match=r"zero_fp8_gather needs parallel.zero = 3 and training.fp8"):
        build_config(raw, check_paths=False)


TRANSPOSED = """
import torch
from threefold.parallel._fp8_kernel import transposed_cast_kernel
from threefold.parallel.fp8 import scale_strides

generator = torch.Generator().manual_seed(0)
seen = set()
for rows, cols in ((64, 64), (70, 45), (1, 130)):
    t = torch.randn(rows, cols, generator=generator) * 300
    for source in (t, t.t().contiguous().t()):
        scales = (torch.tensor([[2.0]]), torch.rand(rows, 1) * 4, torch.rand(1, cols) * 4,
                  torch.rand(rows, cols) * 4, (torch.rand(cols, rows) * 4).t())
        for scale in scales:
            out = torch.full((cols, rows), float("nan"))  # fp32 out: the interpreter's float8 casts are not
            s_row, s_col, along = scale_strides(scale)     # the GPU's; the GPU test checks those bits
            seen.add(along)
            grid = ((rows + 31) // 32, (cols + 31) // 32)
            transposed_cast_kernel[grid](source, out, scale, rows, cols, *source.stride(), s_row, s_col,
                                         448.0, along, BLOCK_ROWS=32, BLOCK_COLS=32)
            assert torch.equal(out, (source * scale).clamp(-448.0, 448.0).t()), (rows, cols, scale.shape)
assert seen == {0, 1, 2, 3}, seen
print("same")
"""


def test_the_transposed_cast_kernel_moves_every_element_under_the_interpreter():
    """fp8.transposed_cast's Triton kernel, run by Triton's interpreter on the CPU with an fp32 output:
    every element lands transposed, scaled and clamped, for ragged tiles, strided inputs and each scale
    layout (one value, per row, per column, per element, each read its own way: SCALE_ALONG)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TRANSPOSED], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]


def test_the_transposed_cast_is_the_cast_then_the_transpose():
    """On the CPU the operator is torch's cast and copy; the operands built on it keep their layouts."""
    t = torch.randn(6, 10) * 100
    scale = fp8.scale_for(t, fp8.E4M3, None)
    got = fp8.transposed_cast(t, scale, fp8.E4M3)
    assert got.shape == (10, 6) and got.is_contiguous()
    for dtype in (fp8.E4M3, fp8.E5M2):  # the operator's registration: schema, fake twin, compile
        torch.library.opcheck(fp8.transposed_cast, (t, scale, dtype))
        torch.library.opcheck(fp8.transposed_cast, (t.t(), torch.rand(10, 1), dtype))
    assert torch.equal(got.float(), fp8.to_fp8(t, scale, fp8.E4M3).float().t())
    right = fp8.operand(t, fp8.E4M3, "tensorwise", "b")  # column-major
    assert right.data.stride() == (1, 6) and torch.equal(
        right.data.float(), fp8.to_fp8(t, scale, fp8.E4M3).float()
    )
    left = fp8.operand(t.t(), fp8.E5M2, "rowwise", "a")  # row-major out of a transposed view
    assert left.data.is_contiguous() and left.scale.shape == (10, 1)
    want = fp8.quantize(t.t(), fp8.E5M2, 1)
    assert torch.equal(left.data.float(), want.data.float()) and torch.equal(left.scale, want.scale)
    # The row-major cast eager CUDA code takes from the kernel (cast_as): t as the transpose of t^T, with
    # the scale transposed too (the kernel's reading of such strides: the interpreter test above).
    per_row = fp8.scale_for(t, fp8.E4M3, 1)
    for s in (scale, per_row):
        got = fp8.transposed_cast(t.t(), s.t() if s.dim() == 2 else s, fp8.E4M3)
        assert got.shape == t.shape and torch.equal(got.float(), fp8.to_fp8(t, s, fp8.E4M3).float())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_the_compiled_fp8_linear_is_the_eager_one_on_the_cpu(recipe):
    """On the CPU, in fp32, the compiled layer's output and both gradients equal the eager layer's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    w = torch.randn(48, 32, generator=gen) * 0.1
    dy = torch.randn(64, 48, generator=gen)
    x[3] *= 40  # an outlier token: the recipes then differ
    results = []
    for fn in (fp8.fp8_linear, torch.compile(fp8.fp8_linear)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, recipe)
        y.backward(dy)
        results.append((y.detach(), xi.grad, wi.grad))
    for got, want in zip(*results, strict=True):
        assert got is not None and torch.equal(got, want)


@pytest.mark.parametrize("scale_strides", [(0, 0), (1, 0), (0, 1)], ids=["one", "per-row", "per-column"])
def test_the_transposed_cast_kernel_compiles_for_hopper_as_torch_compile_launches_it(scale_strides):
    """torch.compile launches the kernel with its own signature: a Python float argument becomes fp64,
    and Hopper's back end has no fp64 to float8 conversion, so a clamp limit passed at run time failed
    to compile there (2026-12-04, 'PassManager::run failed'). Compiled here for sm_90 (Triton brings its
    own ptxas; no GPU needed) with the types the compiler gives each argument."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from threefold.parallel._fp8_kernel import transposed_cast_kernel

    # the arguments fp8.transposed_cast passes, in order: three pointers, then sizes and strides of a
    # transposed (64, 64) input and of the scale, then float8's largest value and how the scale varies
    s_row, s_col = scale_strides
    along = fp8.scale_strides(torch.ones(64 if s_row else 1, 64 if s_col else 1))[2]
    values = ["*bf16", "*fp8e4nv", "*fp32", 64, 64, 1, 64, s_row, s_col, fp8.FP8_MAX[fp8.E4M3], along]
    constants = {"BLOCK_ROWS": fp8.TILE, "BLOCK_COLS": fp8.TILE}
    signature, constexprs = {}, {}
    for p, value in zip(transposed_cast_kernel.params, values + [None] * 2, strict=True):
        if p.is_constexpr or value == 1:  # the compiler makes an integer 1 (a unit stride) a constant
            signature[p.name] = "constexpr"
            constexprs[p.name] = constants.get(p.name, value)
        else:
            signature[p.name] = (
                value if isinstance(value, str) else "fp64" if isinstance(value, float) else "i32"
            )
    source = ASTSource(fn=transposed_cast_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert "cvt.rn.satfinite.e4m3x2.f32" in compiled.asm["ptx"]  # the float8 cast, from fp32


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("kernel", [False, True])
def test_compiled_code_casts_transposed_operands_as_the_switch_says(monkeypatch, recipe, kernel):
    """fp8.KERNEL_UNDER_COMPILE off for a recipe, the float8 linear's graphs as torch.compile captures
    them (forward and backward bodies of the autograd Function) hold no call of the Triton operator, so
    the compiler fuses the casts; on, they call it; eager code calls it either way. The defaults as
    measured: the compiler's casts for tensorwise, the kernel for rowwise."""
    assert fp8.KERNEL_UNDER_COMPILE == {"tensorwise": False, "rowwise": True}
    monkeypatch.setitem(fp8.KERNEL_UNDER_COMPILE, recipe, kernel)
    torch._dynamo.reset()
    graphs: list[str] = []

    def keep(gm, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm

    x, w = torch.randn(64, 32, requires_grad=True), (torch.randn(48, 32) * 0.1).requires_grad_()
    torch.compile(fp8.fp8_linear, backend=keep)(x, w, recipe).backward(torch.randn(64, 48))
    text = "\n".join(graphs)
    assert "bwd_body" in text  # the backward was captured too
    assert ("fp8_transposed_cast" in text) == kernel
    calls = []
    monkeypatch.setattr(fp8, "transposed_cast", lambda *a: calls.append(1) or fp8.to_fp8(*a).t().contiguous())
    fp8.fp8_linear(x, w, recipe).backward(torch.randn(64, 48))
    assert len(calls) == 4  # eager: W^T in the forward; W, dy^T and x in the backward


def _shared_against_separate(rank: int, world_size: int, recipe: str) -> dict:
    """Three float8 projections of one input through `shared_input_projections` and one by one: outputs,
    gradients, and how many operands each way cast (`fp8.scale_for` calls, forward and backward)."""
    from threefold.parallel.layers import ColumnParallelLinear, shared_input_projections

    group = dist.group.WORLD
    torch.manual_seed(2)
    layers = [ColumnParallelLinear(32, n, tp_group=group, bias=False, fp8=recipe) for n in (32, 16, 16)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.2)
    x, grads_out = torch.randn(2, 16, 32), [torch.randn(2, 16, n) for n in (32, 16, 16)]
    casts = []
    original = fp8.scale_for
    fp8.scale_for = lambda *a: casts.append(1) or original(*a)  # operands cast (rowwise: also the grads')
    out = {}
    for name, project in (("separate", lambda t: [layer(t) for layer in layers]),
                          ("shared", lambda t: shared_input_projections(t, layers, recipe))):  # fmt: skip
        casts.clear()
        xi = x.clone().requires_grad_()
        ys = project(xi)
        torch.autograd.backward(ys, grads_out)
        out[name] = ([y.detach() for y in ys], xi.grad, [layer.weight.grad for layer in layers], len(casts))
        for layer in layers:
            layer.weight.grad = None
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_projections_of_one_input_share_its_float8_casts(recipe):
    """q/k/v (and gate/up) on one rank cast their shared input once for the forward GEMMs and once for
    the weight gradients, not once per projection: the same float8 values and GEMMs as three float8
    linears, and their input gradients summed in autograd's order: every result equal bit for bit."""
    out = run_ranks(1, _shared_against_separate, recipe)[0]
    (ys, gx, gw, n_separate), (ys_s, gx_s, gw_s, n_shared) = out["separate"], out["shared"]
    assert all(torch.equal(a, b) for a, b in zip(ys, ys_s, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(gw, gw_s, strict=True))
    assert torch.equal(gx_s, gx)
    # tensorwise reuses x's forward scale in backward; rowwise scales x again along the tokens
    saved = {"tensorwise": 2, "rowwise": 4}[recipe]  # two fewer casts of x per pass that casts it
    assert n_shared == n_separate - saved


def _compiled_layer_casts(rank: int, world_size: int, recipe: str) -> dict:
    """The amax reductions (one per float8 operand cast) in the forward and backward graphs of one
    compiled llama layer on the CPU, as AOTAutograd hands them to the compiler, and graph breaks."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    counts = {"forward": 0, "backward": 0}

    def counting(name):
        def compiler(gm, example_inputs):
            counts[name] += sum(n.target is torch.ops.aten.amax.default for n in gm.graph.nodes)
            return gm

        return compiler

    backend = aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward"))
    cfg = ModelConfig(arch="llama", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2,
                      ffn_hidden_size=128, vocab_size=128, max_seq_len=64)  # fmt: skip
    model = build_model(cfg, TPContext(dist.group.WORLD, fp8=recipe), seed=1)
    torch._dynamo.reset()
    counters.clear()
    for layer in model.layers.values():
        layer.compile(backend=backend)
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], ids[:, 1:]).backward()
    return counts | {"graph_breaks": sum(counters["graph_break"].values())}


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_compiled_layer_casts_each_distinct_operand_once(recipe):
    """One llama layer's 7 float8 linears read 4 distinct inputs (q/k/v's, o's, gate/up's, down's): the
    forward casts the 7 weights and the 4 inputs; rowwise's backward scales each of the 7 output
    gradients twice (rows, columns), the 7 weights again and the 4 inputs along the tokens, tensorwise's
    one scale of each output gradient and weight serves both (x's forward scale is reused). In one graph."""
    counts = run_ranks(1, _compiled_layer_casts, recipe)[0]
    backward = {"rowwise": 2 * 7 + 7 + 4, "tensorwise": 7 + 7}[recipe]
    assert counts == {"forward": 7 + 4, "backward": backward, "graph_breaks": 0}
