"""Decoder-only transformer, Llama or GPT-2 flavour, built from tensor-parallel layers.

The Llama flavour also covers Qwen2 (`attention_bias`: biases on q, k, v) and Llama 3.x RoPE scaling.

Shape legend (local = this TP rank's part):
    b micro-batch, s sequence, s_ = s/t under sequence parallelism else s, h hidden,
    a query heads, k kv heads, d head dim, t tp_size, f MLP width, Vp padded vocabulary;
    k_ = k/t kv heads per rank, or 1 when t > k (each kv head then replicated over t/k ranks).

A `Transformer` holds a contiguous range of layers [first_layer, last_layer) and optionally the
embedding (first pipeline stage) and the final norm + output layer + loss (last stage), so a pipeline
stage is the same class. Layer modules are keyed by their global index, so parameter names are the
same whatever the split (`layers.7.self_attn.q_proj.weight`).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from typing import Protocol, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from threefold.config import ATTENTION_BACKENDS, ModelConfig
from threefold.model.attention import DocumentMask, attend, document_mask, document_positions
from threefold.model.fa4 import use_fa4
from threefold.model.loss import linear_cross_entropy, output_weight_casts
from threefold.model.quack_mlp import fused_mlp
from threefold.parallel.context import context_attention
from threefold.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
    full_shape_of,
    mark_sequence_parallel,
    shard_of,
)


class UnitHooks(Protocol):
    """What runs around each unit of a Transformer's forward (see Transformer.set_unit_hooks)."""

    def enter(self, unit: int, x: torch.Tensor) -> torch.Tensor: ...

    def leave(self, unit: int, x: torch.Tensor) -> torch.Tensor: ...


def make_norm(cfg: ModelConfig, tp: TPContext) -> nn.Module:
    norm = (
        RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if cfg.arch == "llama"
        else nn.LayerNorm(cfg.hidden_size, cfg.norm_eps)
    )
    for p in norm.parameters():
        mark_sequence_parallel(p, tp.sequence_parallel)
    return norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 as the reference implementations do; cast back before the weight.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_frequencies(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """Rotation frequencies (d/2,) in radians per token, fp32, with Llama 3.x scaling if it is on.

    Llama 3.x scaling stretches the usable context by slowing the slow rotations only. Counting the turns
    each frequency makes over the pretraining context (`rope_original_max_len` / wavelength): one making
    fewer than `rope_low_freq_factor` turns is divided by `rope_scaling_factor`, one making more than
    `rope_high_freq_factor` turns is kept (the model saw it wrap many times), and in between the two
    results are blended linearly in the turn count.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    if cfg.rope_scaling_factor == 1.0:
        return inv_freq
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq  # tokens per turn
    turns = cfg.rope_original_max_len / wavelength  # turns per original context
    keep = ((turns - low) / (high - low)).clamp(0.0, 1.0)  # 0: fully scaled, 1: unchanged
    return keep * inv_freq + (1 - keep) * inv_freq / cfg.rope_scaling_factor


def rope_cache(cfg: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (s, d) in fp32, in the half-split layout (first half, second half)."""
    inv_freq = rope_frequencies(cfg, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (b, heads, s, d) by position, cos and sin (s, d) or per row (b, 1, s, d); computed in fp32."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.use_rope = cfg.arch == "llama"
        self.head_dim = cfg.head_dim
        self.num_local_heads = cfg.num_heads // tp.size
        assert cfg.num_kv_heads is not None  # filled in by ModelConfig.__post_init__
        kv = cfg.num_kv_heads
        # Fewer kv heads than ranks (multi-query attention, or t = 8 on 4 kv heads): rank r holds the one
        # kv head its query heads read, (r k) // t, replicated over the t/k consecutive ranks that read it.
        self.num_local_kv_heads = max(1, kv // tp.size)
        kv_replicas = max(1, tp.size // kv)
        bias = cfg.arch == "gpt2"
        qkv_bias = bias or cfg.attention_bias  # Qwen2 biases q, k, v but not o
        h, d = cfg.hidden_size, cfg.head_dim
        defer = tp.weight_grads  # zero-bubble schedules compute the weight gradients later
        column = partial(
            ColumnParallelLinear, tp_group=tp.group, bias=qkv_bias, fp8=tp.fp8, weight_grads=defer,
            fp8_weight_cache=tp.fp8_weight_cache,
        )  # fmt: skip
        self.q_proj = column(h, cfg.num_heads * d)
        self.k_proj = column(h, kv * d, replicas=kv_replicas)
        self.v_proj = column(h, kv * d, replicas=kv_replicas)
        self.o_proj = RowParallelLinear(
            cfg.num_heads * d, h, tp_group=tp.group, bias=bias, sequence_parallel=tp.sequence_parallel,
            fp8=tp.fp8, weight_grads=defer, fp8_weight_cache=tp.fp8_weight_cache,
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: DocumentMask | None = None,
    ) -> torch.Tensor:
        q, k, v = self.tp.project(x, [self.q_proj, self.k_proj, self.v_proj])  # (b, s, a/t * d), (b, s, k_ d)
        b, s, _ = q.shape
        q = q.view(b, s, self.num_local_heads, self.head_dim).transpose(1, 2)  # (b, a/t, s, d)
        k = k.view(b, s, self.num_local_kv_heads, self.head_dim).transpose(1, 2)  # (b, k_, s, d)
        v = v.view(b, s, self.num_local_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            assert rope is not None
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.tp.recompute == "selective":
            # Keep only q, k, v: the core is recomputed in backward (cheap next to the projections).
            y = checkpoint(self.core, q, k, v, mask, use_reentrant=False)
        else:
            y = self.core(q, k, v, mask)
        y = y.transpose(1, 2).reshape(b, s, self.num_local_heads * self.head_dim)
        return self.o_proj(y)  # (b, s_, h)

    def core(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask | None = None
    ) -> torch.Tensor:
        """Causal attention of (b, a/t, s, d) queries over (b, k_, s, d) keys and values, inside each
        document when a mask is given (under context parallelism s is this rank's part, s/cp, and the
        keys of the other parts are read across ranks)."""
        if self.tp.context is not None:
            doc_ids = mask.doc_ids if mask is not None else None
            whole = partial(attend, mask=mask)
            return context_attention(q, k, v, self.tp.context, doc_ids=doc_ids, whole=whole)
        return attend(q, k, v, mask=mask)


def use_attention_backend(name: str) -> None:
    """Choose the CUDA kernel behind scaled_dot_product_attention for this process ('auto': torch's
    choice, flash attention on Hopper; 'fa4': FlashAttention-4, threefold.model.fa4). A process-wide
    setting, made once when the trainer is built."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {ATTENTION_BACKENDS}")
    enable = {
        "flash": torch.backends.cuda.enable_flash_sdp,
        "cudnn": torch.backends.cuda.enable_cudnn_sdp,
        "efficient": torch.backends.cuda.enable_mem_efficient_sdp,
    }
    for backend, switch in enable.items():
        switch(name in ("auto", "fa4", backend))
    torch.backends.cuda.enable_math_sdp(True)  # the fallback for shapes the others refuse
    # FA4 takes causal attention without a document mask; the rest keeps torch's choice.
    use_fa4(name == "fa4")


class MLP(nn.Module):
    """SwiGLU (llama: down(silu(gate x) * up x)) or GeLU (gpt2: down(gelu(up x)))."""

    def __init__(self, cfg: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        self.tp = tp
        self.gated = cfg.arch == "llama"
        bias = cfg.arch == "gpt2"
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        assert f is not None  # filled in by ModelConfig.__post_init__
        column = partial(
            ColumnParallelLinear, tp_group=tp.group, bias=bias, fp8=tp.fp8, weight_grads=tp.weight_grads,
            fp8_weight_cache=tp.fp8_weight_cache,
        )  # fmt: skip
        if self.gated:
            self.gate_proj = column(h, f)
        self.up_proj = column(h, f)
        self.down_proj = RowParallelLinear(
            f, h, tp_group=tp.group, bias=bias, sequence_parallel=tp.sequence_parallel, fp8=tp.fp8,
            weight_grads=tp.weight_grads, fp8_weight_cache=tp.fp8_weight_cache,
        )  # fmt: skip
        self.fused = fused_mlp() if self.gated and tp.mlp_backend == "quack" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            x = self.tp.enter(x)
            down = self.down_proj
            return down.reduce(self.fused(x, self.gate_proj.weight, self.up_proj.weight, down.weight))
        if self.gated:
            gate, up = self.tp.project(x, [self.gate_proj, self.up_proj])
            hidden = F.silu(gate) * up  # (b, s, f/t)
        else:
            (up,) = self.tp.project(x, [self.up_proj])
            hidden = F.gelu(up, approximate="tanh")
        return self.down_proj(hidden)  # (b, s_, h)


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg, tp)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = make_norm(cfg, tp)
        self.mlp = MLP(cfg, tp)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: DocumentMask | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)  # (b, s_, h)
        return x + self.mlp(self.post_attention_layernorm(x))


def _token_embedding(cfg: ModelConfig, tp: TPContext) -> VocabParallelEmbedding:
    return VocabParallelEmbedding(
        cfg.vocab_size, cfg.hidden_size, tp_group=tp.group, sequence_parallel=tp.sequence_parallel
    )


class Transformer(nn.Module):
    """Layers [first_layer, last_layer) of the model, with the embedding and/or the head if asked."""

    def __init__(
        self,
        cfg: ModelConfig,
        tp: TPContext,
        *,
        first_layer: int = 0,
        last_layer: int | None = None,
        has_embedding: bool = True,
        has_head: bool = True,
        compiled: bool = False,
    ) -> None:
        """`compiled` (training.compile): torch.compile each layer and fuse the loss's element-wise work."""
        super().__init__()
        last_layer = cfg.num_layers if last_layer is None else last_layer
        if not 0 <= first_layer <= last_layer <= cfg.num_layers:
            raise ValueError(f"layer range [{first_layer}, {last_layer}) outside 0..{cfg.num_layers}")
        self.cfg = cfg
        self.tp = tp
        self.has_embedding = has_embedding
        self.has_head = has_head
        if has_embedding:
            self.embed_tokens = _token_embedding(cfg, tp)
            if cfg.arch == "gpt2":
                self.embed_positions = nn.Embedding(cfg.max_seq_len, cfg.hidden_size)
                # nn.Embedding declares weight a Tensor; it is a Parameter.
                mark_sequence_parallel(cast(nn.Parameter, self.embed_positions.weight), tp.sequence_parallel)
        self.layers = nn.ModuleDict({str(i): Block(cfg, tp) for i in range(first_layer, last_layer)})
        if has_head:
            if cfg.tie_embeddings and not has_embedding:
                # The last pipeline stage keeps its own copy of the tied weight (same name, so the same
                # initialization); the trainer sums its gradient with the first stage's every step.
                self.embed_tokens = _token_embedding(cfg, tp)
                self.embed_tokens.weight.tied_copy = True  # type: ignore[attr-defined]
            self.norm = make_norm(cfg, tp)
            if not cfg.tie_embeddings:
                self.lm_head = ColumnParallelLinear(
                    cfg.hidden_size, cfg.vocab_size, tp_group=tp.group, bias=False, pad_output=True
                )
        self.compiled = compiled
        if compiled:
            # imported here: it imports inductor, which only compiled models need
            from threefold.model import compile_choices

            for layer in self.layers.values():
                layer.compile(options=compile_choices.COMPILE_OPTIONS)  # lazy: traced at the first call
            self._layer_calls: Callable[[], AbstractContextManager[None]] = compile_choices.applied
        else:
            self._layer_calls = contextlib.nullcontext
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._unit_hooks: UnitHooks | None = None

    def units(self) -> list[list[nn.Module]]:
        """The modules each forward step reads, in forward order: the embedding, each layer, the head (final
        norm and output weight). ZeRO gathers parameters unit by unit (see parallel/zero_params.py)."""
        units: list[list[nn.Module]] = []
        if self.has_embedding:
            units.append([self.embed_tokens] + ([self.embed_positions] if self.cfg.arch == "gpt2" else []))
        units += [[layer] for layer in self.layers.values()]
        if self.has_head:
            units.append([self.norm, self.embed_tokens if self.cfg.tie_embeddings else self.lm_head])
        return units

    def set_unit_hooks(self, hooks: UnitHooks) -> None:
        """Have the forward pass each unit's input through `hooks.enter(unit, x)` and its output through
        `hooks.leave(unit, x)`: ZeRO waits there for (or gathers, and frees) the unit's parameters. Set
        once, after construction: the hooks belong to the gradient synchronizer built from these
        parameters."""
        assert self._unit_hooks is None, "the unit hooks are set once"
        self._unit_hooks = hooks

    def _enter(self, unit: int, x: torch.Tensor) -> torch.Tensor:
        return x if self._unit_hooks is None else self._unit_hooks.enter(unit, x)

    def _leave(self, unit: int, x: torch.Tensor) -> torch.Tensor:
        return x if self._unit_hooks is None else self._unit_hooks.leave(unit, x)

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight

    def rope(
        self, seq_len: int, device: torch.device, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin (s, d) of this rank's tokens of a `seq_len`-token sequence (its chunks under cp), or
        (b, 1, s, d) read at per-token `positions` (b, s); None without RoPE."""
        if self.cfg.arch != "llama":
            return None
        if self._rope is None or self._rope[0].shape[0] < seq_len or self._rope[0].device != device:
            self._rope = rope_cache(self.cfg, max(seq_len, self.cfg.max_seq_len), device)
        cos, sin = self._rope
        if positions is not None:
            return cos[positions][:, None], sin[positions][:, None]  # (b, 1, s, d)
        if self.tp.context is not None:
            positions = self.tp.context.positions(seq_len, device)
            return cos[positions], sin[positions]
        return cos[:seq_len], sin[:seq_len]

    def embed(self, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(b, s) token ids -> (b, s_, h) (under context parallelism s is this rank's part, s/cp);
        `positions` (b, s) replace 0..s-1 for learned positions."""
        x = self.embed_tokens(ids)
        if self.cfg.arch == "gpt2":
            seq_len = ids.shape[1]
            table = self.embed_positions.weight
            if self.tp.context is not None:
                table = table[self.tp.context.positions(seq_len * self.tp.context.size, ids.device)]
            start, end = 0, seq_len
            if self.tp.sequence_parallel:
                # Only this rank's sequence chunk: its rows' gradient is then partial, and summed over
                # the TP group with the other sequence-parallel parameters after backward.
                start = self.tp.rank * seq_len // self.tp.size
                end = start + seq_len // self.tp.size
            if positions is not None:
                x = x + self.embed_positions.weight[positions[:, start:end]]  # (b, s_, h)
            else:
                x = x + table[start:end]  # (s_, h)
        return x

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        doc_spans: torch.Tensor | None = None,
        reset_positions: bool = False,
    ) -> torch.Tensor:
        """Token ids (b, s) on the first stage, else hidden states (b, s_, h).

        With `doc_ids` ((b, s) from threefold.model.attention.document_ids, for the whole sequence on
        every stage and TP rank) attention stays inside each document, and with `reset_positions` each
        document's positions start again at 0. `doc_spans` (the same documents' boundaries,
        threefold.model.attention.document_spans, with FA4 and no context parallelism) takes attention
        through FA4's variable-length kernels instead of a mask built from `doc_ids`. Returns hidden
        states (b, s_, h) when this part has no head; with a head, the mean loss over all tokens when
        targets are given, else the local logits (b, s, Vp/t).
        """
        positions = document_positions(doc_ids) if doc_ids is not None and reset_positions else None
        if positions is not None and self.tp.context is not None:
            positions = self.tp.context.shard(positions)  # the positions of this rank's chunks
        unit = 0
        if self.has_embedding:
            seq_len = x.shape[1]
            x = self._leave(unit, self.embed(self._enter(unit, x), positions))
            unit += 1
        else:
            seq_len = x.shape[1] * (self.tp.size if self.tp.sequence_parallel else 1)
        if self.tp.context is not None:
            seq_len *= self.tp.context.size  # the whole sequence, whose positions the chunks take
        rope = self.rope(seq_len, x.device, positions)
        mask = None  # built once, read by every layer
        if doc_ids is not None and self.tp.context is not None:
            # The ring reads the ids block by block; all-to-all sees whole sequences: the usual mask.
            whole = document_mask(doc_ids) if self.tp.context.attention == "all_to_all" else DocumentMask()
            mask = DocumentMask(dense=whole.dense, block=whole.block, doc_ids=doc_ids)
        elif doc_spans is not None:
            mask = DocumentMask(spans=doc_spans)
        elif doc_ids is not None:
            mask = document_mask(doc_ids)
        with self._layer_calls():
            for layer in self.layers.values():
                x = self._enter(unit, x)
                if self.tp.fp8_weight_cache is not None:  # the layer's weight casts, at its step's first pass
                    self.tp.fp8_weight_cache.refresh(layer)
                if self.tp.recompute == "full" and torch.is_grad_enabled():
                    x = checkpoint(layer, x, rope, mask, use_reentrant=False)  # keep only each layer's input
                else:
                    x = layer(x, rope, mask)
                x = self._leave(unit, x)
                unit += 1
        if not self.has_head:
            return x
        return self._leave(unit, self._head(self._enter(unit, x), targets))

    def _head(self, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        x = self.tp.enter(self.norm(x))  # (b, s, h)
        if targets is None:
            return F.linear(x, self.output_weight())  # (b, s, Vp/t)
        weight, fp8 = self.output_weight(), self.tp.fp8 is not None and self.tp.fp8_output_layer
        cache, casts = self.tp.fp8_weight_cache, None
        if fp8 and cache is not None and cache.active:
            casts = cache.kept(weight, partial(output_weight_casts, weight.detach(), self.tp.group))
        return linear_cross_entropy(
            x,
            weight,
            targets,
            tp_group=self.tp.group,
            vocab_size=self.cfg.vocab_size,
            compiled=self.compiled,
            fp8=fp8,
            weight_casts=casts,
        )


def gather_logits(logits: torch.Tensor, tp_group: ProcessGroup, vocab_size: int) -> torch.Tensor:
    """Full logits (..., V) from local shards (..., Vp/t); for evaluation and tests, not training."""
    world = dist.get_world_size(tp_group)
    if world > 1:
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(parts, logits.contiguous(), group=tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits[..., :vocab_size]


def _init_rule(name: str, cfg: ModelConfig) -> tuple[str, float]:
    if name.endswith("bias"):
        return "zeros", 0.0
    if "norm" in name:
        return "ones", 0.0
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        # Residual-branch outputs are scaled down with depth (GPT-2 / Megatron) to keep the stream stable.
        return "normal", cfg.init_std / (2 * cfg.num_layers) ** 0.5
    return "normal", cfg.init_std


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialize every parameter from its full (unsharded) tensor, so all layouts start identical.

    Each full tensor draws from a generator seeded by (seed, parameter name): the same name gives the
    same values whatever tp_size, pipeline split or rank, and rank r keeps its shard.
    """
    for name, param in model.named_parameters():
        kind, std = _init_rule(name, model.cfg)
        shape = full_shape_of(param)
        if kind == "normal":
            gen = torch.Generator(device=param.device).manual_seed(
                seed * 1_000_003 + zlib.crc32(name.encode())
            )
            full = torch.empty(shape, device=param.device, dtype=torch.float32).normal_(
                0.0, std, generator=gen
            )
        elif kind == "ones":
            full = torch.ones(shape, device=param.device)
        else:
            full = torch.zeros(shape, device=param.device)
        param.copy_(shard_of(full, param, model.tp.rank, model.tp.size))


def build_model(
    cfg: ModelConfig,
    tp: TPContext,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    first_layer: int = 0,
    last_layer: int | None = None,
    has_embedding: bool = True,
    has_head: bool = True,
    compiled: bool = False,
) -> Transformer:
    """Build (a pipeline stage of) the model directly on `device`, initialized, in `dtype`; the keyword
    arguments after `dtype` are `Transformer`'s."""
    with torch.device(device):
        model = Transformer(
            cfg,
            tp,
            first_layer=first_layer,
            last_layer=last_layer,
            has_embedding=has_embedding,
            has_head=has_head,
            compiled=compiled,
        )
    init_weights(model, seed)
    return model.to(dtype)
