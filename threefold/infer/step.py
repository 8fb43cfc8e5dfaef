"""One forward of new tokens through this rank's part of a Transformer, keys and values from the cache.

Shape legend (local = this TP rank's part): b batch, s new tokens (the prompt, then 1 per decode step),
T cache length, h hidden, a/t local query heads, k_ local kv heads, d head dim, V vocabulary.

The training model's modules are reused as they are (same parameters, same TP layers); only the
attention differs: it appends the new keys and values to the cache and attends over all T slots under
the cache's mask. Shapes do not depend on how much of the cache is filled, so a decode step has one
static shape and compiles (or captures) once.

With `matvec` (a compiled step of one token in all: batch 1 decoding), every projection is written as a
product and a sum over the input features instead of a matrix product. The compiler turns each into one
reduction kernel that reads the weight once, at close to the memory's speed, where the library's
matrix-product kernels for a single row reach about half of it (bench/decode_profile.py). Attention over
the cache is written the same way. Eagerly that form would materialize the products, so only compiled
steps use it.

A model as training built it (samples during training) may have sequence-parallel layers and float8
GEMMs. Generation splits no sequence, so their outputs are all-reduced over TP instead of scattered along
the sequence; and its GEMMs run in the weights' own dtype, since a decode step's few tokens are not the
multiple of 16 rows that float8 kernels take.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from threefold.infer.cache import KVCache
from threefold.model.transformer import Attention, Block, Transformer, apply_rope, gather_logits
from threefold.parallel.comm import reduce_from_tp
from threefold.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


def _matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (b, s, in) @ weight (out, in)^T [+ bias] as an fp32 product-and-sum; the result in x's dtype."""
    y = (x.float().unsqueeze(-2) * weight.float()).sum(dim=-1)  # (b, s, out)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _project(layer: nn.Module, x: torch.Tensor, matvec: bool) -> torch.Tensor:
    """The layer's output for x, whole on every TP rank (see the module for what differs from training);
    with `matvec`, through `_matvec` and the row-parallel all-reduce."""
    assert isinstance(layer, ColumnParallelLinear | RowParallelLinear)
    training_only = layer.fp8 is not None or getattr(layer, "sequence_parallel", False)
    if not matvec and not training_only:
        return layer(x)
    product = _matvec if matvec else F.linear
    if isinstance(layer, ColumnParallelLinear):
        return product(x, layer.weight, layer.bias)
    y = reduce_from_tp(product(x, layer.weight), layer.tp_group)
    return y + layer.bias if layer.bias is not None else y


def _qkv_matvec(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query, key and value projections of x (b, s, h) as one product-and-sum over their stacked
    weights: compiled, the concatenation becomes the reduction's loads, so the three run as one kernel
    that reads each weight once, instead of three small ones that each pay a launch and a ramp-up."""
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([p.weight for p in layers])
    bias = None
    if any(p.bias is not None for p in layers):
        bias = torch.cat(
            [p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0]) for p in layers]
        )
    q, k, v = _matvec(x, weight, bias).split([p.weight.shape[0] for p in layers], dim=-1)
    return q, k, v


def _embed(embedding: VocabParallelEmbedding, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings (b, s, h), whole on every TP rank, also of a sequence-parallel embedding."""
    if not embedding.sequence_parallel or dist.get_world_size(embedding.tp_group) == 1:
        return embedding(ids)
    local_ids = ids - embedding.vocab_start
    outside = (local_ids < 0) | (local_ids >= embedding.weight.shape[0])
    out = F.embedding(local_ids.masked_fill(outside, 0), embedding.weight)
    return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), embedding.tp_group)


def _one_token_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Softmax attention of a few queries (b, k_, g, d) over the cache (b, k_, T, d) under mask (b, 1, g, T),
    written as products, sums and a softmax in fp32 so the compiler fuses it into a few small kernels; a
    fused attention kernel pays its launch and tiling for a handful of rows. Same scale as SDPA's."""
    scores = (q.float().unsqueeze(-2) * keys.float().unsqueeze(2)).sum(-1) * q.shape[-1] ** -0.5  # (b,k_,g,T)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (weights.unsqueeze(-1) * values.float().unsqueeze(2)).sum(-2).to(q.dtype)  # (b, k_, g, d)


def _attention(
    attn: Attention,
    x: torch.Tensor,
    layer: int,
    cache: KVCache,
    slots: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor,
    matvec: bool,
) -> torch.Tensor:
    b, s, _ = x.shape
    d = attn.head_dim
    heads, kv_heads = attn.num_local_heads, attn.num_local_kv_heads
    if matvec:
        q, k, v = _qkv_matvec(attn, x)
    else:
        q, k, v = (_project(p, x, matvec) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    q = q.view(b, s, heads, d).transpose(1, 2)  # (b, a/t, s, d)
    k = k.view(b, s, kv_heads, d).transpose(1, 2)  # (b, k_, s, d)
    v = v.view(b, s, kv_heads, d).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    cache.write(layer, slots, k, v)
    keys, values = cache.keys[layer], cache.values[layer]  # (b, k_, T, d)
    group_size = attn.num_local_heads // kv_heads
    # Query head j reads kv head j // group_size: fold each group's queries into the query axis,
    # (b, k_, g s, d), so every kernel reads the shared keys in place instead of copies of the cache.
    q = q.reshape(b, kv_heads, group_size * s, d)
    mask = mask.unsqueeze(2).expand(b, 1, group_size, s, mask.shape[-1]).reshape(b, 1, group_size * s, -1)
    if matvec:
        y = _one_token_attention(q, keys, values, mask)
    else:
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (b, k_, g s, d)
    y = y.reshape(b, attn.num_local_heads, s, d).transpose(1, 2).reshape(b, s, attn.num_local_heads * d)
    return _project(attn.o_proj, y, matvec)  # all-reduced over TP: (b, s, h)


def _mlp(block: Block, x: torch.Tensor, matvec: bool) -> torch.Tensor:
    mlp = block.mlp
    if mlp.gated:
        hidden = F.silu(_project(mlp.gate_proj, x, matvec)) * _project(mlp.up_proj, x, matvec)  # (b, s, f/t)
    else:
        hidden = F.gelu(_project(mlp.up_proj, x, matvec), approximate="tanh")
    return _project(mlp.down_proj, hidden, matvec)  # (b, s, h)


@torch.no_grad()
def forward_step(
    model: Transformer,
    x: torch.Tensor,
    cache: KVCache,
    slots: torch.Tensor,
    positions: torch.Tensor,
    *,
    last_only: bool = True,
    matvec: bool = False,
) -> torch.Tensor:
    """Run token ids (b, s) (first stage) or hidden states (b, s, h) at cache `slots` (s,) with token
    `positions` (b, s). Returns hidden states (b, s, h) without a head, else full fp32 logits: (b, V) of
    the last token when `last_only`, (b, s, V) otherwise. The caller marks the slots valid first.
    `matvec`: projections as products and sums when there is one token in all (for compiled steps)."""
    cfg = model.cfg
    if model.has_embedding:
        ids = x
        x = _embed(model.embed_tokens, ids)  # (b, s, h)
        if cfg.arch == "gpt2":
            x = x + model.embed_positions(positions)
    rope = None
    if cfg.arch == "llama":
        # Read at the tokens' positions: without them, a context-parallel model's table is its chunks'.
        rope = model.rope(cache.max_len, x.device, positions)  # (b, 1, s, d) each
    mask = cache.mask(slots)  # (b, 1, s, T)
    matvec = matvec and x.shape[0] * x.shape[1] == 1
    for name, block in model.layers.items():
        assert isinstance(block, Block)
        normed = block.input_layernorm(x)
        x = x + _attention(block.self_attn, normed, int(name), cache, slots, rope, mask, matvec)
        x = x + _mlp(block, block.post_attention_layernorm(x), matvec)
    if not model.has_head:
        return x
    if last_only:
        x = x[:, -1]  # (b, h)
    head = _matvec if matvec else F.linear
    logits = head(model.norm(x), model.output_weight())  # (b, [s,] Vp/t)
    return gather_logits(logits, model.tp.group, cfg.vocab_size).float()
