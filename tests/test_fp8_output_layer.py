"""The output layer's GEMMs in float8 (training.fp8_output_layer; threefold.model.loss) on the CPU: the
loss and both gradients against a float64 emulation of the float8 math written here, against float32
within float8's error, through the Triton kernels under the interpreter, over several chunks, under
tensor parallelism, and the config's rules. torch._scaled_mm runs on the CPU, so this is the GPU's code
with another kernel (tests/test_fp8.py says more).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_ranks
from float8_reference import emulated, nearest, relative_error, train_fp8_on_cpu
from tiny import tiny_config

from threefold.model import loss as loss_module
from threefold.parallel import fp8

RECIPES = ["tensorwise", "rowwise"]
N, H, VOCAB = 64, 32, 48
"""Tokens, hidden size and vocabulary of the cases: every float8 GEMM dimension a multiple of 16."""


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=gen)
    x[5] *= 30  # an outlier token: scaled per token, it costs the other tokens no precision
    w = torch.randn(VOCAB, H, generator=gen) * 0.3
    targets = torch.randint(0, VOCAB, (N,), generator=gen)
    return x, w, targets


def _emulated_output_layer(x, w, targets, chunk: int) -> tuple:
    """Loss, grad_x and grad_w of mean cross-entropy over x @ w^T, in float64, with each GEMM's operands
    rounded as the float8 output layer rounds them: x and w in e4m3 scaled along each GEMM's contraction
    (per token and per vocabulary row for the logits; per column of w over the vocabulary for grad_x; per
    column of each chunk of x over its tokens for grad_w), and softmax - one_hot rounded to e5m2 after
    multiplying by 2^15 (no amax: its magnitude is at most 1)."""
    x, w = x.double(), w.double()
    logits = emulated(x, fp8.E4M3, 1) @ emulated(w, fp8.E4M3, 1).t()
    loss = F.cross_entropy(logits, targets)
    g = torch.softmax(logits, dim=-1) - F.one_hot(targets, VOCAB).double()
    g8 = nearest(g * 2.0**15, fp8.E5M2) / 2.0**15 / N
    x8 = torch.cat([emulated(x[s : s + chunk], fp8.E4M3, 0) for s in range(0, N, chunk)])
    return loss, g8 @ emulated(w, fp8.E4M3, 0), g8.t() @ x8


def _run_output_layer(rank: int, world: int, chunk_rows: int, kernels: bool) -> dict:
    """The float8 output layer's loss and gradients (fp32 compute dtype) in chunks of `chunk_rows`
    logit rows (before rounding down to whole 16s), with the chunk functions it called."""
    x, w, targets = _case()
    loss_module.CHUNK_ELEMENTS = chunk_rows * VOCAB  # forked rank: no effect on other tests
    calls = []
    for name in ("_eager_chunk", "_kernel_chunk"):
        original = getattr(loss_module, name)
        setattr(loss_module, name, lambda *a, f=original, n=name: calls.append((n, a[0].shape[0])) or f(*a))
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_module.linear_cross_entropy(
        xi, wi, targets, tp_group=dist.group.WORLD, vocab_size=VOCAB, compiled=kernels, fp8=True
    )
    (loss * 3.0).backward()
    with torch.no_grad():
        again = loss_module.linear_cross_entropy(
            x, w, targets, tp_group=dist.group.WORLD, vocab_size=VOCAB, compiled=kernels, fp8=True
        )
    return {"loss": loss.detach(), "again": again, "grad_x": xi.grad / 3.0, "grad_w": wi.grad / 3.0,
            "calls": calls}  # fmt: skip


@pytest.mark.parametrize("chunk_rows,chunk", [(64, 64), (20, 16)], ids=["one-chunk", "four-chunks"])
def test_the_float8_output_layer_is_the_emulated_float8_math(chunk_rows, chunk):
    """Loss, input and weight gradients match the float64 emulation (float8 rounding aside from
    float32's last bits), the chunk rows are whole 16s, and all three sit float8's error away from
    float32: the GEMMs really ran in float8."""
    got = run_ranks(1, _run_output_layer, chunk_rows, False, timeout=60)[0]
    assert [rows for _, rows in got["calls"]] == [chunk] * (N // chunk) * 2  # training, then evaluation
    x, w, targets = _case()
    loss, grad_x, grad_w = _emulated_output_layer(x, w, targets, chunk)
    assert abs(got["loss"].item() - loss.item()) < 1e-5 * loss.item()
    assert torch.equal(got["again"], got["loss"])  # evaluation scores the same logits
    assert relative_error(got["grad_x"], grad_x) < 2e-3
    assert relative_error(got["grad_w"], grad_w) < 2e-3
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(xr @ wr.t(), targets)
    ref.backward()
    assert 1e-5 < abs(got["loss"].item() / ref.item() - 1) < 0.02
    assert 1e-3 < relative_error(got["grad_x"], xr.grad) < 0.1
    assert 1e-3 < relative_error(got["grad_w"], wr.grad) < 0.1


def test_the_logits_gradient_keeps_the_softmax_tail_that_e4m3_would_flush():
    """Why e5m2 at a fixed scale: a row of softmax - one_hot whose target holds 0.1 and one other token
    the rest but a tail of 1e-7 each (a long vocabulary's tail sums to a share worth keeping): e4m3,
    even scaled to the row's own amax, rounds the tail to zero; e5m2 keeps it."""
    g = torch.full((1, 4096), 1e-7, dtype=torch.float64)
    g[0, 0] = -0.9
    g[0, 1] = 0.9 - g[0, 2:].sum()
    tail_e5m2 = nearest(g * loss_module.GRAD_CAST, loss_module.GRAD_FORMAT)[0, 2:] / loss_module.GRAD_CAST
    tail_e4m3 = emulated(g, fp8.E4M3, 1)[0, 2:]
    assert torch.all(tail_e4m3 == 0)
    assert torch.allclose(tail_e5m2, g[0, 2:], rtol=0.13)
    assert loss_module.GRAD_CAST * 1.0 <= torch.finfo(fp8.E5M2).max < 2 * loss_module.GRAD_CAST


TP_VOCAB = 64
"""The vocabulary of the sharded case: 32 rows a rank at tp 2, a multiple of 16."""


def _sharded_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight whose second half is 2^-14 the scale of its first: alone, that half's columns would take
    scales 2^14 larger; scaled with the whole weight's, much of it lies in e4m3's subnormals (below 2^-6)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, H, generator=gen)
    w = torch.randn(TP_VOCAB, H, generator=gen) * 0.3
    w[TP_VOCAB // 2 :] *= 2.0**-14
    return x, w, torch.randint(0, TP_VOCAB, (N,), generator=gen)


def _run_sharded(rank: int, world: int) -> dict:
    """The float8 output layer over this rank's rows of the sharded case's weight, in chunks of 16 tokens
    at any tp: the loss, x's gradient summed over the ranks, and the whole weight's gradient."""
    x, w, targets = _sharded_case()
    local = TP_VOCAB // world
    loss_module.CHUNK_ELEMENTS = 16 * local  # forked rank: no effect on other tests
    xi, wi = x.clone().requires_grad_(), w[rank * local : (rank + 1) * local].clone().requires_grad_()
    loss = loss_module.linear_cross_entropy(
        xi, wi, targets, tp_group=dist.group.WORLD, vocab_size=TP_VOCAB, fp8=True
    )
    loss.backward()
    share = xi.grad.clone()  # this rank's rows' share of g W
    dist.all_reduce(xi.grad)  # the model's TP region sums the shares
    rows = [torch.empty_like(wi.grad) for _ in range(world)]
    dist.all_gather(rows, wi.grad)
    return {"loss": loss.detach(), "grad_x": xi.grad, "share": share, "grad_w": torch.cat(rows)}


def test_tensor_parallel_ranks_scale_the_weight_as_one_process_does():
    """The weight's column scales for x's gradient come from its amax over every rank's rows (its vocabulary
    rows' scales for the logits are each rank's own anyway), so tp 2 rounds each weight exactly as tp 1
    does: the same loss and gradients up to summation order. The second rank's share of x's gradient is
    the emulation's with the whole weight's column scales, far from it with its shard's own."""
    one = run_ranks(1, _run_sharded, timeout=60)[0]
    two, second = run_ranks(2, _run_sharded, timeout=60)
    assert abs(two["loss"].item() / one["loss"].item() - 1) < 1e-6
    assert relative_error(two["grad_x"], one["grad_x"]) < 1e-6
    assert relative_error(two["grad_w"], one["grad_w"]) < 1e-6
    x, w, targets = _sharded_case()
    x8, w = emulated(x.double(), fp8.E4M3, 1), w.double()
    whole = emulated(w, fp8.E4M3, 0)
    shards = torch.cat([emulated(half, fp8.E4M3, 0) for half in w.chunk(2)])
    g = torch.softmax(x8 @ emulated(w, fp8.E4M3, 1).t(), dim=-1) - F.one_hot(targets, TP_VOCAB).double()
    g8 = nearest(g * 2.0**15, fp8.E5M2)[:, TP_VOCAB // 2 :] / 2.0**15 / N
    assert relative_error(second["share"], g8 @ whole[TP_VOCAB // 2 :]) < 1e-5
    assert relative_error(second["share"], g8 @ shards[TP_VOCAB // 2 :]) > 1e-3


INTERPRETED = """
import sys
sys.path.insert(0, "tests")
import numpy as np
import torch
import triton.runtime.interpreter as interpreter
from distributed import run_ranks
import test_fp8_output_layer as t

# Triton's interpreter (3.7) rounds fp32 to float8 without carrying a rounded-up mantissa into the
# exponent (127.9 -> 64 in e5m2). The GPU converts exactly (cvt.rn); so does torch's cast, used here.
FORMATS = {"fp8e5": torch.float8_e5m2, "fp8e4nv": torch.float8_e4m3fn}
inexact = interpreter._convert_float
def exact(data, input_dtype, output_dtype, rounding_mode):
    if output_dtype.name in FORMATS and input_dtype.primitive_bitwidth == 32:
        values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
        return values.to(FORMATS[output_dtype.name]).view(torch.uint8).numpy().reshape(data.shape)
    return inexact(data, input_dtype, output_dtype, rounding_mode)
interpreter._convert_float = exact
for rows in (64, 20):
    eager = run_ranks(1, t._run_output_layer, rows, False)[0]
    kernel = run_ranks(1, t._run_output_layer, rows, True)[0]
    assert {n for n, _ in kernel["calls"]} == {"_kernel_chunk"}, kernel["calls"]
    assert torch.allclose(kernel["loss"], eager["loss"], rtol=1e-6), rows
    for name in ("grad_x", "grad_w"):
        error = t.relative_error(kernel[name], eager[name])
        assert error < 2e-3, (rows, name, error)
print("all cases passed")
"""


def test_the_float8_output_layer_through_the_triton_kernels():
    """The same cases through the Triton kernels the GPU runs (the gradient kernel writing e5m2, the
    transposed cast reading it), under Triton's interpreter with its float8 rounding put right: they
    agree with the eager path."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "all cases passed" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("out_dtype", ["*bf16", "*fp32"], ids=["finish", "fold"])
@pytest.mark.parametrize("has_acc", [False, True])
def test_the_scaled_sum_kernel_compiles_for_hopper(out_dtype, has_acc):
    """loss._scaled_sum's kernel compiled for sm_90 by Triton's own compiler (no GPU needed), with the
    argument types the loss launches it with: the backward's finish (bf16 out, the incoming gradient as
    factor) and the forward's fold of held products into the fp32 sum."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from threefold.model._loss_kernels import scaled_sum_kernel

    factor = "*fp32" if out_dtype == "*bf16" else "*bf16"  # unused in a fold: the loss passes a scale
    values = {"acc": "*fp32" if has_acc else "*bf16", "first": "*bf16", "first_scale": "*bf16",
              "second": "*bf16", "second_scale": "*bf16", "factor": factor, "out": out_dtype,
              "num_cols": "i32", "numel": "i32"}  # fmt: skip
    constants = {"HAS_ACC": has_acc, "HAS_SECOND": True, "HAS_FACTOR": out_dtype == "*bf16",
                 "BLOCK": loss_module.BLOCK}  # fmt: skip
    signature = {p.name: "constexpr" if p.is_constexpr else values[p.name] for p in scaled_sum_kernel.params}
    source = ASTSource(fn=scaled_sum_kernel, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    ptx = compiled.asm["ptx"]
    assert ptx.count("ld.global") >= 4 and "st.global" in ptx


# --- Tensor parallelism, training from the config, and the config's rules --------------------------


@pytest.fixture(scope="module")
def layouts():
    """tp 1 and tp 2 of test_fp8's model, float8 layers with and (tp 1) without the float8 output layer."""
    from test_fp8 import _loss_and_grads

    output = {"output": dict(fp8_output_layer=True)}
    one = run_ranks(1, _loss_and_grads, RECIPES, output | {"layers": {}}, timeout=120)[0]
    two = run_ranks(2, _loss_and_grads, RECIPES, output, timeout=120)[0]
    return one, two


@pytest.mark.parametrize("recipe", RECIPES)
def test_tensor_parallel_float8_output_layer_matches_one_process(layouts, recipe):
    """Through the model, whatever the layers' recipe: x is the same on every rank, the weight's scale
    spans the ranks' shards and g's is fixed, so tp 2 rounds as tp 1 does and reproduces it closely
    (summation order aside), while the output layer's float8 puts every gradient float8's error away from
    the run that keeps it in the compute dtype."""
    one, two = layouts
    loss, grads = two[(recipe, "output")]
    ref_loss, ref_grads = one[(recipe, "output")]
    plain_loss, plain_grads = one[(recipe, "layers")]
    assert abs(loss - ref_loss) < 1e-6 * abs(ref_loss)
    assert 1e-6 < abs(ref_loss / plain_loss - 1) < 0.02
    assert grads.keys() == ref_grads.keys() == plain_grads.keys()
    for name, ref in ref_grads.items():
        assert relative_error(grads[name], ref) < 1e-4, name
        assert 1e-3 < relative_error(ref, plain_grads[name]) < 0.2, name


def _config(data, run, tp: int, output: bool, **model):
    shape = dict(hidden_size=64, ffn_hidden_size=128, vocab_size=50272) | model  # 50272 / 2 = 16 * 1571
    training = dict(dtype="bfloat16", device="auto", fp8="rowwise", fp8_output_layer=output, max_steps=3)
    return tiny_config(data, run, tp=tp, model=shape, training=training)


def test_training_with_the_float8_output_layer_from_the_config(sonnets_dataset, tmp_path):
    """`training.fp8_output_layer` reaches the loss through train.build: tp 1 and tp 2 train alike, and
    the losses differ from float8 layers alone by float8's rounding only."""
    runs = {}
    for tp, output in [(1, False), (1, True), (2, True)]:
        config = _config(sonnets_dataset, tmp_path / f"tp{tp}-{output}", tp, output)
        runs[(tp, output)] = run_ranks(tp, train_fp8_on_cpu, config, timeout=120)[0]
    one, two, layers = runs[(1, True)], runs[(2, True)], runs[(1, False)]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=2e-3, atol=0)
    gaps = [abs(a / b - 1) for a, b in zip(one["losses"], layers["losses"], strict=True)]
    assert 0 < max(gaps) < 0.02, gaps


@pytest.mark.parametrize(
    "training,model,message",
    [
        (dict(fp8=False), {}, r"fp8_output_layer = true needs training.fp8 = 'tensorwise' or 'rowwise' \(got "
                              r"False\)"),
        ({}, dict(vocab_size=50257), r"model.vocab_size \(50257\) padded to a multiple of parallel.tp_size "
                                     r"\(2\), over tp_size \(the output layer's local vocabulary\) = 25129 "
                                     r"is not"),
    ],
    ids=["no-fp8", "vocab"],
)  # fmt: skip
def test_fp8_output_layer_config_errors_name_the_values(sonnets_dataset, tmp_path, training, model, message):
    shape = dict(hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=50272) | model
    raw = dict(dtype="bfloat16", device="auto", fp8="rowwise", fp8_output_layer=True) | training
    with pytest.raises(ValueError, match=message):
        tiny_config(sonnets_dataset, tmp_path, tp=2, model=shape, training=raw)


def test_the_float8_output_layer_under_pipeline_and_zero3_matches_one_process(sonnets_dataset, tmp_path):
    """pp 2 (the last stage holds the output layer) with dp 2 under ZeRO-3 (its weight gathered in bf16
    before the float8 casts) trains as one process does with the same float8 output layer, up to float8's
    rounding: each data-parallel rank scales the weight gradients' operands over its own tokens. Held to:
    the losses within 2e-3, the first step's gradient norm within 1e-3, and the weights after three steps
    closer to the one-process float8 run's than a bf16 run's are. (An element-wise bound on the weights
    held until 2026-12-07, when the same code failed it in a fresh environment: Adam turns the rounding of
    the smallest gradients into lr-sized steps, a few elements of a tensor 8-20 bf16 rounding steps apart.)"""

    def run(pp: int, dp: int, zero: int, fp8_recipe: str | bool = "rowwise") -> dict:
        config = tiny_config(
            sonnets_dataset, tmp_path / f"pp{pp}-dp{dp}-{fp8_recipe}", pp=pp, dp=dp, zero=zero,
            model=dict(hidden_size=64, ffn_hidden_size=128, vocab_size=50272, num_layers=4),
            training=dict(dtype="bfloat16", device="auto", fp8=fp8_recipe, fp8_output_layer=bool(fp8_recipe),
                          max_steps=3),
        )  # fmt: skip
        out = run_ranks(pp * dp, train_fp8_on_cpu, config, timeout=120)
        weights = {k: v for o in out for k, v in o["weights"].items()}
        return {"losses": out[0]["losses"], "norms": out[0]["norms"], "weights": weights}

    def distance(a: dict, b: dict) -> float:
        return sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a) ** 0.5

    one, split, bf16 = run(1, 1, 0), run(2, 2, 3), run(1, 1, 0, False)
    torch.testing.assert_close(torch.tensor(split["losses"]), torch.tensor(one["losses"]), rtol=2e-3, atol=0)
    assert split["norms"][0] == pytest.approx(one["norms"][0], rel=1e-3)
    assert split["weights"].keys() == one["weights"].keys()
    # 0.057 against 0.328, the norms 8e-8 apart (dev machine, 2026-12-07); with the ZeRO-3 reduce-scatter
    # summing rather than averaging the ranks' gradients, the norm is off (the check fails)
    assert distance(split["weights"], one["weights"]) < 0.75 * distance(bf16["weights"], one["weights"])
