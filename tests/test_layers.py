"""Each tensor-parallel layer against its unsharded torch.nn reference: outputs and every gradient."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_ranks
from tiny import TINY_LLAMA

from threefold.model import loss as loss_module
from threefold.parallel.comm import copy_to_tp, gather_from_sequence
from threefold.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
    column_parallel_projections,
    shard_of,
    stacked_projections,
)

TOL = dict(rtol=1e-5, atol=1e-6)


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every operator dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _gather(local: torch.Tensor, dim: int, full_size: int | None = None) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    full = torch.cat(parts, dim=dim)
    return full.narrow(dim, 0, full_size) if full_size is not None else full


def _mlp_pair(rank: int, world: int, sequence_parallel: bool) -> None:
    torch.manual_seed(0)
    b, s, h, f = 2, 8, 12, 16
    ref_up, ref_down = torch.nn.Linear(h, f), torch.nn.Linear(f, h)
    x = torch.randn(b, s, h)
    grad_out = torch.randn(b, s, h)
    group = dist.group.WORLD

    up = ColumnParallelLinear(h, f, tp_group=group, bias=True)
    down = RowParallelLinear(f, h, tp_group=group, bias=True, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        for mine, ref in ((up, ref_up), (down, ref_down)):
            mine.weight.copy_(shard_of(ref.weight, mine.weight, rank, world))
            mine.bias.copy_(shard_of(ref.bias, mine.bias, rank, world))

    x_ref = x.clone().requires_grad_()
    y_ref = ref_down(F.gelu(ref_up(x_ref)))
    y_ref.backward(grad_out)

    if sequence_parallel:
        x_local = x.chunk(world, dim=1)[rank].clone().requires_grad_()
        y = down(F.gelu(up(gather_from_sequence(x_local, group))))
        y.backward(grad_out.chunk(world, dim=1)[rank])
        torch.testing.assert_close(y, y_ref.chunk(world, dim=1)[rank], **TOL)
        torch.testing.assert_close(_gather(x_local.grad, 1), x_ref.grad, **TOL)
        bias_grad = down.bias.grad.clone()
        dist.all_reduce(bias_grad)  # partial over sequence chunks: what the trainer does for SP params
        torch.testing.assert_close(bias_grad, ref_down.bias.grad, **TOL)
    else:
        x_local = x.clone().requires_grad_()
        y = down(F.gelu(up(copy_to_tp(x_local, group))))
        y.backward(grad_out)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(x_local.grad, x_ref.grad, **TOL)
        torch.testing.assert_close(down.bias.grad, ref_down.bias.grad, **TOL)
    torch.testing.assert_close(_gather(up.weight.grad, 0), ref_up.weight.grad, **TOL)
    torch.testing.assert_close(_gather(up.bias.grad, 0), ref_up.bias.grad, **TOL)
    torch.testing.assert_close(_gather(down.weight.grad, 1), ref_down.weight.grad, **TOL)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_column_row_parallel_linear(tp, sequence_parallel):
    run_ranks(tp, _mlp_pair, sequence_parallel)


def _embedding(rank: int, world: int, vocab: int, sequence_parallel: bool) -> None:
    torch.manual_seed(1)
    b, s, h = 2, 8, 6
    ref = torch.nn.Embedding(vocab, h)
    ids = torch.randint(0, vocab, (b, s))
    ids[0, :4] = vocab - 1  # the last id lives on the rank holding the padding
    grad_out = torch.randn(b, s, h)
    group = dist.group.WORLD
    emb = VocabParallelEmbedding(vocab, h, tp_group=group, sequence_parallel=sequence_parallel)
    assert emb.padded_vocab_size % world == 0 and emb.padded_vocab_size >= vocab
    with torch.no_grad():
        emb.weight.copy_(shard_of(ref.weight, emb.weight, rank, world))
    y_ref = ref(ids)
    y_ref.backward(grad_out)
    y = emb(ids)
    if sequence_parallel:
        torch.testing.assert_close(y, y_ref.chunk(world, dim=1)[rank], **TOL)
        y.backward(grad_out.chunk(world, dim=1)[rank])
    else:
        torch.testing.assert_close(y, y_ref, **TOL)
        y.backward(grad_out)
    full_grad = _gather(emb.weight.grad, 0)
    torch.testing.assert_close(full_grad[:vocab], ref.weight.grad, **TOL)
    assert torch.all(full_grad[vocab:] == 0), "padding rows must get no gradient"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_vocab_parallel_embedding(tp, sequence_parallel):
    run_ranks(tp, _embedding, 37, sequence_parallel)  # 37 is prime: padded on every tp > 1


def _linear_cross_entropy(rank: int, world: int, vocab: int, chunk_rows: int, kernels: bool) -> None:
    chunks = []  # which chunk function ran (forked rank: the patch stays here)
    for name in ("_kernel_chunk", "_eager_chunk"):
        original = getattr(loss_module, name)
        setattr(loss_module, name, lambda *a, _f=original, _n=name: chunks.append(_n) or _f(*a))
    torch.manual_seed(2)
    n, h = 24, 8
    padded = -(-vocab // world) * world
    x = torch.randn(n, h) * 2
    full_weight = torch.randn(vocab, h)
    targets = torch.randint(0, vocab, (n,))
    targets[:3] = vocab - 1

    ref_x, ref_w = x.clone().requires_grad_(), full_weight.clone().requires_grad_()
    ref = F.cross_entropy(ref_x @ ref_w.t(), targets)
    (ref * 3).backward()

    # Junk in the padding rows: they must neither change the loss nor get a gradient.
    padded_weight = torch.cat([full_weight, torch.full((padded - vocab, h), 5.0)])
    local_w = padded_weight.chunk(world)[rank].clone().requires_grad_()
    local_x = x.clone().requires_grad_()
    loss_module.CHUNK_ELEMENTS = chunk_rows * local_w.shape[0]  # forked rank: no effect on other tests
    loss_module.BLOCK = loss_module.ONE_RANK_BLOCK = 8  # rows of several blocks, the last part padding
    loss = loss_module.linear_cross_entropy(
        copy_to_tp(local_x, dist.group.WORLD),
        local_w,
        targets,
        tp_group=dist.group.WORLD,
        vocab_size=vocab,
        compiled=kernels,
    )
    torch.testing.assert_close(loss, ref, **TOL)
    (loss * 3).backward()
    torch.testing.assert_close(local_x.grad, ref_x.grad, **TOL)
    full_grad = _gather(local_w.grad, 0)
    torch.testing.assert_close(full_grad[:vocab], ref_w.grad, **TOL)
    assert torch.all(full_grad[vocab:] == 0), "padding rows must never be predicted"
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        again = loss_module.linear_cross_entropy(
            local_x, local_w, targets, tp_group=dist.group.WORLD, vocab_size=vocab, compiled=kernels
        )
    torch.testing.assert_close(again, ref.detach(), **TOL)
    expected = "_kernel_chunk" if kernels else "_eager_chunk"
    assert chunks and set(chunks) == {expected}, chunks


CROSS_ENTROPY_CASES = [(1, 37, 24), (1, 37, 5), (2, 40, 7), (2, 37, 24), (4, 37, 5), (4, 64, 1), (4, 5, 3)]
"""(tp, vocab, chunk rows): (4, 5, 3) leaves the last rank only padding columns (its max is -inf)."""


@pytest.mark.parametrize("tp,vocab,chunk_rows", CROSS_ENTROPY_CASES)
def test_linear_cross_entropy(tp, vocab, chunk_rows):
    """Chunked output layer + vocab-parallel loss against F.cross_entropy on the full logits, through the
    in-place fp32 path that runs where Triton does not."""
    run_ranks(tp, _linear_cross_entropy, vocab, chunk_rows, False)


INTERPRETED = """
import sys
sys.path.insert(0, "tests")
from distributed import run_ranks
import test_layers
for case in test_layers.CROSS_ENTROPY_CASES:
    run_ranks(case[0], test_layers._linear_cross_entropy, *case[1:], True)
run_ranks(1, test_layers._ce_bf16, True)
test_layers.loss_module.ONE_RANK_KERNEL = True  # one rank's fused kernel: the same cases, and against two
for case in test_layers.CROSS_ENTROPY_CASES:
    if case[0] == 1:
        run_ranks(1, test_layers._linear_cross_entropy, *case[1:], True)
run_ranks(1, test_layers._ce_bf16, True)
test_layers._one_rank_kernel_against_two()
print("all cases passed")
"""


@pytest.mark.parametrize(
    "out,block,warps", [("*bf16", 4096, 16), ("*fp8e5", 4096, 16), ("*bf16", 16384, 32), ("*bf16", 8192, 8)]
)
def test_the_one_rank_kernel_compiles_for_hopper(out, block, warps):
    """loss.one_rank_kernel compiled for sm_90 by Triton's own compiler (no GPU needed), with the argument
    types the loss launches it with at llama-1b's chunk (8,371 rows of 128,256 logits): the bf16 gradient
    over the logits, and the float8 output layer's e5m2 gradient; a few of the settings the bench times."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from threefold.model._loss_kernels import one_rank_kernel

    values = {"logits": "*bf16", "out": out, "row_stride": "i32", "hot_col": "*i64", "row_loss": "*fp32",
              "scale": "fp32", "rows": "i32", "num_valid": "i32", "num_cols": "i32"}  # fmt: skip
    rows, vocab, programs = 8371, 128256, 132
    constants = {"ROWS_PER_PROGRAM": -(-rows // programs), "VALID_BLOCKS": -(-vocab // block),
                 "BLOCKS": -(-vocab // block), "BLOCK": block}  # fmt: skip
    signature = {p.name: "constexpr" if p.is_constexpr else values[p.name] for p in one_rank_kernel.params}
    # What the launch's specialization tells the compiler: the tensors' addresses, the row stride and the
    # column counts (128,256 = 16 x 8,016) are multiples of 16, so a thread reads 16 bytes at once.
    names = [p.name for p in one_rank_kernel.params]
    aligned = ("logits", "out", "row_stride", "hot_col", "row_loss", "num_valid", "num_cols")
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=one_rank_kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = compiled.asm["ptx"]
    assert "ld.global.v4" in ptx and "st.global.v" in ptx and "ex2.approx" in ptx  # e5m2: 8 bytes a thread


def _one_rank_kernel_against_two() -> None:
    """One rank's fused kernel (no reductions, ONE_RANK_KERNEL on) against the two kernels that TP ranks
    run, given reductions that do nothing: the same loss and gradient on one chunk, fp32 and bf16, with
    padding columns, a row whose target another rank would own, and programs that take three rows and two."""
    assert loss_module.ONE_RANK_KERNEL
    torch.manual_seed(5)
    loss_module.BLOCK = loss_module.ONE_RANK_BLOCK = 8  # several blocks a row, the last part padding
    rows, cols, num_valid = 5, 40, 37
    targets = torch.randint(0, num_valid, (rows,))
    owned = torch.ones(rows, dtype=torch.bool)
    owned[2] = False
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(rows, cols) * 4).to(dtype)
        logits[:, num_valid:] = 1e4  # junk in the padding: neither read as a logit nor given a gradient
        fused = loss_module._kernel_chunk(logits.clone(), targets, owned, num_valid, 0.25, dtype, None, None)
        two = loss_module._kernel_chunk(
            logits.clone(), targets, owned, num_valid, 0.25, dtype, lambda t: None, lambda t: None
        )
        assert fused[1] is not None and two[1] is not None
        torch.testing.assert_close(fused[0], two[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused[1], two[1], rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-7)
        assert torch.all(fused[1][:, num_valid:] == 0)
        # the row another rank owns gets no one-hot: its gradient is the softmax alone, all positive
        assert torch.all(fused[1][2, :num_valid] > 0) and (fused[1][0, :num_valid] < 0).sum() == 1


def test_linear_cross_entropy_through_the_triton_kernels():
    """The same cases through the Triton kernels that run on the GPU (`compiled`), here under Triton's
    interpreter on the CPU, in fp32, and one in bf16 (the gradient written over the bf16 logits); then
    one rank's cases through its fused kernel (ONE_RANK_KERNEL)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "all cases passed" in done.stdout, done.stderr[-3000:]


def test_linear_cross_entropy_bf16():
    run_ranks(1, _ce_bf16, False)


def _ce_bf16_chunked_weight_grad(rank: int, world: int, chunk_rows: int) -> None:
    """The bf16 weight gradient over several chunks, to the bit: each chunk's bf16 product summed in fp32
    in chunk order (the first written, not added to zeros), times the incoming gradient, rounded once."""
    torch.manual_seed(4)
    n, h, vocab = 12, 16, 40
    x = torch.randn(n, h).bfloat16().requires_grad_()
    w = torch.randn(vocab, h).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    grads = []  # each chunk's logit gradient, as the loss computed it
    original = loss_module._eager_chunk
    loss_module._eager_chunk = lambda *a: (lambda out: grads.append(out[1]) or out)(original(*a))
    loss_module.CHUNK_ELEMENTS = chunk_rows * vocab  # forked rank: no effect on other tests
    loss = loss_module.linear_cross_entropy(x, w, targets, tp_group=dist.group.WORLD, vocab_size=vocab)
    (loss * 3.0).backward()
    assert len(grads) == -(-n // chunk_rows) > 1
    total = torch.zeros(vocab, h)
    for i, g in enumerate(grads):
        total += g.t() @ x.detach()[i * chunk_rows : (i + 1) * chunk_rows]
    assert w.grad is not None and torch.equal(w.grad, (total * 3.0).bfloat16())


@pytest.mark.parametrize("chunk_rows", [5, 4])
def test_the_chunked_bf16_weight_gradient_is_summed_in_fp32(chunk_rows):
    run_ranks(1, _ce_bf16_chunked_weight_grad, chunk_rows)


def _ce_bf16(rank: int, world: int, kernels: bool) -> None:
    torch.manual_seed(3)
    x = torch.randn(10, 16).bfloat16().requires_grad_()
    w = torch.randn(33, 16).bfloat16().requires_grad_()
    targets = torch.randint(0, 33, (10,))
    loss_module.BLOCK = loss_module.ONE_RANK_BLOCK = 8  # forked rank: several blocks a row
    loss = loss_module.linear_cross_entropy(
        x, w, targets, tp_group=dist.group.WORLD, vocab_size=33, compiled=kernels
    )
    assert loss.dtype == torch.float32
    ref = F.cross_entropy((x @ w.t()).float(), targets)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    F.cross_entropy(xr @ wr.t(), targets).backward()
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), wr.grad, rtol=2e-2, atol=2e-3)


def _three_projections(rank: int, world: int, bias: bool) -> tuple:
    """q, k, v shaped projections of one input: torch.nn.Linear references, this rank's
    ColumnParallelLinear shards of them, the input (b, s, h) and an output gradient for each."""
    torch.manual_seed(1)
    b, s, h, outs = 2, 8, 12, (16, 8, 8)
    refs = [torch.nn.Linear(h, o, bias=bias) for o in outs]
    x = torch.randn(b, s, h)
    grads_out = [torch.randn(b, s, o) for o in outs]
    layers = [ColumnParallelLinear(h, o, tp_group=dist.group.WORLD, bias=bias) for o in outs]
    with torch.no_grad():
        for mine, ref in zip(layers, refs, strict=True):
            mine.weight.copy_(shard_of(ref.weight, mine.weight, rank, world))
            if bias:
                mine.bias.copy_(shard_of(ref.bias, mine.bias, rank, world))
    return refs, layers, x, grads_out


def _projections(rank: int, world: int, bias: bool, use_all: bool) -> None:
    """Three projections of one input (q, k, v shaped) against torch.nn.Linear on the full input."""
    refs, layers, x, grads_out = _three_projections(rank, world, bias)
    group = dist.group.WORLD
    used = range(len(layers)) if use_all else [0, 2]  # an output left out of the loss gets no gradient

    x_ref = x.clone().requires_grad_()
    ys_ref = [ref(x_ref) for ref in refs]
    torch.autograd.backward([ys_ref[i] for i in used], [grads_out[i] for i in used])

    x_local = x.clone().requires_grad_()
    ys = column_parallel_projections(x_local, layers, group)
    for i, (y, y_ref) in enumerate(zip(ys, ys_ref, strict=True)):
        torch.testing.assert_close(y, y_ref.chunk(world, dim=-1)[rank], **TOL, msg=f"output {i}")
    log = _OpLog()
    with log:
        torch.autograd.backward(
            [ys[i] for i in used], [grads_out[i].chunk(world, dim=-1)[rank] for i in used]
        )
    torch.testing.assert_close(x_local.grad, x_ref.grad, **TOL)
    for i, (mine, ref) in enumerate(zip(layers, refs, strict=True)):
        if i not in used:
            assert mine.weight.grad is None
            continue
        torch.testing.assert_close(
            mine.weight.grad, shard_of(ref.weight.grad, mine.weight, rank, world), **TOL
        )
        if bias:
            torch.testing.assert_close(mine.bias.grad, shard_of(ref.bias.grad, mine.bias, rank, world), **TOL)

    # The overlap itself: the reduction starts after the input gradient's GEMMs and is waited for only
    # after every weight gradient's GEMM.
    reduction = "_c10d_functional.all_reduce"
    names = log.names
    assert names.count(reduction) == 1 and names.count("_c10d_functional.wait_tensor") == 1, names
    start, wait = names.index(reduction), names.index("_c10d_functional.wait_tensor")
    gemms_before = sum(n in ("aten.mm", "aten.addmm_") for n in names[:start])
    gemms_during = sum(n == "aten.mm" for n in names[start:wait])
    assert gemms_before == len(used), names
    assert gemms_during == len(used), names


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("bias,use_all", [(False, True), (True, True), (True, False)])
def test_column_parallel_projections_overlap(tp, bias, use_all):
    run_ranks(tp, _projections, bias, use_all)


def _stacked(rank: int, world: int, bias: bool, sequence_parallel: bool) -> int:
    """TPContext.project without the overlapped path: the layers' GEMMs stacked into one, against
    torch.nn.Linear on the full input, outputs and every gradient. Returns how many stacked GEMMs ran."""
    import threefold.parallel.layers as layers_module

    stacked = []
    original = layers_module.stacked_projections
    layers_module.stacked_projections = lambda x, ls: stacked.append(len(ls)) or original(x, ls)
    layers_module.STACK_PROJECTIONS = True
    refs, layers, x, grads_out = _three_projections(rank, world, bias)
    group = dist.group.WORLD
    x_ref = x.clone().requires_grad_()
    ys_ref = [ref(x_ref) for ref in refs]
    torch.autograd.backward(ys_ref, grads_out)

    tp = TPContext(group, sequence_parallel=sequence_parallel, overlap_comm=False)
    x_local = (x.chunk(world, dim=1)[rank] if sequence_parallel else x).clone().requires_grad_()
    ys = tp.project(x_local, layers)
    for i, (y, y_ref) in enumerate(zip(ys, ys_ref, strict=True)):
        torch.testing.assert_close(y, y_ref.chunk(world, dim=-1)[rank], **TOL, msg=f"output {i}")
    torch.autograd.backward(ys, [g.chunk(world, dim=-1)[rank] for g in grads_out])
    x_grad = x_ref.grad.chunk(world, dim=1)[rank] if sequence_parallel else x_ref.grad
    torch.testing.assert_close(x_local.grad, x_grad, **TOL)
    for mine, ref in zip(layers, refs, strict=True):
        torch.testing.assert_close(
            mine.weight.grad, shard_of(ref.weight.grad, mine.weight, rank, world), **TOL
        )
        if bias:
            torch.testing.assert_close(mine.bias.grad, shard_of(ref.bias.grad, mine.bias, rank, world), **TOL)
    return sum(stacked)


@pytest.mark.parametrize("tp,sequence_parallel", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_projections_stacked_into_one_gemm(tp, sequence_parallel, bias):
    assert run_ranks(tp, _stacked, bias, sequence_parallel) == [3] * tp


def test_projections_stay_apart_where_stacking_does_not_apply():
    """Float8 layers, deferred weight gradients, or biases on some layers only: each layer its own GEMM."""
    run_ranks(1, _apart)


def _apart(rank: int, world: int) -> None:
    group = dist.group.WORLD
    x = torch.randn(2, 4, 16)
    plain = [ColumnParallelLinear(16, 16, tp_group=group, bias=False) for _ in range(2)]
    assert stacked_projections(x, plain) is not None
    mixed = [ColumnParallelLinear(16, 16, tp_group=group, bias=b) for b in (True, False)]
    assert stacked_projections(x, mixed) is None
    fp8 = [ColumnParallelLinear(16, 16, tp_group=group, bias=False, fp8="tensorwise") for _ in range(2)]
    assert stacked_projections(x, fp8) is None
    queue = object()  # any queue: the layers defer their weight gradients
    deferring = [
        ColumnParallelLinear(16, 16, tp_group=group, bias=False, weight_grads=queue)  # type: ignore[arg-type]
        for _ in range(2)
    ]
    assert stacked_projections(x, deferring) is None


def _model_step(rank: int, world: int, stack: bool, compiled: bool) -> tuple[float, dict, int, int]:
    """One forward and backward of a tiny llama with the projections stacked or not: the loss, the
    gradients, the bytes autograd saved for backward beyond the parameters, and how many stacked GEMMs
    the forward ran."""
    import threefold.parallel.layers as layers_module
    from threefold.config import ModelConfig
    from threefold.model.transformer import build_model
    from threefold.parallel.mesh import build_mesh

    layers_module.STACK_PROJECTIONS = stack
    stacked = []
    original = layers_module._StackedProjections.forward
    layers_module._StackedProjections.forward = staticmethod(  # type: ignore[method-assign]
        lambda ctx, *args: stacked.append(1) or original(ctx, *args)
    )
    cfg = ModelConfig(**dict(TINY_LLAMA, vocab_size=256, num_layers=2))
    mesh = build_mesh(world, 1, 1)
    model = build_model(cfg, TPContext(mesh.tp_group), seed=3, compiled=compiled)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, ids.roll(-1, dims=1))
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in seen.items() if ptr not in params)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved, len(stacked)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_stacked_projections_train_the_model_as_separate_ones(compiled):
    """The whole model with q/k/v and gate/up stacked: the same loss and gradients (to float32 rounding)
    as with one GEMM a projection, and eagerly no more bytes saved for backward (the stacked weight is
    built again in backward, not kept)."""
    (loss, grads, saved, none), (loss_s, grads_s, saved_s, count) = (
        run_ranks(1, _model_step, stack, compiled)[0] for stack in (False, True)
    )
    assert (none, count) == (0, 4)  # q/k/v and gate/up in each of the two layers
    assert loss_s == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_s.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-5, atol=1e-6, msg=name)
    if not compiled:
        assert saved_s <= saved
