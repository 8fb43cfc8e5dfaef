"""The key/value cache: one preallocated buffer per local layer, written in place.

Shapes: b batch, k_ local kv heads, T cache length (prompt + new tokens), d head dim.

Every row of the batch shares the slot index of each step (prompts are left-padded to one length), so a
step writes its keys at the same slots in every row. What differs per row is which slots hold a real
token (`valid`) and each token's position (slot minus the row's padding), which RoPE and GPT-2's position
embedding read. The buffers never change address, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of layers `layer_ids`, (b, k_, T, d) each, plus which slots hold real tokens."""

    def __init__(
        self,
        layer_ids: list[int],
        *,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (b, T)
        self.max_len = max_len

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store (b, k_, s, d) keys and values of the s new tokens at `slots` (s,)."""
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)

    def mask(self, slots: torch.Tensor) -> torch.Tensor:
        """(b, 1, s, T) boolean attention mask of queries at `slots`: real keys at or before the query.

        A padding query also sees itself, so its softmax row is never empty (its output is discarded).
        """
        keys = torch.arange(self.max_len, device=slots.device)
        causal = keys[None, :] <= slots[:, None]  # (s, T)
        itself = keys[None, :] == slots[:, None]
        return ((self.valid[:, None, :] & causal[None]) | itself[None]).unsqueeze(1)
