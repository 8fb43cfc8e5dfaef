"""The CUDA-only branches, on one GPU: the fused AdamW's skipped step, the compiled loss, the
column-parallel projections that overlap the input gradient's all-reduce with the weight gradients, and
the decode step replayed as a CUDA graph.

Marked `gpu` and skipped without CUDA: `pytest -m gpu tests/test_gpu.py` (bench/gpu_tests.sh) runs them.
Each compares the GPU path with the path the CPU tests already cover. One process, one NCCL rank: every
group has size 1, so the collectives are real calls that reduce nothing.
"""

import re
import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import threefold.model.loss as loss_module
from threefold.config import OptimizerConfig
from threefold.model.loss import linear_cross_entropy
from threefold.optim import Optimizer
from threefold.parallel.layers import ColumnParallelLinear, column_parallel_projections
from threefold.parallel.mesh import Mesh, build_mesh

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def mesh():
    """A one-rank NCCL world on GPU 0, torn down after this module (the CPU tests start their own)."""
    torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield build_mesh(1, 1, 1)
    finally:
        dist.destroy_process_group()


def _assert_near(got: torch.Tensor | None, want: torch.Tensor | None, tol: float, what: str = "") -> None:
    """Largest difference within tol times the largest magnitude: a scale-free tolerance."""
    assert got is not None and want is not None, what
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    assert got.shape == want.shape, what
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= tol * scale, f"{what}: max difference {error:.3g} > {tol} x {scale:.3g}"


# --- Fused AdamW: a non-finite step is skipped on the device, like the CPU's host-side skip -----------


def _optimizer(
    device: str, dtype: torch.dtype, mesh: Mesh, fused_update: bool = False
) -> tuple[Optimizer, list[nn.Parameter]]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (64,)]  # a weight (decayed) and a bias (not decayed)
    params = [nn.Parameter(torch.randn(s, generator=generator).to(device, dtype)) for s in shapes]
    for p in params:
        p.main_grad = torch.zeros(p.shape, dtype=torch.float32, device=device)  # type: ignore[attr-defined]
    cfg = OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, grad_clip=1.0, fused_update=fused_update)
    return Optimizer([(p, 0, p.numel()) for p in params], cfg, mesh=mesh, max_steps=10), params


def _set_grads(params: list[nn.Parameter], seed: int, poison: float | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        grad = torch.randn(p.shape, generator=generator) * 3.0  # a norm well above grad_clip: clipping acts
        if poison is not None:
            grad.view(-1)[5] = poison
        p.main_grad.copy_(grad)  # type: ignore[attr-defined]


def _state(opt: Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    out = {f"param{i}": p.detach().float().cpu().clone() for i, p in enumerate(params)}
    state = opt.state_dict()
    out["step"] = torch.tensor(state.step)
    for name, piece in state.params.items():
        out[f"master:{name}"] = piece.master.detach().cpu().clone()
        for key, value in piece.moments.items():
            out[f"{key}:{name}"] = value.detach().float().cpu().clone().reshape(-1)
    return out


@pytest.mark.parametrize("update", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_adamw_skips_non_finite_steps_like_the_cpu_path(mesh, dtype, update):
    """The GPU's update (threefold/adamw.py's Triton kernel, or torch's fused AdamW) against torch's foreach
    AdamW on the CPU, and its device-side skip against the CPU's host-side one."""
    fused, gpu_params = _optimizer("cuda", dtype, mesh, fused_update=update == "triton")
    plain, cpu_params = _optimizer("cpu", dtype, mesh)
    assert fused.fused and not plain.fused

    def step(index: int, seed: int, *, poison: float | None = None, found_inf: bool | None = None) -> None:
        for opt, params, device in ((fused, gpu_params, "cuda"), (plain, cpu_params, "cpu")):
            _set_grads(params, seed, poison)
            flag = None if found_inf is None else torch.tensor(found_inf, device=device)
            opt.step(index, found_inf=flag)

    def assert_same_update(what: str) -> None:
        gpu, cpu = _state(fused, gpu_params), _state(plain, cpu_params)
        assert gpu.keys() == cpu.keys() and any(k.startswith("exp_avg_sq") for k in gpu)
        for key in gpu:
            # fp32 masters and moments: the fused kernel and the foreach ops differ only in rounding,
            # which a bf16 parameter can turn into one bf16 step.
            bf16_param = key.startswith("param") and dtype == torch.bfloat16
            _assert_near(gpu[key], cpu[key], 1e-2 if bf16_param else 1e-5, f"{what}, {key}")

    step(0, seed=1)
    assert_same_update("after a normal step")
    for skipped in (dict(found_inf=True), dict(poison=float("inf")), dict(poison=float("nan"))):
        before = _state(fused, gpu_params)
        step(1, seed=2, **skipped)
        after = _state(fused, gpu_params)
        for key in before:  # weights, masters, moments and Adam's step count: not one bit moved
            assert torch.equal(before[key], after[key]), f"{skipped} changed {key}"
        assert_same_update(f"after a step skipped by {skipped}")
    step(1, seed=3, found_inf=False)  # the flag given but clear: an ordinary step
    step(2, seed=4)
    assert_same_update("after two more normal steps")
    assert fused.state_dict().step == 3.0, "skipped steps do not count"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gradients_move_into_main_grad_through_the_kernel_as_through_torch(dtype):
    """threefold/parallel/main_grad.py's Triton kernel on the GPU: copy, then add, bit for bit torch's."""
    from threefold.parallel.main_grad import into_main_grad, kernel_runs_on

    assert kernel_runs_on(torch.device("cuda"))
    for n in (1, 4097, 3 * 2**20 + 5):
        first, second = (torch.randn(n, device="cuda").to(dtype) for _ in range(2))
        mine, theirs = (torch.full((n,), float("nan"), device="cuda") for _ in range(2))
        into_main_grad(mine, first, add=False, kernel=True)
        theirs.copy_(first)
        assert torch.equal(mine, theirs), f"copy of {n}"
        into_main_grad(mine, second, add=True, kernel=True)
        theirs.add_(second)
        assert torch.equal(mine, theirs), f"add of {n}"


# --- The compiled loss: torch.compile's fused kernels give the eager chunk's loss and gradients --------


@pytest.mark.parametrize("one_rank_kernel", [False, True], ids=["two-kernels", "one-rank-kernel"])
@pytest.mark.parametrize(
    "dtype,chunks", [(torch.float32, 1), (torch.bfloat16, 4)], ids=["fp32-1chunk", "bf16-4chunks"]
)
def test_compiled_loss_matches_eager(mesh, monkeypatch, dtype, chunks, one_rank_kernel):
    n, h, vocab, rows = 256, 64, 1000, 1024  # 24 padding rows of the vocabulary, never predicted
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", n // chunks * rows)
    monkeypatch.setattr(loss_module, "ONE_RANK_KERNEL", one_rank_kernel)  # one rank here: either path
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=generator).to("cuda", dtype)
    weight = (torch.randn(rows, h, generator=generator) * 0.1).to("cuda", dtype)
    targets = torch.randint(0, vocab, (n,), generator=generator).cuda()

    results = {}
    for compiled in (False, True):
        xi, wi = x.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = linear_cross_entropy(
            xi, wi, targets, tp_group=mesh.tp_group, vocab_size=vocab, compiled=compiled
        )
        (loss * 2.0).backward()  # an incoming gradient other than 1 scales both gradients
        results[compiled] = (loss.detach(), xi.grad, wi.grad)

    eager_loss, eager_gx, eager_gw = results[False]
    compiled_loss, compiled_gx, compiled_gw = results[True]
    assert compiled_gx is not None and compiled_gw is not None
    grad_tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    _assert_near(compiled_gx, eager_gx, grad_tol, "input gradient")
    _assert_near(compiled_gw, eager_gw, grad_tol, "weight gradient")
    assert compiled_gx.dtype == dtype and compiled_gw.dtype == dtype

    # Against PyTorch's cross-entropy, padding rows cut off: in bf16 the logits of a chunk's GEMM may round
    # differently from the whole batch's, and the reference's gradients are fp32.
    fp32 = dtype == torch.float32
    reference = F.cross_entropy((x @ weight.t()).float()[:, :vocab], targets)
    torch.testing.assert_close(compiled_loss, reference, rtol=1e-5 if fp32 else 1e-3, atol=0)
    xr, wr = x.float().requires_grad_(), weight.float().requires_grad_()
    (F.cross_entropy((xr @ wr.t())[:, :vocab], targets) * 2.0).backward()
    _assert_near(compiled_gx, xr.grad, 1e-4 if fp32 else 5e-2, "input gradient vs torch")
    _assert_near(compiled_gw, wr.grad, 1e-4 if fp32 else 5e-2, "weight gradient vs torch")
    assert compiled_gw[vocab:].abs().max() == 0, "padding rows get no gradient"


# --- TP overlap: the projections' fused backward equals autograd's, output left out of the loss too ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_overlapped_column_projections_match_plain_linears(mesh, dtype):
    generator = torch.Generator().manual_seed(0)
    b, s, h, outs = 2, 64, 128, (128, 64, 64)  # q, k, v of a grouped-query attention
    x = torch.randn(b, s, h, generator=generator).to("cuda", dtype)
    weights = [torch.randn(o, h, generator=generator) * 0.05 for o in outs]
    biases = [torch.randn(o, generator=generator) * 0.05 for o in outs]
    upstream = [torch.randn(b, s, o, generator=generator).to("cuda", dtype) for o in outs]

    def run(overlap: bool) -> dict[str, torch.Tensor | None]:
        layers = []
        for w, bias in zip(weights, biases, strict=True):
            layer = ColumnParallelLinear(h, w.shape[0], tp_group=mesh.tp_group, bias=True).to("cuda", dtype)
            assert layer.bias is not None
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(bias)
            layers.append(layer)
        xi = x.clone().requires_grad_()
        if overlap:
            ys = column_parallel_projections(xi, layers, mesh.tp_group)
        else:
            ys = [layer(xi) for layer in layers]  # copy_to_tp is the identity on a group of one
        # The k output takes no part in the loss: its projection gets no gradient at all.
        ((ys[0] * upstream[0]).sum() + (ys[2] * upstream[2]).sum()).backward()
        out: dict[str, torch.Tensor | None] = {f"y{i}": y.detach() for i, y in enumerate(ys)}
        out["x.grad"] = xi.grad
        for i, layer in enumerate(layers):
            out[f"w{i}.grad"] = layer.weight.grad
            out[f"b{i}.grad"] = layer.bias.grad if layer.bias is not None else None
        return out

    plain, overlapped = run(False), run(True)
    assert plain.keys() == overlapped.keys()
    for key, want in plain.items():
        got = overlapped[key]
        if want is None:
            assert got is None, f"{key} should be None (its output took no part in the loss)"
            continue
        assert got is not None and got.dtype == want.dtype, key
        if key.startswith("y"):
            assert torch.equal(got, want), key  # the same F.linear
        else:
            _assert_near(got, want, 1e-5 if dtype == torch.float32 else 1e-2, key)
    assert plain["w1.grad"] is None and plain["w0.grad"] is not None


@pytest.mark.parametrize("causal", [True, False])
def test_flash_ring_blocks_match_fp32_math_on_sliced_rows(causal):
    """Ring attention's flash blocks (bf16, CUDA) against the same blocks in fp32 math, on the slices the
    ring hands them: the second half of a rank's queries and the first half of its keys. A strided
    log-sum-exp once reached the flash backward kernel as is and gave gradients 400x too large."""
    from threefold.parallel.context import _merge, block_attention, block_attention_backward

    torch.manual_seed(0)
    b, a, kv, n, d = 1, 8, 2, 512, 64
    q, k, v, dout = (torch.randn(b, h, n, d, device="cuda") for h in (a, kv, kv, a))
    scale = d**-0.5
    half = n // 2
    results = {}
    for dtype in (torch.bfloat16, torch.float32):  # flash blocks, then plain math
        qd, kd, vd, gd = (t.to(dtype) for t in (q, k, v, dout))
        out = torch.zeros(q.shape, device="cuda")
        lse = torch.full(q.shape[:3], float("-inf"), device="cuda")
        _merge(out, lse, *block_attention(qd, kd, vd, causal=True, scale=scale))
        o, m = block_attention(qd[:, :, half:], kd[:, :, :half], vd[:, :, :half], causal=False, scale=scale)
        _merge(out[:, :, half:], lse[:, :, half:], o, m)
        out = out.to(dtype)
        rows = slice(half, None) if not causal else slice(None)
        keys = slice(None, half) if not causal else slice(None)
        results[dtype] = block_attention_backward(
            gd[:, :, rows], qd[:, :, rows], kd[:, :, keys], vd[:, :, keys], out[:, :, rows],
            lse[:, :, rows], causal=causal, scale=scale,
        )  # fmt: skip
    for got, want, name in zip(results[torch.bfloat16], results[torch.float32], "q k v".split(), strict=True):
        error = (got.float() - want).abs().max() / want.abs().max()
        assert error < 0.02, f"d{name}: relative error {error:.3g}"


# --- Decoding: the whole greedy step replayed as a CUDA graph gives the eager loop's tokens --------------


@pytest.mark.parametrize("compiled", [False, True], ids=["graph", "compiled-graph"])
def test_graphed_greedy_decoding_matches_the_eager_loop(mesh, compiled):
    from threefold.config import ModelConfig
    from threefold.infer.generate import Decoder, generate
    from threefold.infer.load import build_stage
    from threefold.infer.sampling import SamplingParams

    cfg = ModelConfig(arch="llama", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=256, max_seq_len=128)  # fmt: skip
    torch.manual_seed(0)
    model = build_stage(cfg, mesh, device="cuda", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():  # large weights: no near-ties between the greedy choices
            p.normal_(0, 0.3) if p.dim() > 1 else p.fill_(1.0)
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0)
    eager = generate(model, [[7]], greedy)
    eos = eager.tokens[0][20]  # a row that stops part-way, inside the graph's EOS bookkeeping
    decoder = Decoder(cuda_graph=True, compiled=compiled)
    for _ in range(2):  # the second call replays the graph the first captured
        got = generate(model, [[7]], greedy, decoder=decoder)
        assert got.tokens == eager.tokens
        _assert_near(torch.tensor(got.logprobs), torch.tensor(eager.logprobs), 1e-4, "logprobs")
        stopped = generate(model, [[7]], greedy, eos_id=eos, decoder=decoder)
        assert stopped.tokens == [eager.tokens[0][: eager.tokens[0].index(eos)]]
    # Sampling keeps the generator outside the graph: the forward alone is replayed.
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, seed=3)
    assert generate(model, [[7]], sampled, decoder=decoder).tokens == generate(model, [[7]], sampled).tokens


# --- A training step queues its work and returns: nothing in it waits for the device ------------------


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_training_step_never_waits_for_the_device(mesh, micro_batches):
    """Under CUDA's sync-debug mode "error", any read of a device value by the host (an .item(), a bool of
    a device tensor, a blocking copy) raises. The one-pass update's step counts once did (2026-12-04):
    the host then waited for the device at every step, and the GPU sat idle while the next step's
    first kernels were queued."""
    from threefold.bench import synthetic_steps
    from threefold.config import build_config
    from threefold.train import build, train_step

    raw = {
        "model": {"preset": "tiny"},
        "data": {"seq_len": 64},
        "training": {
            "device": "cuda", "dtype": "bfloat16", "micro_batch_size": 2,
            "global_batch_size": 2 * micro_batches, "max_steps": 4,
        },
    }  # fmt: skip
    config = build_config(raw, [], check_paths=False)
    trainer = build(config, mesh, torch.device("cuda"))
    assert trainer.optimizer._one_pass, "the Triton update is the one under test"
    data = synthetic_steps(config, mesh, torch.device("cuda"), 3)
    train_step(trainer, data[0], 0)  # the first step makes the optimizer's state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2):
            stats = train_step(trainer, data[step], step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not stats.read().skipped and stats.read().loss > 0


def test_a_steps_figures_are_read_without_waiting_for_work_queued_after_it(mesh):
    """The loop reads step N's loss once step N + 1 is queued; the read must wait for step N's work alone.
    A plain float(loss) queued its copy behind step N + 1 and waited for it (found 2026-12-05)."""
    import time

    from threefold.bench import synthetic_steps
    from threefold.config import build_config
    from threefold.train import build, train_step

    raw = {
        "model": {"preset": "tiny"},
        "data": {"seq_len": 64},
        "training": {"device": "cuda", "dtype": "bfloat16", "micro_batch_size": 2, "global_batch_size": 2},
    }
    config = build_config(raw, [], check_paths=False)
    trainer = build(config, mesh, torch.device("cuda"))
    data = synthetic_steps(config, mesh, torch.device("cuda"), 2)
    train_step(trainer, data[0], 0)
    torch.cuda.synchronize()
    pending = train_step(trainer, data[1], 1)
    torch.cuda._sleep(2_000_000_000)  # about a second of work queued after the step, as the next step's
    started = time.perf_counter()
    stats = pending.read()
    waited = time.perf_counter() - started
    torch.cuda.synchronize()
    queued = time.perf_counter() - started
    assert waited < 0.25 * queued, (waited, queued)
    assert stats.loss == float(pending.loss) and stats.grad_norm == float(pending.grad_norm)
    assert stats.skipped is False and stats.loss > 0


def test_batches_reach_the_gpu_without_the_host_waiting_for_queued_work():
    """The loop's copy of a step's token ids (8 x 2048 int64, llama-1b's micro-batch 8) is queued behind
    work already on the stream without the host waiting for that work, and arrives intact."""
    import time

    from threefold.train import _to_device

    device = torch.device("cuda")
    batches = [(torch.randint(0, 128256, (8, 2048)), torch.randint(0, 128256, (8, 2048))) for _ in range(2)]
    _to_device(batches, device)  # the first pinned blocks, and CUDA's own start-up, outside the timing
    torch.cuda.synchronize()
    started = time.perf_counter()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the copies
    moved = _to_device(batches, device)
    host_seconds = time.perf_counter() - started
    torch.cuda.synchronize()
    gpu_seconds = time.perf_counter() - started
    assert host_seconds < 0.25 * gpu_seconds, (host_seconds, gpu_seconds)
    for (x, y), (mx, my) in zip(batches, moved, strict=True):
        assert mx.is_cuda and torch.equal(mx.cpu(), x) and torch.equal(my.cpu(), y)


def test_direct_gradients_train_bit_for_bit_as_the_fp32_buffers_on_the_gpu(mesh, monkeypatch):
    """One micro-batch a step alone: the optimizer reads autograd's bf16 gradients (the norm through
    `_foreach_norm(..., dtype=float32)`, the one-pass kernel upcasting them), against the fp32 buffers."""
    import threefold.train as train_module
    from threefold.bench import synthetic_steps
    from threefold.config import Config, build_config

    raw = {
        "model": {"preset": "tiny"},
        "data": {"seq_len": 64},
        "optimizer": {"grad_clip": 0.05},  # clipping acts at every step
        "training": {"device": "cuda", "dtype": "bfloat16", "micro_batch_size": 2, "global_batch_size": 2,
                     "max_steps": 4},
    }  # fmt: skip
    config = build_config(raw, [], check_paths=False)
    runs = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(Config, "direct_grads", property(lambda self: False))
        trainer = train_module.build(config, mesh, torch.device("cuda"))
        assert all(s.direct == direct for s in trainer.grad_syncs.values())
        assert trainer.optimizer._one_pass
        data = synthetic_steps(config, mesh, torch.device("cuda"), 3)
        stats = [train_module.train_step(trainer, data[step], step).read() for step in range(3)]
        params = [p.detach().clone() for c in trainer.chunks.values() for p in c.parameters()]
        runs.append((stats, params))
    (direct_stats, direct_params), (buffered_stats, buffered_params) = runs
    assert min(s.grad_norm for s in direct_stats) > 0.05
    assert direct_stats == buffered_stats
    assert all(torch.equal(a, b) for a, b in zip(direct_params, buffered_params, strict=True))


# --- A compiled layer is one graph on the GPU -------------------------------------------------------


@pytest.mark.parametrize("fp8", [None, "tensorwise"], ids=["bf16", "fp8"])
def test_a_compiled_llama_layer_is_one_graph_on_the_gpu(mesh, fp8):
    """The attention's check of torch's flash switch once returned a Python bool inside the traced code,
    and torch.compile split every layer on the GPU in six graphs around it (2026-12-04): no fusion across
    them, the attention's layouts fixed at graph edges. The CPU never reached that check. One llama layer,
    forward and backward, must now compile without a graph break, in bf16 and with float8 linears."""
    from torch._dynamo.utils import counters

    from threefold.config import ModelConfig
    from threefold.model.transformer import build_model
    from threefold.parallel.layers import TPContext

    cfg = ModelConfig(
        arch="llama", num_layers=1, hidden_size=256, num_heads=4, num_kv_heads=2, ffn_hidden_size=512,
        vocab_size=512, max_seq_len=128,
    )  # fmt: skip
    tp = TPContext(mesh.tp_group, fp8=fp8)
    model = build_model(cfg, tp, device="cuda", dtype=torch.bfloat16, compiled=True)
    tokens = torch.randint(0, 512, (2, 129), device="cuda")
    torch._dynamo.reset()
    counters.clear()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])


@pytest.mark.parametrize("fp8", [None, "rowwise"], ids=["bf16", "rowwise"])
def test_a_compiled_layers_wide_rows_are_reduced_in_one_pass(mesh, monkeypatch, fp8):
    """compile_choices.WideRowReductions: a llama layer 2048 wide with an 8192-wide MLP (llama-1b's),
    compiled with it and with inductor's own choices. With it, kernels that looped over a row (inductor
    keeps rows whole only up to 1024) keep it whole: fewer looped reductions, and persistent ones new,
    among them the norms' (bf16) and the SwiGLU rows' float8 casts (rowwise). Reductions across
    rows (a norm weight's gradient, a column's amax) still loop. Both compiled layers are as close to the
    eager one: float8's rounding of values computed in another order (a 1-ulp flip is 6-12% of a value)
    makes compiled and eager differ by several percent, so the bound is the default's own distance."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.utils import run_and_get_code

    import threefold.model.compile_choices as compile_choices
    from threefold.config import ModelConfig
    from threefold.model.transformer import build_model
    from threefold.parallel.layers import TPContext

    cfg = ModelConfig(
        arch="llama", num_layers=1, hidden_size=2048, num_heads=16, num_kv_heads=4, ffn_hidden_size=8192,
        vocab_size=512, max_seq_len=256,
    )  # fmt: skip
    tp = TPContext(mesh.tp_group, fp8=fp8)
    tokens = torch.randint(0, 512, (2, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    ours = compile_choices.WideRowReductions.should_use_persistent_reduction
    theirs = InductorChoices.should_use_persistent_reduction
    arms = [("eager", False, ours), ("default", True, theirs), ("wide", True, ours)]
    for name, compiled, heuristic in arms:
        # "default": the same wiring (options, compile_choices.applied) with inductor's own heuristic
        monkeypatch.setattr(
            compile_choices.WideRowReductions, "should_use_persistent_reduction", staticmethod(heuristic)
        )
        model = build_model(cfg, tp, seed=1, device="cuda", dtype=torch.bfloat16, compiled=compiled)
        torch._dynamo.reset()

        def step(model=model):
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            return loss

        loss, code = run_and_get_code(step)
        grad = model.layers["0"].mlp.down_proj.weight.grad.float()
        kernels = set(re.findall(r"def (triton_(?:per|red)_\w+)\(", "\n".join(code)))
        results[name] = (loss.item(), grad, kernels)
    eager_loss, eager_grad, _ = results["eager"]
    errors = {}
    for name in ("default", "wide"):
        loss, grad, _ = results[name]
        assert abs(loss / eager_loss - 1) < 0.01, (name, loss, eager_loss)
        errors[name] = float((grad - eager_grad).norm() / eager_grad.norm())
    assert errors["wide"] < 1.25 * errors["default"] + 0.005, errors

    looped = {
        name: {k for k in results[name][2] if k.startswith("triton_red_")} for name in ("default", "wide")
    }
    whole = {name: results[name][2] - looped[name] for name in ("default", "wide")}
    assert len(looped["wide"]) < len(looped["default"]), looped
    moved = "_fused__scaled_mm" if fp8 else "_fused__fused_rms_norm"
    assert (
        any(moved in k and "silu" in k for k in whole["wide"] - whole["default"])
        if fp8
        else any(moved in k for k in whole["wide"] - whole["default"])
    ), (whole, looped)


# --- q/k/v and gate/up stacked into one GEMM each (layers.STACK_PROJECTIONS) -----------------------------


def test_stacked_projections_train_like_separate_ones_on_the_gpu(mesh, monkeypatch):
    """The compiled llama in bf16 with the projections stacked: one graph per layer still, and the loss
    and every gradient as with separate GEMMs to bf16's rounding (the CPU tests check float32 to 1e-5)."""
    from torch._dynamo.utils import counters

    import threefold.parallel.layers as layers_module
    from threefold.config import ModelConfig
    from threefold.model.transformer import build_model
    from threefold.parallel.layers import TPContext

    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, ffn_hidden_size=512,
        vocab_size=512, max_seq_len=128,
    )  # fmt: skip
    tokens = torch.randint(0, 512, (2, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runs, weights = [], None
    for stack in (False, True):
        monkeypatch.setattr(layers_module, "STACK_PROJECTIONS", stack)
        torch._dynamo.reset()
        counters.clear()
        model = build_model(cfg, TPContext(mesh.tp_group), device="cuda", dtype=torch.bfloat16, compiled=True)
        if weights is None:
            weights = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(weights)  # the same starting point, whatever the initialization's device
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (stacked_loss, stacked_grads) = runs
    _assert_near(stacked_loss, loss, 1e-2, "loss")
    for name, grad in grads.items():
        _assert_near(stacked_grads[name], grad, 3e-2, name)


# --- The optimizer's update in one launch (adamw.ONE_LAUNCH) ----------------------------------------------


def test_the_one_launch_update_is_the_launch_per_tensor_on_the_gpu(monkeypatch):
    """Every tensor in one launch, their addresses from tables, writes what one launch per tensor writes,
    bit for bit: masters, moments, bf16 weights and step counts, over three steps with bf16 gradients."""
    import threefold.adamw as adamw

    generator = torch.Generator().manual_seed(0)
    shapes = [(4096, 1024), (1024,), (3, 5), (50_000,)]
    runs = []
    for one in (False, True):
        monkeypatch.setattr(adamw, "ONE_LAUNCH", one)
        generator.manual_seed(0)  # the same tensors and gradients in both runs
        masters = [torch.randn(s, generator=generator).cuda() for s in shapes]
        avgs, squares = [torch.zeros_like(m) for m in masters], [torch.zeros_like(m) for m in masters]
        steps = [torch.zeros((), device="cuda") for _ in shapes]
        weights = [m.bfloat16() for m in masters]
        cache: dict = {}
        for step in range(3):
            grads = [(torch.randn(s, generator=generator) * (step + 1)).cuda().bfloat16() for s in shapes]
            adamw.adamw_update(masters, avgs, squares, steps, grads, weights, [0.1, 0.0, 0.1, 0.0],
                               lr=torch.tensor(0.01, device="cuda"), scale=torch.tensor(1.5, device="cuda"),
                               skip=torch.tensor(False, device="cuda"), betas=(0.9, 0.95), eps=1e-8,
                               cache=cache)  # fmt: skip
        runs.append([t.cpu() for t in (*masters, *avgs, *squares, *weights, *steps)])
        assert bool(cache) == one
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_the_log_window_is_the_device_time_however_late_the_host_reads_it():
    """`DeviceClock`: a window between two marks is the device's time between them (here a kernel that
    spins about 50 ms), not the host's time until it reads it (0.5 s later)."""
    import time

    from threefold.report import DeviceClock

    clock = DeviceClock()
    torch.cuda.synchronize()
    start = clock.mark()
    torch.cuda._sleep(100_000_000)  # cycles: about 50 ms at the H200's 1.98 GHz
    end = clock.mark()
    time.sleep(0.5)
    seconds = clock.seconds(start, end)
    assert 0.01 < seconds < 0.3, seconds


# --- FlashAttention-4 (training.attention_backend = "fa4") ---------------------------------------------


def _cute_package_or_skip(kernels: Callable[[], Any]) -> None:
    """Skip unless this is a Hopper or Blackwell GPU and `kernels()` (threefold.model.fa4's or
    threefold.model.quack_mlp's) imports its package."""
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("threefold runs FA4 and QuACK on Hopper and Blackwell")
    try:
        kernels()
    except RuntimeError as e:
        pytest.skip(str(e))


def _fa4_or_skip() -> None:
    from threefold.model.fa4 import kernels

    _cute_package_or_skip(kernels)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_fa4_attention_matches_sdpa(compiled, heads, kv_heads):
    """threefold's FA4 operators, eager and compiled (one graph), against torch's SDPA in fp32 on the same
    bf16 inputs: the output and the gradients of q, k and v (k, v shared by query heads under GQA)."""
    from torch._dynamo.utils import counters

    from threefold.model.fa4 import fa4_attention

    _fa4_or_skip()
    generator = torch.Generator("cuda").manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=generator).bfloat16().requires_grad_()

    b, s, d = 2, 384, 64
    q, k, v = leaf(b, heads, s, d), leaf(b, kv_heads, s, d), leaf(b, kv_heads, s, d)
    dy = torch.randn(b, heads, s, d, device="cuda", generator=generator).bfloat16()
    run = fa4_attention
    if compiled:
        torch._dynamo.reset()
        counters.clear()
        run = torch.compile(fa4_attention, fullgraph=True)
    out = run(q, k, v)
    out.backward(dy)
    got = [out, q.grad, k.grad, v.grad]
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want_out = F.scaled_dot_product_attention(*ref, is_causal=True, enable_gqa=heads != kv_heads)
    want_out.backward(dy.float())
    for name, a, w in zip(["out", "dq", "dk", "dv"], got, [want_out] + [t.grad for t in ref], strict=True):
        _assert_near(a, w, 2e-2, name)


def test_a_compiled_llama_trains_with_fa4_as_with_torchs_attention(mesh, monkeypatch):
    """The whole compiled llama, bf16, attention by FA4 against torch's choice: one graph per layer, FA4's
    kernels called once a layer each way, and the loss and every gradient to bf16's rounding."""
    from torch._dynamo.utils import counters

    from threefold.config import ModelConfig
    from threefold.model.fa4 import kernels
    from threefold.model.transformer import build_model, use_attention_backend
    from threefold.parallel.layers import TPContext

    _fa4_or_skip()
    import types

    import threefold.model.fa4 as fa4_module

    calls = {"_flash_attn_fwd": 0, "_flash_attn_bwd": 0}
    real = kernels()

    def counted(name: str):
        def call(*args, **kwargs):
            calls[name] += 1
            return getattr(real, name)(*args, **kwargs)

        return call

    # The package's functions look themselves up by module name, so the module itself stays untouched.
    counting = types.SimpleNamespace(**{name: counted(name) for name in calls})
    monkeypatch.setattr(fa4_module, "kernels", lambda: counting)
    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, ffn_hidden_size=512,
        vocab_size=512, max_seq_len=256,
    )  # fmt: skip
    tokens = torch.randint(0, 512, (2, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runs, weights = [], None
    try:
        for backend in ("auto", "fa4"):
            use_attention_backend(backend)
            torch._dynamo.reset()
            counters.clear()
            tp = TPContext(mesh.tp_group)
            model = build_model(cfg, tp, device="cuda", dtype=torch.bfloat16, compiled=True)
            if weights is None:
                weights = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(weights)
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
            runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    finally:
        use_attention_backend("auto")
        torch._dynamo.reset()
    assert calls == {"_flash_attn_fwd": 2, "_flash_attn_bwd": 2}, calls
    (loss, grads), (fa4_loss, fa4_grads) = runs
    _assert_near(fa4_loss, loss, 1e-2, "loss")
    for name, grad in grads.items():
        _assert_near(fa4_grads[name], grad, 3e-2, name)


# --- QuACK's SwiGLU-epilogue GEMMs (training.mlp_backend = "quack") ------------------------------------


def _quack_or_skip() -> None:
    from threefold.model.quack_mlp import kernels

    _cute_package_or_skip(kernels)


def test_the_quack_mlp_matches_the_mlp_in_fp32():
    """The QuACK MLP on bf16 operands against the same MLP in fp32: the output and the gradients of x and
    of the three weights."""
    from threefold.model.quack_mlp import fused_mlp

    _quack_or_skip()
    generator = torch.Generator("cuda").manual_seed(0)

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = torch.randn(*shape, device="cuda", generator=generator) * scale
        return t.bfloat16().requires_grad_()

    n, h, f = 1024, 256, 512
    x, gate, up, down = leaf(2, n // 2, h), leaf(f, h, scale=h**-0.5), leaf(f, h, scale=h**-0.5), leaf(h, f)
    dy = torch.randn(2, n // 2, h, device="cuda", generator=generator).bfloat16()
    out = fused_mlp()(x, gate, up, down)
    out.backward(dy)
    ref = [t.detach().float().requires_grad_() for t in (x, gate, up, down)]
    want = F.linear(F.silu(F.linear(ref[0], ref[1])) * F.linear(ref[0], ref[2]), ref[3])
    want.backward(dy.float())
    got = [out, x.grad, gate.grad, up.grad, down.grad]
    wants = [want] + [t.grad for t in ref]
    for name, a, w in zip(["out", "dx", "dgate", "dup", "ddown"], got, wants, strict=True):
        _assert_near(a, w, 2e-2, name)


def test_a_compiled_llama_trains_with_the_quack_mlp_as_with_the_default(mesh):
    """The whole compiled llama, bf16, its MLP through QuACK against the default: one graph per layer, and
    the loss and every gradient to bf16's rounding."""
    from torch._dynamo.utils import counters

    from threefold.config import ModelConfig
    from threefold.model.transformer import build_model
    from threefold.parallel.layers import TPContext

    _quack_or_skip()
    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, ffn_hidden_size=512,
        vocab_size=512, max_seq_len=256,
    )  # fmt: skip
    tokens = torch.randint(0, 512, (2, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    runs, weights, breaks = [], None, {}
    try:
        for backend in ("auto", "quack"):
            torch._dynamo.reset()
            counters.clear()
            tp = TPContext(mesh.tp_group, mlp_backend=backend)
            model = build_model(cfg, tp, device="cuda", dtype=torch.bfloat16, compiled=True)
            if weights is None:
                weights = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(weights)
            loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            breaks[backend] = dict(counters["graph_break"])
            runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    finally:
        torch._dynamo.reset()
    assert breaks == {"auto": {}, "quack": {}}, breaks
    (loss, grads), (quack_loss, quack_grads) = runs
    _assert_near(quack_loss, loss, 1e-2, "loss")
    for name, grad in grads.items():
        _assert_near(quack_grads[name], grad, 3e-2, name)


def _document_tokens(rows: list[list[int]], s: int, eos: int = 3) -> torch.Tensor:
    tokens = torch.full((len(rows), s), 7, dtype=torch.int64)
    for row, ends in enumerate(rows):
        tokens[row, ends] = eos
    return tokens


def _assert_matches_attention_per_document(out, q, k, v, dy, pieces, label: str = "") -> None:
    """`out` and q, k, v's gradients (after `out.backward(dy)`) against fp32 SDPA run on each document
    alone; `pieces` lists the documents as (row, start, end)."""
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = torch.empty(out.shape, device=out.device)
    for row, a, z in pieces:
        want[row, :, a:z] = F.scaled_dot_product_attention(
            *(t[row : row + 1, :, a:z] for t in ref), is_causal=True, enable_gqa=True
        )[0]
    want.backward(dy.float())
    wants = [want] + [t.grad for t in ref]
    for name, got, w in zip(["out", "dq", "dk", "dv"], [out, q.grad, k.grad, v.grad], wants, strict=True):
        _assert_near(got, w, 2e-2, name + label)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fa4_document_attention_matches_sdpa_run_one_document_at_a_time(compiled):
    """FA4's variable-length kernels through threefold's operators, eager and compiled (one graph for two
    micro-batches of different document counts), against fp32 SDPA on each document alone: the output
    and the gradients of q, k and v (GQA)."""
    from threefold.model.attention import document_spans
    from threefold.model.fa4 import fa4_document_attention

    _fa4_or_skip()
    generator = torch.Generator("cuda").manual_seed(0)
    b, s, d, heads, kv_heads = 2, 384, 64, 8, 2
    run = fa4_document_attention
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(fa4_document_attention, fullgraph=True)
    for rows in ([[40, 200], [383]], [[0, 1, 130, 131, 300], [10, 250]]):
        host = _document_tokens(rows, s)
        spans = document_spans(host, 3)
        device_spans = spans.cuda()
        torch._dynamo.maybe_mark_dynamic(device_spans, 0)
        q, k, v = (
            torch.randn(b, h, s, d, device="cuda", generator=generator).bfloat16().requires_grad_()
            for h in (heads, kv_heads, kv_heads)
        )
        dy = torch.randn(b, heads, s, d, device="cuda", generator=generator).bfloat16()
        out = run(q, k, v, device_spans)
        out.backward(dy)
        bounds = spans.tolist()
        ends = zip(bounds[:-1], bounds[1:], strict=True)
        pieces = [(lo // s, lo % s, hi - (lo // s) * s) for lo, hi in ends]
        _assert_matches_attention_per_document(out, q, k, v, dy, pieces, f" ({len(bounds) - 1} documents)")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("pinned", [False, True], ids=["torchs-tiles", "pinned-tiles"])
def test_flex_document_attention_matches_sdpa_per_document(compiled, pinned, monkeypatch):
    """FlexAttention through `attend` with the block mask built from tiles, with torch's Triton tiles and
    (on Hopper) the pinned FLEX_TILES, against fp32 SDPA on each document alone: output and q, k, v
    gradients."""
    from threefold.model import attention
    from threefold.model.attention import FLEX_TILES, attend, document_ids, document_mask, flex_kernel_options

    monkeypatch.setattr(attention, "PIN_FLEX_TILES", pinned)

    generator = torch.Generator("cuda").manual_seed(0)
    b, s, d, heads, kv_heads = 2, 384, 64, 8, 2
    run = torch.compile(attend, fullgraph=True) if compiled else attend
    torch._dynamo.reset()
    for rows in ([[40, 200], [383]], [[0, 1, 127, 128, 300], [10, 250]]):
        doc_ids = document_ids(_document_tokens(rows, s).cuda(), 3)
        q, k, v = (
            torch.randn(b, h, s, d, device="cuda", generator=generator).bfloat16().requires_grad_()
            for h in (heads, kv_heads, kv_heads)
        )
        hopper = torch.cuda.get_device_capability() == (9, 0)
        assert flex_kernel_options(q) is (FLEX_TILES if pinned and hopper else None)
        assert flex_kernel_options(q[:, :, :-1]) is None  # off FLEX_BLOCK: torch's tiles
        dy = torch.randn(b, heads, s, d, device="cuda", generator=generator).bfloat16()
        out = run(q, k, v, mask=document_mask(doc_ids))
        out.backward(dy)
        pieces = []
        for row in range(b):
            for doc in doc_ids[row].unique().tolist():
                at = (doc_ids[row] == doc).nonzero().flatten()
                pieces.append((row, int(at[0]), int(at[-1]) + 1))
        _assert_matches_attention_per_document(out, q, k, v, dy, pieces)


def test_a_compiled_llama_trains_document_masked_with_fa4_as_with_flex(mesh):
    """The compiled llama, bf16, document masking with positions restarting: attention through FA4's
    variable-length kernels (the spans found on the host) against FlexAttention's block mask, for two
    micro-batches of different document counts: no graph break, the loss and every gradient."""
    from torch._dynamo.utils import counters

    from threefold.config import ModelConfig
    from threefold.model.attention import document_ids, document_spans
    from threefold.model.transformer import build_model, use_attention_backend
    from threefold.parallel.layers import TPContext

    _fa4_or_skip()
    cfg = ModelConfig(
        arch="llama", num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, ffn_hidden_size=512,
        vocab_size=512, max_seq_len=256,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    batches = []
    for rows in ([[20, 100], [255]], [[5, 60, 61, 200], [128]]):
        tokens = torch.randint(8, 512, (2, 257), generator=generator)
        tokens[:, :-1] = torch.where(_document_tokens(rows, 256) == 3, 3, tokens[:, :-1])
        batches.append(tokens)
    runs, weights = [], None
    try:
        for backend in ("auto", "fa4"):
            use_attention_backend(backend)
            torch._dynamo.reset()
            counters.clear()
            model = build_model(
                cfg, TPContext(mesh.tp_group), device="cuda", dtype=torch.bfloat16, compiled=True
            )
            if weights is None:
                weights = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(weights)
            losses = []
            for tokens in batches:
                x, y = tokens[:, :-1], tokens[:, 1:]
                spans = document_spans(x, 3).cuda() if backend == "fa4" else None
                if spans is not None:
                    torch._dynamo.maybe_mark_dynamic(spans, 0)
                x, y = x.cuda(), y.cuda()
                loss = model(x, y, doc_ids=document_ids(x, 3), doc_spans=spans, reset_positions=True)
                loss.backward()
                losses.append(loss.detach())
            assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
            runs.append((losses, {n: p.grad for n, p in model.named_parameters()}))
    finally:
        use_attention_backend("auto")
        torch._dynamo.reset()
    (losses, grads), (fa4_losses, fa4_grads) = runs
    for i, (a, w) in enumerate(zip(fa4_losses, losses, strict=True)):
        _assert_near(a, w, 1e-2, f"loss {i}")
    for name, grad in grads.items():
        _assert_near(fa4_grads[name], grad, 3e-2, name)


def _write_documents(path, eos: int) -> None:
    """A prepared dataset of random ids in documents of 5 to 60 tokens, each closed by `eos`: written
    directly, so the GPU machine needs no tokenizer package."""
    import numpy as np
    from conftest import write_token_dataset

    rng = np.random.default_rng(0)
    splits = []
    for n in (4096, 1024):
        tokens = rng.integers(0, eos, n)
        ends = np.cumsum(rng.integers(5, 61, n)) - 1
        tokens[ends[ends < n]] = eos
        splits.append(tokens)
    write_token_dataset(path, *splits, vocab_size=eos + 1, eos_token_id=eos)


def test_a_document_masked_fa4_step_never_waits_for_the_device(mesh, tmp_path):
    """Document masking through FA4: the training loop finds each micro-batch's document boundaries from
    its host batch and the executor copies them through page-locked memory, so under CUDA's sync-debug
    mode "error" two steps run without the host reading anything back from the device."""
    from threefold.config import build_config
    from threefold.model.transformer import use_attention_backend
    from threefold.train import _to_device, build, train_loader, train_step

    _fa4_or_skip()
    data = tmp_path / "documents"
    _write_documents(data, eos=50256)
    raw = {
        "model": {"preset": "tiny"},
        "data": {"path": str(data), "seq_len": 128, "document_masking": True},
        "training": {
            "device": "cuda", "dtype": "bfloat16", "micro_batch_size": 2, "global_batch_size": 4,
            "max_steps": 4, "attention_backend": "fa4",
        },
    }  # fmt: skip
    config = build_config(raw, [])
    try:
        trainer = build(config, mesh, torch.device("cuda"))
        loader = train_loader(config, mesh)
        device = torch.device("cuda")
        batches = loader.next_batch()
        spans = trainer.executor.document_spans(batches)
        assert spans is not None and all(s.device.type == "cpu" for s in spans)
        train_step(trainer, _to_device(batches, device), 0, spans=spans)  # makes the optimizer's state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in (1, 2):
                batches = loader.next_batch()
                spans = trainer.executor.document_spans(batches)
                stats = train_step(trainer, _to_device(batches, device), step, spans=spans)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert not stats.read().skipped and stats.read().loss > 0
    finally:
        use_attention_backend("auto")
