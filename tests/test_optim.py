"""The optimizer's own state: state_dict() / load_state_dict() across ZeRO slicings, and what it refuses."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import nn

from threefold.config import OptimizerConfig
from threefold.optim import Optimizer, OptimizerState, ParamSlice
from threefold.parallel.data_parallel import GradSync
from threefold.parallel.mesh import build_mesh

# No clipping: the global norm sums its pieces in an order that depends on the slicing, and the update
# should not. Weight decay on, so both parameter groups matter.
CFG = OptimizerConfig(lr=0.05, warmup_steps=0, weight_decay=0.1, grad_clip=0.0)
SEVERAL_BUCKETS = 16 * 4 / 2**20  # 16 elements a bucket: every parameter split between the ranks


def _build(seed: int, *, bucket_mb: float, zero: bool):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4), nn.LayerNorm(4))
    mesh = build_mesh(1, dist.get_world_size(), 1)
    sync = GradSync(list(model.parameters()), dp_group=mesh.dp_group, bucket_mb=bucket_mb, zero=zero)
    names = {p: n for n, p in model.named_parameters()}
    opt = Optimizer(sync.owned_ranges(), CFG, mesh=mesh, max_steps=10, zero=zero, names=names)
    return model, sync, opt


def _step(model, sync, opt, step: int) -> None:
    torch.manual_seed(100 * step + dist.get_rank())  # each data-parallel rank sees its own batch
    model(torch.randn(3, 8)).square().mean().backward()
    sync.finish()
    opt.step(step)
    sync.gather_params()
    sync.quiesce()
    sync.reset()


def _whole(state: OptimizerState, model: nn.Module) -> OptimizerState:
    """A copy of every parameter's whole state on every rank, joined from ZeRO slices if need be."""
    params = {}
    for name, p in model.named_parameters():
        whole = {k: torch.zeros(p.numel()) for k in ("master", *Optimizer.moment_names)}
        piece = state.params.get(name)
        if piece is not None:
            for key, t in [("master", piece.master), *piece.moments.items()]:
                whole[key][piece.start : piece.end] = t
        if state.dp_sharded:  # each element is held by one rank: a sum joins them
            for t in whole.values():
                dist.all_reduce(t)
        master = whole.pop("master")
        params[name] = ParamSlice(0, p.numel(), master, whole if state.step else {})
    return OptimizerState(state.step, params)


def _copy_weights(into: nn.Module, source: nn.Module) -> None:
    """The model's part of a restore: the optimizer restores only the ranges it updates."""
    with torch.no_grad():
        for p_into, p_source in zip(into.parameters(), source.parameters(), strict=True):
            p_into.copy_(p_source)


def _round_trip(rank: int, world: int, bucket_mb: float, zero: bool) -> dict:
    model_a, sync_a, opt_a = _build(0, bucket_mb=SEVERAL_BUCKETS, zero=True)
    _step(model_a, sync_a, opt_a, 0)
    saved = _whole(opt_a.state_dict(), model_a)
    # Another model (other initial weights) under another slicing loads the joined state ...
    model_b, sync_b, opt_b = _build(1, bucket_mb=bucket_mb, zero=zero)
    _copy_weights(model_b, model_a)
    opt_b.load_state_dict(saved)
    loaded = _whole(opt_b.state_dict(), model_b)
    # ... and one under the same slicing the slices themselves, unjoined; there the weights come from the
    # masters alone (fp32 masters are the weights), each rank's all-gathered to the others.
    model_c, sync_c, opt_c = _build(1, bucket_mb=SEVERAL_BUCKETS, zero=True)
    opt_c.load_state_dict(opt_a.state_dict())
    sync_c.gather_params()
    sync_c.quiesce()
    models = [(model_a, sync_a, opt_a), (model_b, sync_b, opt_b), (model_c, sync_c, opt_c)]
    for model, sync, opt in models:
        _step(model, sync, opt, 1)
    names = {id(p): n for m, _, _ in models for n, p in m.named_parameters()}
    return {
        "ranges": [[(names[id(p)], a, b) for p, a, b in o.ranges] for o in (opt_a, opt_b)],
        "saved": saved,
        "loaded": loaded,
        "after": [{n: p.detach().clone() for n, p in m.named_parameters()} for m, _, _ in models],
        "steps": [o.state_dict().step for _, _, o in models],
    }


@pytest.mark.parametrize("bucket_mb,zero", [(1.0, True), (1.0, False)], ids=["one-bucket-zero", "no-zero"])
def test_state_round_trip_under_another_slicing_gives_identical_next_steps(bucket_mb, zero):
    results = run_ranks(2, _round_trip, bucket_mb, zero)
    assert any(r["ranges"][0] != r["ranges"][1] for r in results), "the two slicings differ"
    for r in results:
        for name, piece in r["saved"].params.items():
            got = r["loaded"].params[name]
            assert torch.equal(got.master, piece.master), name
            assert got.moments.keys() == piece.moments.keys() == {"exp_avg", "exp_avg_sq"}, name
            assert all(torch.equal(got.moments[k], v) for k, v in piece.moments.items()), name
        assert r["steps"] == [2.0, 2.0, 2.0]
        reference, *others = r["after"]
        for after in others:
            for name, w in reference.items():
                assert torch.equal(after[name], w), name  # bit for bit: moments and step count came along


def _refusals(rank: int, world: int) -> dict:
    model, sync, opt = _build(0, bucket_mb=1.0, zero=False)
    _step(model, sync, opt, 0)
    good = opt.state_dict()
    live = {
        n: (s.master.clone(), {k: v.clone() for k, v in s.moments.items()}) for n, s in good.params.items()
    }

    def variant(name: str, **change) -> OptimizerState:
        return OptimizerState(good.step, good.params | {name: replace(good.params[name], **change)})

    first = "0.weight"
    bad = {
        "missing": OptimizerState(good.step, {n: s for n, s in good.params.items() if n != first}),
        "short": variant(first, end=good.params[first].end - 1, master=good.params[first].master[:-1]),
        "some-moments": variant(first, moments={}),
        "other-optimizer": variant(first, moments={"momentum_buffer": good.params[first].master}),
        "wrong-size": variant(first, master=torch.zeros(3)),
    }
    errors = {}
    for key, state in bad.items():
        try:
            opt.load_state_dict(state)
            errors[key] = "no error"
        except ValueError as e:
            errors[key] = str(e)
        now = opt.state_dict()
        for n, (master, moments) in live.items():
            assert torch.equal(now.params[n].master, master), f"{key}: {n} changed"
            assert all(torch.equal(now.params[n].moments[k], v) for k, v in moments.items()), key
    return errors


def test_unfit_state_is_refused_before_anything_changes():
    errors = run_ranks(1, _refusals)[0]
    assert "lacks parameters ['0.weight']" in errors["missing"]
    assert "do not cover this rank's 0..128" in errors["short"]
    assert (
        "has moments for" in errors["some-moments"] and "but not for ['0.weight']" in errors["some-moments"]
    )
    assert (
        "holds ['momentum_buffer']; this optimizer keeps ['exp_avg', 'exp_avg_sq']"
        in errors["other-optimizer"]
    )
    assert "master has 3 elements for the 128" in errors["wrong-size"]


def _fresh_state(rank: int, world: int) -> dict:
    model_a, sync_a, opt_a = _build(0, bucket_mb=1.0, zero=False)
    state = opt_a.state_dict()
    empty = {n: (s.start, s.end, dict(s.moments)) for n, s in state.params.items()}
    # A state without moments (saved before the first step) also resets an optimizer that has stepped.
    model_b, sync_b, opt_b = _build(1, bucket_mb=1.0, zero=False)
    _step(model_b, sync_b, opt_b, 0)
    _copy_weights(model_b, model_a)
    opt_b.load_state_dict(state)
    reset = opt_b.state_dict()
    for model, sync, opt in [(model_a, sync_a, opt_a), (model_b, sync_b, opt_b)]:
        _step(model, sync, opt, 0)
    same = all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True))
    reset_moments = [s.moments for s in reset.params.values()]
    return {"step": state.step, "empty": empty, "reset": (reset.step, reset_moments), "same": same}


def test_state_before_the_first_step_has_no_moments_and_loads():
    r = run_ranks(1, _fresh_state)[0]
    assert r["step"] == 0.0
    assert r["empty"]["0.weight"] == (0, 128, {}) and all(m == {} for *_, m in r["empty"].values())
    assert r["reset"] == (0.0, [{}] * 6), "loading a state without moments starts the optimizer afresh"
    assert r["same"], "the next step is the first step of a fresh optimizer"


INTERPRETED = """
import sys
import torch
from torch.testing import assert_close
import threefold.adamw
from threefold.adamw import adamw_update

torch.set_num_threads(1)  # the reference on one thread: see the note on the masters' tolerance below

one_launch = sys.argv[1] == "one"
grad_dtype = getattr(torch, sys.argv[2])
cache = {}  # the one-launch tables, kept between steps as the optimizer keeps them

torch.manual_seed(0)
shapes, decays = [5000, 2049, 7], [0.1, 0.0, 0.1]  # several programs, a partial block, a tiny tensor
masters = [torch.randn(n) for n in shapes]
reference = [m.clone() for m in masters]
groups = [{"params": [reference[0], reference[2]], "weight_decay": 0.1},
          {"params": [reference[1]], "weight_decay": 0.0}]
adam = torch.optim.AdamW(groups, lr=0.01, betas=(0.9, 0.95), eps=1e-8, foreach=True)
avgs, squares = [torch.zeros(n) for n in shapes], [torch.zeros(n) for n in shapes]
steps = [torch.zeros(()) for _ in shapes]
weights = [m.to(torch.bfloat16) for m in masters[:2]] + [None]  # bf16 copies; the last is its own master
# With one launch, the same update by one launch per tensor alongside: the same arithmetic, so bit for bit.
alone = [[None if t is None else t.clone() for t in ts] for ts in (masters, avgs, squares, steps, weights)]


def update(state, launch_all, grads, skip):  # state: masters, avgs, squares, steps, weights
    threefold.adamw.ONE_LAUNCH = launch_all
    ms, avs, sqs, counts, ws = state
    adamw_update(ms, avs, sqs, counts, grads, ws, decays, lr=torch.tensor(0.01), scale=torch.tensor(2.0),
                 skip=torch.tensor(skip), betas=(0.9, 0.95), eps=1e-8, cache=cache)


for step in range(6):
    grads = [(torch.randn(n) * 3).to(grad_dtype) for n in shapes]
    skip = step == 2  # a skipped step: nothing moves, the step counts included
    if step == 4:  # a state tensor replaced (as loading a checkpoint may): its new address is used
        avgs[0] = avgs[0].clone()
    update((masters, avgs, squares, steps, weights), one_launch, grads, skip)
    if one_launch:
        update(alone, False, grads, skip)
        for mine, each in zip((masters, avgs, squares, steps, weights), alone):
            for i, (x, y) in enumerate(zip(mine, each)):
                assert x is y is None or torch.equal(x, y), (step, i)
    if not skip:
        for r, g in zip(reference, grads):
            r.grad = g.float() / 2.0  # clipping: the kernel divides by the scale as it reads
        adam.step()
    for i, r in enumerate(reference):
        state = adam.state[r]
        assert steps[i].item() == state["step"].item() == step + (0 if step >= 2 else 1), (step, i)
        assert_close(avgs[i], state["exp_avg"], rtol=1e-6, atol=1e-7)
        assert_close(squares[i], state["exp_avg_sq"], rtol=1e-6, atol=1e-7)
        # Masters to a thousandth of the learning rate: fp32 rounding is ~1e-7 here, while any error of the
        # arithmetic (an update 0.1% off, eps 100x, a decay 1% off, a step count one off) is over 1.3e-5 at
        # the first step it shows.
        # One CI run failed with 1e-6 here: 3.04e-6 on 434 of tensor 0's elements. The error was torch's
        # AdamW, the reference: its first step without Triton came out 3.02e-6 off in 4 of 481 processes
        # here (2026-12-06), where counted only in elements 2500-4999, the half torch gives a second CPU
        # thread (bench/results/issue18-2026-12-06-s21/); on one thread, 0 of 800. Hence one thread, and
        # this margin.
        assert_close(masters[i], r, rtol=1e-6, atol=1e-5, msg=lambda text: f"step {step}, tensor {i}: {text}")
    for w, m in zip(weights[:2], masters[:2]):
        assert_close(w.float(), m, rtol=2**-7, atol=0)  # the master in bf16, within one step
assert len(cache) == (2 if one_launch else 0)  # two groups: bf16 weights, own master
print("same")
"""


@pytest.mark.parametrize("launch,grad_dtype", [("each", "float32"), ("one", "float32"), ("one", "bfloat16")])
def test_the_one_pass_kernel_matches_torch_adamw_under_the_interpreter(launch, grad_dtype):
    """The CUDA kernel of `optimizer.fused_update` (threefold/_adamw_kernel.py), run by Triton's
    interpreter on the CPU, against torch's AdamW over six steps: masters, moments, step counts and the
    bf16 weights, with weight decay on and off, clipping, and a skipped step. One launch per tensor, or
    one for all (adamw.ONE_LAUNCH: two groups here, bf16 weights and a master that is its own weight,
    with fp32 or bf16 gradients), whose address tables follow a state tensor replaced mid-run."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED, launch, grad_dtype], env=env, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]


WIRED = """
import os
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close
from threefold.config import OptimizerConfig
from threefold.optim import Optimizer
from threefold.parallel.data_parallel import GradSync
from threefold.parallel.mesh import build_mesh

torch.set_num_threads(1)  # torch's AdamW, the reference, on one thread: see INTERPRETED's masters
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
mesh = build_mesh(1, 1, 1)
runs = []
for one_pass, direct in ((True, False), (False, False), (True, True)):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 300), nn.Tanh(), nn.Linear(300, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    sync = GradSync(list(model.parameters()), dp_group=mesh.dp_group, bucket_mb=1.0, zero=0, direct=direct)
    cfg = OptimizerConfig(lr=0.05, warmup_steps=2, weight_decay=0.1, grad_clip=0.5)
    source = sync.owned_grads if direct else None
    opt = Optimizer(sync.owned_ranges(), cfg, mesh=mesh, max_steps=10, grads=source)
    opt._one_pass = one_pass  # on the CPU only torch's AdamW is chosen; the interpreter runs the kernel
    runs.append((model, opt, sync))
for step in range(5):
    torch.manual_seed(step)
    grads = [torch.randn(p.shape).bfloat16() for p in runs[0][0].parameters()]  # what backward gives
    for model, opt, sync in runs:
        for p, g in zip(model.parameters(), grads):
            if sync.direct:
                p.grad = g.clone()  # the kernel reads the bf16 gradient itself
            else:
                p.main_grad.copy_(g)
        with torch.profiler.profile() as prof:
            opt.step(step, found_inf=torch.tensor(step == 2))
        sync.reset()
        # Nothing read back to the host (on CUDA that would be a wait for the device every step).
        if opt._one_pass:  # (torch's CPU path reads the skip flag on the host, as it must there)
            assert "aten::_local_scalar_dense" not in {e.key for e in prof.key_averages()}, step
(kernel_model, kernel_opt, _), (torch_model, torch_opt, _), (direct_model, direct_opt, _) = runs
mine, theirs, direct = kernel_opt.state_dict(), torch_opt.state_dict(), direct_opt.state_dict()
assert mine.step == theirs.step == 4.0, (mine.step, theirs.step)
for name, piece in theirs.params.items():
    assert_close(mine.params[name].master, piece.master, rtol=1e-5, atol=1e-6)
    for key in Optimizer.moment_names:
        assert_close(mine.params[name].moments[key], piece.moments[key], rtol=1e-5, atol=1e-7)
for a, b in zip(kernel_model.parameters(), torch_model.parameters()):
    assert_close(a.float(), b.float(), rtol=2**-7, atol=0)  # bf16 weights, within one step
# The kernel reading bf16 gradients directly: the same values as their fp32 copies, so bit for bit.
assert direct.step == mine.step
for name, piece in mine.params.items():
    assert torch.equal(direct.params[name].master, piece.master), name
    for key in Optimizer.moment_names:
        assert torch.equal(direct.params[name].moments[key], piece.moments[key]), (name, key)
for a, b in zip(direct_model.parameters(), kernel_model.parameters()):
    assert torch.equal(a, b)
dist.destroy_process_group()
print("same")
"""


def test_the_optimizer_with_its_one_pass_kernel_matches_torch_adamw_under_the_interpreter():
    """The Optimizer's one-pass path (state made on the first step, the decays, the bf16 weights, the
    clipping scale, a skipped step) through the kernel under Triton's interpreter, against the same
    Optimizer on torch's AdamW; and the kernel reading direct bf16 gradients, bit for bit as their fp32
    copies."""
    import os
    import socket
    import subprocess
    import sys

    pytest.importorskip("triton")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PORT": str(port)}
    done = subprocess.run([sys.executable, "-c", WIRED], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("grad", ["bf16", "fp32"])
def test_the_one_launch_kernel_compiles_for_hopper(grad):
    """`adamw_tensors_kernel` turns table entries into pointers: the interpreter accepts what the GPU
    back end may not, so it is compiled here for sm_90 (Triton brings its own ptxas; no GPU needed) with
    the argument types `adamw_update` passes, and its loads and stores are there."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from threefold._adamw_kernel import adamw_tensors_kernel
    from threefold.adamw import BLOCK

    pointers = {"block_tensor": "*i32", "first_block": "*i32", "sizes": "*i64", "decays": "*fp32",
                "lr": "*fp32", "scale": "*fp32", "keep": "*fp32"}  # fmt: skip
    floats = {"beta1", "beta2", "log2_beta1", "log2_beta2", "eps"}
    constexprs = {"GRAD": tl.bfloat16 if grad == "bf16" else tl.float32, "WEIGHT": tl.bfloat16,
                  "HAS_WEIGHT": True, "BLOCK": BLOCK}  # fmt: skip
    signature = {}
    for p in adamw_tensors_kernel.params:
        if p.name in constexprs:
            signature[p.name] = "constexpr"
        else:
            signature[p.name] = pointers.get(p.name, "fp32" if p.name in floats else "*i64")
    source = ASTSource(fn=adamw_tensors_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    assert "ld.global" in ptx and "st.global" in ptx
