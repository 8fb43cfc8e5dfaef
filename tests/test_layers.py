"""Each tensor-parallel layer against its unsharded torch.nn reference: outputs and every gradient."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_ranks

from threefold.comm import copy_to_tp, gather_from_sequence
from threefold.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_of,
    vocab_parallel_cross_entropy,
)

TOL = dict(rtol=1e-5, atol=1e-6)


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


def _cross_entropy(rank: int, world: int, vocab: int) -> None:
    torch.manual_seed(2)
    n = 24
    padded = -(-vocab // world) * world
    full_logits = torch.randn(n, vocab) * 3
    targets = torch.randint(0, vocab, (n,))
    targets[:3] = vocab - 1
    grad_out = torch.rand(n)

    ref_logits = full_logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_logits, targets, reduction="none")
    ref.backward(grad_out)

    padded_logits = torch.cat([full_logits, torch.full((n, padded - vocab), 50.0)], dim=1)  # large junk
    local = padded_logits.chunk(world, dim=1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, tp_group=dist.group.WORLD, vocab_size=vocab)
    torch.testing.assert_close(loss, ref, **TOL)
    loss.backward(grad_out)
    full_grad = _gather(local.grad, 1)
    torch.testing.assert_close(full_grad[:, :vocab], ref_logits.grad, **TOL)
    assert torch.all(full_grad[:, vocab:] == 0), "padding columns must never be predicted"


@pytest.mark.parametrize("tp,vocab", [(2, 40), (2, 37), (4, 37), (4, 64)])
def test_vocab_parallel_cross_entropy(tp, vocab):
    run_ranks(tp, _cross_entropy, vocab)


def test_cross_entropy_single_rank_bf16():
    run_ranks(1, _ce_bf16)


def _ce_bf16(rank: int, world: int) -> None:
    torch.manual_seed(3)
    logits = torch.randn(10, 33).bfloat16().requires_grad_()
    targets = torch.randint(0, 33, (10,))
    loss = vocab_parallel_cross_entropy(logits, targets, tp_group=dist.group.WORLD, vocab_size=33)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float(), targets, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
