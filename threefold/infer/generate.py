"""Batched generation: prefill the prompts, then decode one token per step, across pipeline stages.

Prompts of different lengths are left-padded to one length L, so every row writes slot L + i at decode
step i; the cache's `valid` mask hides the padding and each row's positions count its own tokens only.
Each pipeline stage runs its layers and sends the hidden states (b, s, h) to the next; the last stage
chooses the tokens and broadcasts them back along the pipeline, where the first stage embeds them. Every
TP rank of the last stage holds the same gathered logits and the same seeded generator, so they choose
the same tokens without talking.

On CUDA with one stage, a `Decoder(cuda_graph=True)` captures the decode step once (its shapes never
change) and replays it, which removes the launch cost of its many small kernels: at batch 1 decoding is
otherwise bound by launches, not by reading the weights. The Decoder keeps the cache and the captured
graph for the next call of the same batch size and length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from threefold.infer.cache import KVCache
from threefold.infer.sampling import SamplingParams, choose
from threefold.infer.step import forward_step
from threefold.model.transformer import Block, Transformer
from threefold.parallel.mesh import Mesh

STOP_CHECK_EVERY = 16
"""Decode steps between checks of whether every row has reached EOS (each check waits for the GPU)."""


@dataclass
class Generation:
    """Per prompt: the new token ids (up to, not including, EOS) and each one's log-probability under the
    model (log-softmax of the unscaled logits)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


class _Stages:
    """This rank's part of the pipeline: receive from the previous stage, run, send to the next."""

    def __init__(self, model: Transformer, cache: KVCache, mesh: Mesh | None) -> None:
        self.model, self.cache, self.mesh = model, cache, mesh
        self.hidden = model.cfg.hidden_size

    def neighbour(self, offset: int) -> int:
        m = self.mesh
        assert m is not None
        return m.rank_at(pp_rank=m.pp_rank + offset, dp_rank=m.dp_rank, tp_rank=m.tp_rank)

    def run(
        self, x: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, step: Callable[..., torch.Tensor]
    ) -> torch.Tensor | None:
        m = self.mesh
        if m is not None and not m.is_first_stage:
            b, s = positions.shape
            dtype = next(self.model.parameters()).dtype
            x = torch.empty(b, s, self.hidden, dtype=dtype, device=positions.device)
            dist.recv(x, src=self.neighbour(-1))
        out = step(self.model, x, self.cache, slots, positions)
        if m is not None and not m.is_last_stage:
            dist.send(out.contiguous(), dst=self.neighbour(1))
            return None
        return out

    def share(self, t: torch.Tensor) -> torch.Tensor:
        """The last stage's tensor `t` on every stage (same shape and dtype everywhere)."""
        m = self.mesh
        if m is not None and m.pp_size > 1:
            src = m.rank_at(pp_rank=m.pp_size - 1, dp_rank=m.dp_rank, tp_rank=m.tp_rank)
            dist.broadcast(t, src=src, group=m.pp_group)
        return t


class _GraphedStep:
    """The decode step captured in a CUDA graph at its first call and replayed after: its inputs are
    copied into static buffers, the cache is written in place, the logits come back in a static buffer.
    `compiled`: the step is torch.compile'd first, which fuses its element-wise kernels (norms, RoPE)."""

    def __init__(self, compiled: bool) -> None:
        self.step: Callable[..., torch.Tensor] = forward_step
        if compiled:
            # A one-token step (batch 1) computes its projections as reductions the compiler can tune.
            self.step = torch.compile(
                functools.partial(forward_step, matvec=True), dynamic=False,
                options={"coordinate_descent_tuning": True},
            )  # fmt: skip
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
            self.inputs = (x.clone(), slots.clone(), positions.clone())
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (lazy initializations) off the capture
                for _ in range(3):
                    self.step(model, self.inputs[0], cache, self.inputs[1], self.inputs[2])
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.step(model, self.inputs[0], cache, self.inputs[1], self.inputs[2])
        assert self.inputs is not None and self.out is not None
        for buffer, value in zip(self.inputs, (x, slots, positions), strict=True):
            buffer.copy_(value)
        self.graph.replay()
        return self.out.clone()


class Decoder:
    """How the decode step runs, and what it keeps between generate calls: the KV cache and the captured
    CUDA graph, reused by the next call with the same batch size and cache length."""

    def __init__(self, *, cuda_graph: bool = False, compiled: bool = False) -> None:
        """`cuda_graph` (CUDA, one pipeline stage): replay the decode step as a CUDA graph; `compiled`:
        torch.compile it first."""
        self.cuda_graph, self.compiled = cuda_graph, compiled
        self._key: tuple[int, ...] | None = None
        self._cache: KVCache | None = None
        self._step: Callable[..., torch.Tensor] = forward_step

    def prepare(self, model: Transformer, batch_size: int, max_len: int, mesh: Mesh | None) -> KVCache:
        """A cleared cache for this call; the one of the last call when the shapes match."""
        key = (id(model), batch_size, max_len)
        if self._cache is not None and self._key == key:
            self._cache.valid.zero_()
            return self._cache
        cfg = model.cfg
        param = next(model.parameters())
        block = next(iter(model.layers.values()))
        assert isinstance(block, Block)
        self._cache = KVCache(
            [int(i) for i in model.layers], batch_size=batch_size,
            num_kv_heads=block.self_attn.num_local_kv_heads, max_len=max_len, head_dim=cfg.head_dim,
            dtype=param.dtype, device=param.device,
        )  # fmt: skip
        self._key = key
        graphable = param.device.type == "cuda" and (mesh is None or mesh.pp_size == 1)
        self._step = _GraphedStep(self.compiled) if self.cuda_graph and graphable else forward_step
        return self._cache

    def step(self) -> Callable[..., torch.Tensor]:
        return self._step


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
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    eos_id: int | None = None,
    pad_id: int = 0,
    mesh: Mesh | None = None,
    decoder: Decoder | None = None,
) -> Generation:
    """Continue each prompt (token ids) with up to params.max_new_tokens tokens, stopping a row at EOS.

    Run it on every rank of the model's pipeline and TP groups alike (same prompts, same params); every
    rank returns the same Generation. `mesh` is needed with pp_size > 1 only. New tokens stop where the
    model's context (model.max_seq_len) ends. `decoder`: how decode steps run (default: eagerly), and the
    state it keeps for the next call."""
    params.check()
    cfg = model.cfg
    check_prompts(prompts, cfg.max_seq_len)
    device = next(model.parameters()).device
    ids, valid = left_pad(prompts, pad_id, device)
    b, length = ids.shape
    new = min(params.max_new_tokens, cfg.max_seq_len - length)
    decoder = decoder or Decoder()
    cache = decoder.prepare(model, b, length + new, mesh)
    cache.valid[:, :length] = valid
    stages = _Stages(model, cache, mesh)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    decode_step = decoder.step()

    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (b, L): each row counts its own tokens
    logits = stages.run(ids, torch.arange(length, device=device), positions, forward_step)
    positions = positions[:, -1:]  # (b, 1)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for i in range(new):
        token = torch.zeros(b, dtype=torch.long, device=device)
        logprob = torch.zeros(b, dtype=torch.float32, device=device)
        if logits is not None:
            token = choose(logits, params, generator)
            logprob = logits.log_softmax(dim=-1).gather(-1, token[:, None]).squeeze(-1)
        token, logprob = stages.share(token), stages.share(logprob)
        token = token.masked_fill(done, pad_id)
        tokens.append(token)
        logprobs.append(logprob)
        if eos_id is not None:
            done = done | (token == eos_id)
        if i == new - 1:
            break
        # Asking whether every row has stopped waits for the GPU, so ask only every few tokens: a row
        # that stopped keeps producing padding, which _per_row cuts off, so the result is the same.
        if eos_id is not None and (i + 1) % STOP_CHECK_EVERY == 0 and bool(done.all()):
            break
        slot = length + i
        cache.valid[:, slot] = True
        positions = positions + 1
        slots = torch.full((1,), slot, dtype=torch.long, device=device)
        logits = stages.run(token[:, None], slots, positions, decode_step)
    return _per_row(torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist(), eos_id)


def _per_row(tokens: list[list[int]], logprobs: list[list[float]], eos_id: int | None) -> Generation:
    out_tokens, out_logprobs = [], []
    for row_tokens, row_logprobs in zip(tokens, logprobs, strict=True):
        end = row_tokens.index(eos_id) if eos_id is not None and eos_id in row_tokens else len(row_tokens)
        out_tokens.append(row_tokens[:end])
        out_logprobs.append(row_logprobs[:end])
    return Generation(out_tokens, out_logprobs)
