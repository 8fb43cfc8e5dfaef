"""Context parallelism: every sequence split over the cp ranks, attention computed across them.

Shape legend (all local to this rank): b micro-batch, s global sequence, c = s / (2 cp) chunk length,
a_ query heads and k_ key/value heads of this TP rank, d head dim.

Layout (causal load balance): a sequence is cut into 2 cp chunks and cp rank r holds chunks r and
2cp-1-r, concatenated, (b, 2c, ...). Under a causal mask late queries read many keys and early ones few;
the mirrored pair gives every rank the same work. Every other layer is per token, so only attention (and
the positions fed to RoPE or the position table) needs to know.

Two ways to attend across the ranks (`parallel.cp_attention`):
- ring: K/V blocks travel the cp ring while each rank attends to the block it holds; the next block's
  transfer overlaps the current block's compute. Partial results merge by their log-sum-exp in fp32
  (online softmax). Backward runs the ring again: K/V travel with their fp32 dK/dV accumulators, each
  rank adds its share, and after cp steps each accumulator is back at the rank that owns the block.
- all_to_all (Ulysses): one all-to-all turns (b, a_, 2c, d) sequence shards into (b, a_/cp, s, d) head
  shards, attention runs on whole sequences, and the reverse all-to-all brings the output back. Needs
  a_ divisible by cp.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from threefold.parallel import track

CPAttention = Literal["ring", "all_to_all"]


@dataclass(frozen=True)
class ContextParallel:
    """What attention and the positions need to know about context parallelism."""

    group: ProcessGroup
    """The cp ring: the ranks holding the chunks of the same sequences, in chunk order."""
    attention: CPAttention = "ring"
    """How attention crosses the ranks: 'ring' or 'all_to_all'."""
    size: int = field(init=False)
    """cp_size, read from the group."""
    rank: int = field(init=False)
    """This rank's index in the group."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", dist.get_world_size(self.group))
        object.__setattr__(self, "rank", dist.get_rank(self.group))

    def positions(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """Global positions (2c,) of this rank's tokens of a `seq_len`-token sequence."""
        return load_balanced_positions(seq_len, self.rank, self.size, device)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's two chunks of a whole-sequence tensor (the data loader's samples)."""
        return split_sequence(x, self.rank, self.size, dim)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole sequence (b, s) from every rank's chunks (b, 2c) of it: the inverse of `shard`, on
        every rank (for document ids, which count the EOS tokens of every earlier chunk)."""
        b, length = x.shape
        parts = torch.empty(self.size * b, length, dtype=x.dtype, device=x.device)  # rank-major
        with track.collective(self.group, "all_gather(tokens)"):
            dist.all_gather_into_tensor(parts, x.contiguous(), group=self.group)
        chunks = parts.reshape(self.size, b, 2, length // 2).permute(1, 0, 2, 3).reshape(b, 2 * self.size, -1)
        return chunks[:, _natural_order(self.size, x.device)].reshape(b, self.size * length)


def load_balanced_positions(seq_len: int, cp_rank: int, cp_size: int, device: torch.device) -> torch.Tensor:
    """Positions of chunks cp_rank and 2 cp_size - 1 - cp_rank of a sequence cut into 2 cp_size chunks."""
    num_chunks = 2 * cp_size
    if seq_len % num_chunks:
        raise ValueError(f"sequence length ({seq_len}) must be divisible by 2 * cp_size ({num_chunks})")
    c = seq_len // num_chunks
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((num_chunks - 1 - cp_rank) * c, (num_chunks - cp_rank) * c, device=device)
    return torch.cat([first, second])


def split_sequence(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """The chunks of `x` along `dim` that cp rank `cp_rank` holds, concatenated (a copy)."""
    if cp_size == 1:
        return x
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)


# --- One block: attention of some queries over some keys, with the log-sum-exp ------------------------


def _uses_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def _expand_kv(k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(b, k_, n, d) -> (b, a_, n, d): query head j reads kv head j // (a_ / k_)."""
    group_size = num_heads // k.shape[1]
    return k if group_size == 1 else k.repeat_interleave(group_size, dim=1)


def _fold_kv_grad(grad: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(b, a_, n, d) gradient of expanded kv heads -> (b, k_, n, d): sum over the query heads sharing one."""
    b, a, n, d = grad.shape
    return grad.view(b, num_kv_heads, a // num_kv_heads, n, d).sum(2)


def _causal_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


Docs = tuple[torch.Tensor, torch.Tensor] | None
"""Document ids of a block's queries (b, n) and keys (b, m): a query reads only keys of its document."""


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, docs: Docs, scale: float) -> torch.Tensor:
    """fp32 scores (b, a_, n, m) of q over (expanded) k, -inf where the causal or document mask forbids."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    allowed = _causal_mask(q.shape[2], q.device) if causal else None
    if docs is not None:
        same = (docs[0][:, :, None] == docs[1][:, None, :])[:, None]  # (b, 1, n, m)
        allowed = same if allowed is None else same & allowed
    return scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float, docs: Docs = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (b, a_, n, d) in q's dtype, log-sum-exp (b, a_, n) fp32) of q over k, v.

    k, v may have fewer (grouped) heads. `causal` applies only to a square block (key j <= query i);
    `docs` keeps each query to the keys of its document. The flash kernel on CUDA in 16-bit dtypes
    without documents, else plain math in fp32. A query with no key to read in this block gets the
    log-sum-exp -inf and the output 0, which add nothing when merged.
    """
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    if _uses_flash(q) and docs is None:
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out[0], out[1][..., : q.shape[2]]
    scores = _scores(q, k, causal, docs, scale)  # (b, a_, n, m)
    lse = scores.logsumexp(dim=-1)
    probs = (scores - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1)).exp()  # 0 where masked
    out = torch.matmul(probs, v.float())
    return out.to(q.dtype), lse


def block_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    docs: Docs = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one block, given the final (merged) output and log-sum-exp of its rows.

    With the final lse, exp(scores - lse) is this block's share of the full softmax, and with the final
    output the softmax's backward term (rowsum(dO * O)) is the full one: so the blocks' gradients add up
    to the gradient of the whole attention.
    """
    num_kv_heads = k.shape[1]
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    if _uses_flash(q) and docs is None:
        n, m = q.shape[2], k.shape[2]
        # Dense (not variable-length) blocks pass no cumulative lengths (None, as the forward returns);
        # without dropout the random state is unused but must have the forward's shapes and dtype.
        rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.zeros((), dtype=torch.uint64, device=q.device)
        # The kernel reads the log-sum-exp (and the other operands) as dense row-major tensors: a slice
        # of the sequence (the second half of a rank's queries) must be copied first.
        grad_out, q, k, v, out, lse = (t.contiguous() for t in (grad_out, q, k, v, out, lse))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, None, None, n, m, 0.0, causal, rng_state, unused, scale=scale
        )
    else:
        qf, kf, vf, go = q.float(), k.float(), v.float(), grad_out.float()
        scores = _scores(q, k, causal, docs, scale)
        probs = (scores - lse.unsqueeze(-1)).exp()  # (b, a_, n, m); the final lse is finite (own token)
        dv = torch.matmul(probs.transpose(-1, -2), go)
        dprobs = torch.matmul(go, vf.transpose(-1, -2))
        delta = (go * out.float()).sum(dim=-1, keepdim=True)
        dscores = probs * (dprobs - delta) * scale
        dq, dk = torch.matmul(dscores, kf), torch.matmul(dscores.transpose(-1, -2), qf)
    return dq, _fold_kv_grad(dk, num_kv_heads), _fold_kv_grad(dv, num_kv_heads)


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's (output, lse) into the running fp32 (out, lse), in place (online softmax)."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_((lse - new_lse).exp().unsqueeze(-1)).add_(
        block_out.float() * (block_lse - new_lse).exp().unsqueeze(-1)
    )
    lse.copy_(new_lse)


# --- The ring ---------------------------------------------------------------------------------------


class _Ring:
    """Point-to-point with the ring neighbours: send to the next cp rank, receive from the previous."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (rank + 1) % size)
        self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def start(self, send: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
        """Begin passing `send` on and receiving its neighbour's; (receive buffer, works to wait for)."""
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, recv, self.prev, self.group),
        ]
        # Batched: NCCL would deadlock on two separate sends between the same pair (cp 2).
        return recv, dist.batch_isend_irecv(ops)

    def wait(self, works: list[Any]) -> None:
        with track.transfer([self.next, self.prev]):
            for work in works:
                work.wait()


def _block_plan(step: int, cp_rank: int, cp_size: int) -> str:
    """Which part of the block held at `step` this rank's queries read, given the mirrored layout.

    'diagonal': its own chunks, causally (their positions increase along the local sequence).
    'first_keys': an earlier rank's block; every local query reads its first chunk, none its second.
    'last_queries': a later rank's block; only the local second chunk reads it, all of it.
    """
    if step == 0:
        return "diagonal"
    source = (cp_rank - step) % cp_size
    return "first_keys" if source < cp_rank else "last_queries"


class _BlockDocs:
    """The document ids (queries, keys) of each ring step's block, None without documents."""

    def __init__(self, doc_ids: torch.Tensor | None, cp_rank: int, cp_size: int, half: int) -> None:
        self.doc_ids, self.cp_rank, self.cp_size, self.half = doc_ids, cp_rank, cp_size, half
        self.local = None if doc_ids is None else split_sequence(doc_ids, cp_rank, cp_size)  # (b, 2c)

    def docs(self, step: int, plan: str) -> Docs:
        if self.doc_ids is None or self.local is None:
            return None
        source = (self.cp_rank - step) % self.cp_size
        keys = split_sequence(self.doc_ids, source, self.cp_size)  # the ids of the block held at `step`
        if plan == "diagonal":
            return self.local, keys
        if plan == "first_keys":
            return self.local, keys[:, : self.half]
        return self.local[:, self.half :], keys


class RingAttention(torch.autograd.Function):
    """Causal attention over the whole sequence from this rank's chunks: ring forward, ring backward.

    Forward: q (b, a_, 2c, d), k, v (b, k_, 2c, d) local -> output (b, a_, 2c, d) local.
    Backward: dq local; dK/dV of every block are accumulated along the ring and returned to their owner.
    `doc_ids` (b, s), the whole sequence's document ids (the same on every rank), keep attention inside
    each document: every block's keys take their ids from the chunks of the rank that holds them.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        group: ProcessGroup,
        scale: float,
        doc_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        ring = _Ring(group)
        cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
        half = q.shape[2] // 2
        plans = _BlockDocs(doc_ids, cp_rank, cp_size, half)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])  # one buffer to pass on: (2, b, k_, 2c, d)
        for step in range(cp_size):
            works: list[Any] = []
            if step + 1 < cp_size:
                incoming, works = ring.start(kv)  # the next block travels while this one is computed
            kb, vb = kv[0], kv[1]
            plan = _block_plan(step, cp_rank, cp_size)
            docs = plans.docs(step, plan)
            if plan == "diagonal":
                _merge(out, lse, *block_attention(q, kb, vb, causal=True, scale=scale, docs=docs))
            elif plan == "first_keys":
                o, m = block_attention(
                    q, kb[:, :, :half], vb[:, :, :half], causal=False, scale=scale, docs=docs
                )
                _merge(out, lse, o, m)
            else:
                o, m = block_attention(q[:, :, half:], kb, vb, causal=False, scale=scale, docs=docs)
                _merge(out[:, :, half:], lse[:, :, half:], o, m)
            if works:
                ring.wait(works)
                kv = incoming
        result = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.group, ctx.scale, ctx.doc_ids = group, scale, doc_ids
        return result

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        ring = _Ring(group)
        cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
        half = q.shape[2] // 2
        plans = _BlockDocs(ctx.doc_ids, cp_rank, cp_size, half)
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        # The fp32 dK/dV accumulator travels with its block. It is sent on as soon as this rank has added
        # its share, and the next rank computes its share of that block before it waits for it, so each
        # accumulator's transfer overlaps the next block's compute, as the blocks' own transfers do.
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # our own block's, at step 0
        incoming: torch.Tensor = dkv
        pending: list[Any] = []
        for step in range(cp_size):
            kv_works: list[Any] = []
            if step + 1 < cp_size:
                next_kv, kv_works = ring.start(kv)
            kb, vb = kv[0], kv[1]
            plan = _block_plan(step, cp_rank, cp_size)
            docs = plans.docs(step, plan)
            keys = slice(None) if plan != "first_keys" else slice(None, half)
            if plan == "last_queries":
                dq_b, dk_b, dv_b = block_attention_backward(
                    grad_out[:, :, half:], q[:, :, half:], kb, vb, out[:, :, half:], lse[:, :, half:],
                    causal=False, scale=scale, docs=docs,
                )  # fmt: skip
                dq[:, :, half:] += dq_b
            else:
                dq_b, dk_b, dv_b = block_attention_backward(
                    grad_out, q, kb[:, :, keys], vb[:, :, keys], out, lse, causal=plan == "diagonal",
                    scale=scale, docs=docs,
                )  # fmt: skip
                dq += dq_b
            ring.wait(pending)  # the accumulator of the block just computed
            dkv = incoming
            dkv[0, :, :, keys] += dk_b
            dkv[1, :, :, keys] += dv_b
            # After the last step the accumulator reaches the block's owner: this rank's own dK/dV.
            incoming, pending = ring.start(dkv)
            if kv_works:
                ring.wait(kv_works)
                kv = next_kv
        ring.wait(pending)
        dkv = incoming
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


# --- All-to-all (Ulysses) ------------------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Split dim 0 into cp parts; part j goes to rank j, and rank j's part for us lands at index j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    with track.collective(group, "all_to_all"):
        dist.all_to_all_single(out, x, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """All-to-all along dim 0 forward, the same all-to-all backward (it is its own dual: what rank i sent
    rank j, rank j's gradient for it goes back from j to i the same way)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_to_all(grad, ctx.group), None


def _natural_order(cp_size: int, device: torch.device) -> torch.Tensor:
    """Index into the 2 cp chunks as gathered (rank-major, each rank's pair) that puts them in order."""
    order = [2 * m if m < cp_size else 2 * (2 * cp_size - 1 - m) + 1 for m in range(2 * cp_size)]
    return torch.tensor(order, device=device)


def _sequence_to_heads(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(b, n, 2c, d) sequence shard -> (b, n/cp, s, d) head shard, the sequence in natural order."""
    cp = dist.get_world_size(group)
    b, n, length, d = x.shape
    x = x.reshape(b, cp, n // cp, length, d).transpose(0, 1)  # (cp, b, n/cp, 2c, d): part j for rank j
    x = AllToAll.apply(x, group)  # index j: rank j's chunks, our heads
    x = x.reshape(cp, b, n // cp, 2, length // 2, d).permute(1, 2, 0, 3, 4, 5)
    x = x.reshape(b, n // cp, 2 * cp, length // 2, d)[:, :, _natural_order(cp, x.device)]
    return x.reshape(b, n // cp, cp * length, d)


def _heads_to_sequence(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(b, n/cp, s, d) head shard, natural order -> (b, n, 2c, d) this rank's sequence shard."""
    cp = dist.get_world_size(group)
    b, h, s, d = x.shape
    c = s // (2 * cp)
    gathered = torch.argsort(_natural_order(cp, x.device))  # natural chunk order -> rank-major pairs
    x = x.reshape(b, h, 2 * cp, c, d)[:, :, gathered].reshape(b, h, cp, 2 * c, d)
    x = AllToAll.apply(x.permute(2, 0, 1, 3, 4), group)  # (cp, b, h, 2c, d): index j: our chunks, j's heads
    return x.transpose(0, 1).reshape(b, cp * h, 2 * c, d)


WholeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""Causal attention of whole sequences, (b, a, s, d) queries over (b, k, s, d) keys and values, inside each
document (threefold.model.attention.attend with the micro-batch's mask)."""


def _all_to_all_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ProcessGroup, whole: WholeAttention | None
) -> torch.Tensor:
    cp = dist.get_world_size(group)
    if k.shape[1] % cp:
        # Fewer kv heads than ranks can split: send each query head its own copy.
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    q, k, v = (_sequence_to_heads(t, group) for t in (q, k, v))
    if (
        whole is not None
    ):  # documents: whole sequences take the usual masked attention (FlexAttention on GPUs)
        return _heads_to_sequence(whole(q, k, v), group)
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, a_/cp, s, d)
    return _heads_to_sequence(out, group)


def context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp: ContextParallel,
    *,
    doc_ids: torch.Tensor | None = None,
    whole: WholeAttention | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's (b, a_, 2c, d) queries over the whole sequence's keys and values,
    k, v (b, k_, 2c, d) local: (b, a_, 2c, d). Inside each document given the whole sequence's document ids
    `doc_ids` (b, s): the ring masks its blocks with them, all-to-all attention calls `whole`."""
    if cp.attention == "all_to_all":
        if doc_ids is not None and whole is None:
            raise ValueError("all-to-all attention with documents needs the whole-sequence attention `whole`")
        return _all_to_all_attention(q, k, v, cp.group, whole if doc_ids is not None else None)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return RingAttention.apply(q, k.contiguous(), v.contiguous(), cp.group, scale, doc_ids)
