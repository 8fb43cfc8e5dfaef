"""One forward of new tokens through this rank's part of a Transformer, keys and values from the cache.

Shape legend (local = this TP rank's part): b batch, s new tokens (the prompt, then 1 per decode step),
T cache length, h hidden, a/t local query heads, k_ local kv heads, d head dim, V vocabulary.

The training model's modules are reused as they are (same parameters, same TP layers); only the
attention differs: it appends the new keys and values to the cache and attends over all T slots under
the cache's mask. Shapes do not depend on how much of the cache is filled, so a decode step has one
static shape and compiles (or captures) once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from threefold.infer.cache import KVCache
from threefold.model.transformer import Attention, Block, Transformer, apply_rope, gather_logits


def _attention(
    attn: Attention,
    x: torch.Tensor,
    layer: int,
    cache: KVCache,
    slots: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor,
) -> torch.Tensor:
    b, s, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).view(b, s, attn.num_local_heads, d).transpose(1, 2)  # (b, a/t, s, d)
    k = attn.k_proj(x).view(b, s, attn.num_local_kv_heads, d).transpose(1, 2)  # (b, k_, s, d)
    v = attn.v_proj(x).view(b, s, attn.num_local_kv_heads, d).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    cache.write(layer, slots, k, v)
    keys, values = cache.keys[layer], cache.values[layer]  # (b, k_, T, d)
    kv_heads = attn.num_local_kv_heads
    group_size = attn.num_local_heads // kv_heads
    # Query head j reads kv head j // group_size: fold each group's queries into the query axis,
    # (b, k_, g s, d), so every kernel reads the shared keys in place instead of copies of the cache.
    q = q.reshape(b, kv_heads, group_size * s, d)
    mask = mask.unsqueeze(2).expand(b, 1, group_size, s, mask.shape[-1]).reshape(b, 1, group_size * s, -1)
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (b, k_, g s, d)
    y = y.view(b, attn.num_local_heads, s, d).transpose(1, 2).reshape(b, s, attn.num_local_heads * d)
    return attn.o_proj(y)  # all-reduced over TP: (b, s, h)


def _mlp(block: Block, x: torch.Tensor) -> torch.Tensor:
    mlp = block.mlp
    if mlp.gated:
        hidden = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)  # (b, s, f/t)
    else:
        hidden = F.gelu(mlp.up_proj(x), approximate="tanh")
    return mlp.down_proj(hidden)  # (b, s, h)


@torch.no_grad()
def forward_step(
    model: Transformer,
    x: torch.Tensor,
    cache: KVCache,
    slots: torch.Tensor,
    positions: torch.Tensor,
    *,
    last_only: bool = True,
) -> torch.Tensor:
    """Run token ids (b, s) (first stage) or hidden states (b, s, h) at cache `slots` (s,) with token
    `positions` (b, s). Returns hidden states (b, s, h) without a head, else full fp32 logits: (b, V) of
    the last token when `last_only`, (b, s, V) otherwise. The caller marks the slots valid first."""
    cfg = model.cfg
    if model.has_embedding:
        ids = x
        x = model.embed_tokens(ids)  # (b, s, h)
        if cfg.arch == "gpt2":
            x = x + model.embed_positions(positions)
    rope = None
    if cfg.arch == "llama":
        cos, sin = model.rope(cache.max_len, x.device)  # type: ignore[misc]  # (T, d) each
        rope = (cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))  # (b, 1, s, d)
    mask = cache.mask(slots)  # (b, 1, s, T)
    for name, block in model.layers.items():
        assert isinstance(block, Block)
        x = x + _attention(block.self_attn, block.input_layernorm(x), int(name), cache, slots, rope, mask)
        x = x + _mlp(block, block.post_attention_layernorm(x))
    if not model.has_head:
        return x
    if last_only:
        x = x[:, -1]  # (b, h)
    logits = F.linear(model.norm(x), model.output_weight())  # (b, [s,] Vp/t)
    return gather_logits(logits, model.tp.group, cfg.vocab_size).float()
