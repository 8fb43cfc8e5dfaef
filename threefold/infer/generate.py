"""Batched generation: prefill the prompts, then decode one token per step, across pipeline stages.

Prompts of different lengths are left-padded to one length L, so every row writes slot L + i at decode
step i; the cache's `valid` mask hides the padding and each row's positions count its own tokens only.
Each pipeline stage runs its layers and sends the hidden states (b, s, h) to the next; the last stage
chooses the tokens and broadcasts them back along the pipeline, where the first stage embeds them. Every
TP rank of the last stage holds the same gathered logits and the same seeded generator, so they choose
the same tokens without talking. A training run's interleaved or V-shaped schedule gives a rank several
chunks (virtual stages): the hidden states then pass through every chunk in order, from rank to rank.

A decode step reads and writes only tensors that keep their addresses (`_Tokens`: the last token, its
slot and positions, which rows reached EOS, the tokens chosen so far), so the whole step (advance, forward,
choose, record) needs no value from the host. On CUDA with one stage, a `Decoder(cuda_graph=True)` captures
it once and replays it: for greedy decoding the whole step, when sampling the forward alone (the sampling
generator stays outside the graph). That removes the launch cost of its many small kernels: at batch 1
decoding is otherwise bound by launches, not by reading the weights. The Decoder keeps the cache, the
decode state and the captured graphs for the next call of the same batch size and length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from threefold.infer.cache import KVCache
from threefold.infer.sampling import SamplingParams, choose
from threefold.infer.step import forward_step
from threefold.model.transformer import Block, Transformer
from threefold.parallel.mesh import Mesh
from threefold.pipeline.partition import rank_of_chunk

STOP_CHECK_EVERY = 16
"""Decode steps between checks of whether every row has reached EOS (each check waits for the GPU)."""


@dataclass
class Generation:
    """Per prompt: the new token ids (up to, not including, EOS) and each one's log-probability under the
    model (log-softmax of the unscaled logits)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


Chunks = dict[int, Transformer]
"""A rank's model chunks by global chunk index (virtual stage): one per pipeline stage as inference
loads a checkpoint, several under a training run's interleaved or V-shaped schedule."""


def as_chunks(model: Transformer | Chunks, mesh: Mesh | None) -> Chunks:
    """`model` as this rank's chunks: a lone model is the chunk of its pipeline stage."""
    if isinstance(model, Transformer):
        return {mesh.pp_rank if mesh is not None else 0: model}
    return model


class _Stages:
    """This rank's part of the pipeline: for each chunk it holds, in chunk order, receive from the
    previous chunk's rank, run, send to the next chunk's rank. Every rank runs its chunks in the same
    global order, so the chain of transfers cannot deadlock."""

    def __init__(self, chunks: Chunks, cache: KVCache, mesh: Mesh | None, v_shape: bool) -> None:
        self.chunks, self.cache, self.mesh = chunks, cache, mesh
        self.order = sorted(chunks)
        model = next(iter(chunks.values()))
        self.hidden = model.cfg.hidden_size
        self.dtype = next(model.parameters()).dtype
        pp_size = mesh.pp_size if mesh is not None else 1
        self.num_chunks = pp_size * len(chunks)
        self.holders = [rank_of_chunk(c, pp_size, v_shape) for c in range(self.num_chunks)]
        """The pipeline rank of every chunk."""

    def rank_of(self, chunk: int) -> int:
        m = self.mesh
        assert m is not None
        return m.rank_at(pp_rank=self.holders[chunk], dp_rank=m.dp_rank, tp_rank=m.tp_rank)

    def run(
        self, x: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, step: Callable[..., torch.Tensor]
    ) -> torch.Tensor | None:
        """The last chunk's logits on the rank holding it; None on the others."""
        for c in self.order:
            chunk = self.chunks[c]
            if c > 0 and self.holders[c - 1] != self.holders[c]:
                b, s = positions.shape
                x = torch.empty(b, s, self.hidden, dtype=self.dtype, device=positions.device)
                dist.recv(x, src=self.rank_of(c - 1))
            x = step(chunk, x, self.cache, slots, positions)
            if c < self.num_chunks - 1 and self.holders[c + 1] != self.holders[c]:
                dist.send(x.contiguous(), dst=self.rank_of(c + 1))
        return x if self.num_chunks - 1 in self.chunks else None

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """The last chunk's rank's tensor `t` on every stage (same shape and dtype everywhere)."""
        m = self.mesh
        if m is not None and m.pp_size > 1:
            dist.broadcast(t, src=self.rank_of(self.num_chunks - 1), group=m.pp_group)
        return t


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile for a decode step: one static shape; a one-token step (batch 1) computes its
    projections as reductions (forward_step's `matvec`), which coordinate-descent tuning sizes."""
    # Forcing a concatenation to be read in place lets the stacked q/k/v weights (step._qkv_matvec)
    # feed one reduction without a copy; on CPU inductor would copy them otherwise.
    options: dict[str, Any] = {"coordinate_descent_tuning": True, "force_pointwise_cat": True}
    return torch.compile(fn, dynamic=False, options=options)


def _capture(
    run: Callable[[], Any], restore: Callable[[], None] | None = None
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(A CUDA graph of one call of `run`, that call's output). `run` is first called three times on a side
    stream, so compilation and lazy initializations stay out of the capture; `restore` then undoes what
    those calls changed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    if restore is not None:
        restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


class _GraphedStep:
    """The decode step captured in a CUDA graph at its first call and replayed after: its inputs are
    copied into static buffers, the cache is written in place, the logits come back in a static buffer.
    `compiled`: the step is torch.compile'd first, which fuses its element-wise kernels (norms, RoPE)."""

    def __init__(self, compiled: bool) -> None:
        self.step: Callable[..., torch.Tensor] = forward_step
        if compiled:
            self.step = _compile(functools.partial(forward_step, matvec=True))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.out: torch.Tensor | None = None

    def __call__(
        self,
        model: Transformer,
        x: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        if self.graph is None:
            inputs = self.inputs = (x.clone(), slots.clone(), positions.clone())
            self.graph, self.out = _capture(lambda: self.step(model, inputs[0], cache, inputs[1], inputs[2]))
        assert self.inputs is not None and self.out is not None
        for buffer, value in zip(self.inputs, (x, slots, positions), strict=True):
            buffer.copy_(value)
        self.graph.replay()
        return self.out.clone()


class _Tokens:
    """One generate call's decode state, in tensors that keep their addresses across calls (b batch, T
    cache length): the input of the next step and what was chosen so far."""

    def __init__(self, batch_size: int, max_len: int, device: torch.device) -> None:
        b = batch_size
        self.token = torch.zeros(b, 1, dtype=torch.long, device=device)  # (b, 1): the last token chosen
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # (1,): the cache slot it came from
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=device)  # (b, 1): of that token
        self.done = torch.zeros(b, dtype=torch.bool, device=device)  # (b,): rows that chose EOS
        self.count = torch.zeros(1, dtype=torch.long, device=device)  # (1,): tokens chosen so far
        self.tokens = torch.zeros(b, max_len, dtype=torch.long, device=device)  # (b, T), the first `count`
        self.logprobs = torch.zeros(b, max_len, dtype=torch.float32, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.token, self.slot, self.positions, self.done, self.count, self.tokens, self.logprobs]

    def start(self, slot: int, positions: torch.Tensor) -> None:
        """Reset for a new call whose prompt's last token sits at cache `slot` with `positions` (b, 1)."""
        self.slot.fill_(slot)
        self.positions.copy_(positions)
        self.done.zero_()
        self.count.zero_()


@dataclass(frozen=True)
class _Chooser:
    """How a generate call turns the last chunk's logits into each row's next token, and records it."""

    state: _Tokens
    stages: _Stages
    params: SamplingParams
    generator: torch.Generator
    eos_id: int | None
    pad_id: int

    def __call__(self, logits: torch.Tensor | None) -> None:
        state = self.state
        if logits is not None:
            token = choose(logits, self.params, self.generator)
            logprob = logits.log_softmax(dim=-1).gather(-1, token[:, None]).squeeze(-1)
        else:  # an earlier pipeline stage: the last one's choice arrives in these
            token = torch.zeros_like(state.token[:, 0])
            logprob = torch.zeros_like(state.logprobs[:, 0])
        token, logprob = self.stages.share(token), self.stages.share(logprob)
        token = token.masked_fill(state.done, self.pad_id)  # a row that stopped keeps producing padding
        state.tokens.index_copy_(1, state.count, token[:, None])
        state.logprobs.index_copy_(1, state.count, logprob[:, None])
        if self.eos_id is not None:
            state.done.logical_or_(token == self.eos_id)
        state.token.copy_(token[:, None])
        state.count.add_(1)


def _decode(
    state: _Tokens, cache: KVCache, stages: _Stages, take: _Chooser, step: Callable[..., torch.Tensor]
) -> None:
    """One decode step: the last token into the next slot, through the model, the next token chosen."""
    state.slot.add_(1)
    state.positions.add_(1)
    cache.valid.index_fill_(1, state.slot, True)
    take(stages.run(state.token, state.slot, state.positions, step))


class _GraphedDecode:
    """A whole decode step (`_decode`) captured in a CUDA graph at its first call and replayed after. The
    warm-up runs before the capture advance the decode state, so it is saved before them and put back."""

    def __init__(self, run: Callable[[], None], saved: list[torch.Tensor]) -> None:
        self.run, self.saved = run, saved
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if self.graph is None:
            before = [t.clone() for t in self.saved]

            def restore() -> None:
                for tensor, value in zip(self.saved, before, strict=True):
                    tensor.copy_(value)

            self.graph, _ = _capture(self.run, restore)
        self.graph.replay()


class Decoder:
    """How the decode step runs, and what it keeps between generate calls: the KV cache, the decode state
    and the captured CUDA graphs, reused by the next call with the same batch size and cache length."""

    def __init__(self, *, cuda_graph: bool = False, compiled: bool = False, whole_step: bool = True) -> None:
        """`cuda_graph` (CUDA, one pipeline stage): replay the decode step as a CUDA graph; `compiled`:
        torch.compile it (and the prompt's forward) first; `whole_step`: for greedy decoding capture the
        whole step, token choice included (False: the forward alone, as when sampling)."""
        self.cuda_graph, self.compiled, self.whole_step = cuda_graph, compiled, whole_step
        self._key: tuple[int, ...] | None = None
        self._cache: KVCache | None = None
        self._state: _Tokens | None = None
        self._step: Callable[..., torch.Tensor] = forward_step
        self._graphable = False
        self._decode: tuple[tuple[int | None, int], _GraphedDecode] | None = None
        # The prompt's forward, compiled with symbolic shapes so that prompts of other lengths reuse it.
        self._prefill: Callable[..., torch.Tensor] = (
            torch.compile(forward_step, dynamic=True) if compiled else forward_step
        )

    def prepare(
        self, model: Transformer | Chunks, batch_size: int, max_len: int, mesh: Mesh | None
    ) -> KVCache:
        """A cleared cache (of every layer of this rank's chunks) for this call; the one of the last call
        when the shapes match."""
        chunks = as_chunks(model, mesh)
        key = (*(id(c) for c in chunks.values()), batch_size, max_len)
        if self._cache is not None and self._key == key:
            self._cache.valid.zero_()
            return self._cache
        self._cache = self._state = self._decode = None  # the old graphs hold the old buffers
        first = next(iter(chunks.values()))
        param = next(first.parameters())
        block = next(iter(first.layers.values()))
        assert isinstance(block, Block)
        self._cache = KVCache(
            [int(i) for c in chunks.values() for i in c.layers], batch_size=batch_size,
            num_kv_heads=block.self_attn.num_local_kv_heads, max_len=max_len, head_dim=first.cfg.head_dim,
            dtype=param.dtype, device=param.device,
        )  # fmt: skip
        self._state = _Tokens(batch_size, max_len, param.device)
        self._key = key
        one_stage = len(chunks) == 1 and (mesh is None or mesh.pp_size == 1)
        self._graphable = self.cuda_graph and param.device.type == "cuda" and one_stage
        self._step = _GraphedStep(self.compiled) if self._graphable else forward_step
        return self._cache

    def prefill(self) -> Callable[..., torch.Tensor]:
        """The forward of the prompt (compiled when the Decoder is)."""
        return self._prefill

    def step(self) -> Callable[..., torch.Tensor]:
        """The forward of a decode step (captured in a CUDA graph when graphable)."""
        return self._step

    def state(self) -> _Tokens:
        assert self._state is not None, "prepare() first"
        return self._state

    def decode(self, stages: _Stages, take: _Chooser) -> Callable[[], None]:
        """One decode step of this call: for greedy decoding on a graphable model the whole step replayed
        as a CUDA graph (captured at the first step of the first call with these EOS and padding ids),
        else `_decode` with `step()`."""
        cache, state = self._cache, self.state()
        assert cache is not None
        whole = self.whole_step and take.params.temperature == 0
        if not (self._graphable and whole):
            return functools.partial(_decode, state, cache, stages, take, self._step)
        key = (take.eos_id, take.pad_id)
        if self._decode is None or self._decode[0] != key:
            # Compiled, the token choice and its bookkeeping fuse into a few kernels with the forward's.
            forward = functools.partial(forward_step, matvec=True) if self.compiled else forward_step
            run = functools.partial(_decode, state, cache, stages, take, forward)
            self._decode = (key, _GraphedDecode(_compile(run) if self.compiled else run,
                                                [*state.tensors(), cache.valid]))  # fmt: skip
        return self._decode[1]


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (b, L), valid (b, L)): the prompts right-aligned, padding on the left."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            valid[row, length - len(prompt) :] = True
    return ids.to(device), valid.to(device)


def check_prompts(prompts: list[list[int]], max_seq_len: int) -> None:
    """ValueError for an empty batch, an empty prompt, or a prompt that fills the model's context."""
    if not prompts:
        raise ValueError("no prompts to generate from")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty (no tokens)")
        if len(p) >= max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, but the model's context (model.max_seq_len) is "
                f"{max_seq_len}: it leaves no room for a new token"
            )


@torch.no_grad()
def generate(
    model: Transformer | Chunks,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_id: int | None = None,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    decoder: Decoder | None = None,
    v_shape: bool = False,
) -> Generation:
    """Continue each prompt (token ids) with up to params.max_new_tokens tokens, stopping a row at EOS.

    Run it on every rank of the model's pipeline and TP groups alike (same prompts, same params); every
    rank returns the same Generation. `mesh` is needed with pp_size > 1 only. New tokens stop where the
    model's context (model.max_seq_len) ends. `decoder`: how decode steps run (default: eagerly), and the
    state it keeps for the next call. `model` may be this rank's several chunks (a training run's
    interleaved schedule, or its V-shaped one with `v_shape`)."""
    params.check()
    chunks = as_chunks(model, mesh)
    first = next(iter(chunks.values()))
    cfg = first.cfg
    check_prompts(prompts, cfg.max_seq_len)
    device = next(first.parameters()).device
    ids, valid = left_pad(prompts, pad_id, device)
    b, length = ids.shape
    new = min(params.max_new_tokens, cfg.max_seq_len - length)
    decoder = decoder or Decoder()
    cache = decoder.prepare(chunks, b, length + new, mesh)
    cache.valid[:, :length] = valid
    stages = _Stages(chunks, cache, mesh, v_shape)
    generator = torch.Generator(device=device).manual_seed(params.seed)

    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (b, L): each row counts its own tokens
    logits = stages.run(ids, torch.arange(length, device=device), positions, decoder.prefill())
    state = decoder.state()
    state.start(length - 1, positions[:, -1:])
    take = _Chooser(state, stages, params, generator, eos_id, pad_id)
    take(logits)
    decode = decoder.decode(stages, take)
    chosen = 1
    while chosen < new:
        # Asking whether every row has stopped waits for the GPU, so ask only every few tokens: a row
        # that stopped keeps producing padding, which _per_row cuts off, so the result is the same.
        if eos_id is not None and chosen % STOP_CHECK_EVERY == 0 and bool(state.done.all()):
            break
        decode()
        chosen += 1
    return _per_row(state.tokens[:, :chosen].tolist(), state.logprobs[:, :chosen].tolist(), eos_id)


def _per_row(tokens: list[list[int]], logprobs: list[list[float]], eos_id: int | None) -> Generation:
    out_tokens, out_logprobs = [], []
    for row_tokens, row_logprobs in zip(tokens, logprobs, strict=True):
        end = row_tokens.index(eos_id) if eos_id is not None and eos_id in row_tokens else len(row_tokens)
        out_tokens.append(row_tokens[:end])
        out_logprobs.append(row_logprobs[:end])
    return Generation(out_tokens, out_logprobs)
