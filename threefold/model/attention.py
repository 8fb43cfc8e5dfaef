"""Causal attention, optionally kept inside each document of a packed sequence (document masking).

Shape legend: b micro-batch, a query heads, k key/value heads (k divides a), s sequence, d head dim.
Heads are whatever this rank holds (a/t, k_ under tensor parallelism); nothing here communicates, so
tensor, sequence and pipeline parallelism and recomputation compose with it unchanged.

A packed sample joins documents with the EOS id. Document ids are a pure function of the input tokens
(`document_ids`), so every pipeline stage derives them from the micro-batch it already holds and nothing
extra travels between stages or into checkpoints. Token i may attend to token j when j <= i and both
belong to the same document: a block-diagonal causal mask.

Three implementations of that mask, which must agree:
- the exact reference: a dense (b, 1, s, s) boolean mask given to scaled_dot_product_attention; used on
  the CPU and wherever FlexAttention is missing;
- FlexAttention's block mask on CUDA: blocks of 128 x 128 that lie wholly outside every document are
  skipped, so masking costs nothing in memory and saves the compute of the cross-document blocks;
- with `training.attention_backend = "fa4"`, FlashAttention-4's variable-length kernels over the
  documents' boundaries (`document_spans`). Their count is a shape the kernels must be given, so the
  training loop finds them from the token ids on the host, before the copy to the device, and no step
  waits for the device to count them.

Unmasked causal attention runs scaled_dot_product_attention, or FlashAttention-4 where
`training.attention_backend = "fa4"` (threefold.model.fa4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from threefold.model.fa4 import fa4_attention, fa4_document_attention, fa4_enabled

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch keeps the dense reference
    create_block_mask = flex_attention = None  # type: ignore[assignment]

_compiled_flex: Callable[..., Any] | None = None


def document_ids(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(b, s) token ids -> (b, s) int32 document index within each row, 0 first.

    The EOS that ends a document belongs to it (it predicts the next document's first token, as in an
    unmasked run); the token after it starts the next document.
    """
    is_eos = (tokens == eos_token_id).to(torch.int32)
    return (torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos).contiguous()


def document_spans(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(b, s) token ids -> int32 (n + 1,): the cumulative boundaries of the n documents of the rows laid
    end to end (FA4's cu_seqlens). A document ends after its EOS, as in `document_ids`, and at the end of
    its row. Computed where `tokens` are: from device tensors the host waits for the device."""
    b, s = tokens.shape
    after_eos = torch.nonzero(tokens.reshape(-1) == eos_token_id).reshape(-1) + 1
    row_ends = torch.arange(1, b + 1, device=tokens.device) * s
    start = torch.zeros(1, dtype=after_eos.dtype, device=tokens.device)
    return torch.unique(torch.cat([start, after_eos, row_ends])).to(torch.int32)  # sorted


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(b, s) document ids -> (b, s) int64 position of each token within its document (0 at each start)."""
    s = doc_ids.shape[1]
    index = torch.arange(s, device=doc_ids.device).expand_as(doc_ids)  # (b, s)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # The latest document start at or before each token: a running maximum of the start indices.
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return index - first


@dataclass(frozen=True)
class DocumentMask:
    """A block-diagonal causal mask built once per micro-batch and read by every layer.

    Without context parallelism exactly one of `dense` ((b, 1, s, s) bool, True = may attend), `block`
    (a FlexAttention BlockMask) and `spans` (FA4) is set. Under context parallelism `doc_ids` holds the
    whole sequence's document ids (b, s), which the ring reads block by block; all-to-all attention, which
    sees whole sequences, also gets `dense` or `block` (threefold.parallel.context.context_document_mask).
    """

    dense: torch.Tensor | None = None
    block: Any = None
    doc_ids: torch.Tensor | None = None
    spans: torch.Tensor | None = None
    """With FA4: the documents' boundaries (`document_spans`), on the device; the only field set."""


def flex_available(device: torch.device) -> bool:
    """FlexAttention is used on CUDA when this torch has it; the CPU keeps the exact dense reference."""
    return device.type == "cuda" and flex_attention is not None


def document_mask(doc_ids: torch.Tensor, *, use_flex: bool | None = None) -> DocumentMask:
    """The mask of (b, s) document ids; `use_flex` None picks FlexAttention where `flex_available`."""
    if use_flex is None:
        use_flex = flex_available(doc_ids.device)
    b, s = doc_ids.shape
    if not use_flex:
        causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
        same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (b, s, s)
        return DocumentMask(dense=(same & causal)[:, None])  # (b, 1, s, s)

    def mask_mod(batch: Any, head: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (doc_ids[batch, q_idx] == doc_ids[batch, kv_idx])

    if s % FLEX_BLOCK == 0:
        return DocumentMask(block=_document_block_mask(doc_ids, mask_mod))
    assert create_block_mask is not None
    return DocumentMask(block=create_block_mask(mask_mod, b, None, s, s, device=doc_ids.device))


FLEX_BLOCK = 128
"""FlexAttention's block size: the mask is classified as empty, full or partial per 128 x 128 tile."""


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, 1, nq, nk) bool tiles -> per query tile the count of set tiles and their kv indices first, in
    ascending order (FlexAttention's kv_num_blocks / kv_indices)."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts, order.to(torch.int32)


def _document_block_mask(doc_ids: torch.Tensor, mask_mod: Callable[..., Any]) -> Any:
    """The block-diagonal causal BlockMask of (b, s) document ids, s a multiple of FLEX_BLOCK, found from
    each tile's first and last document id instead of evaluating `mask_mod` at all s x s pairs
    (`create_block_mask`, ~4 ms a llama-1b micro-batch on an H100). Ids never decrease along a row, so a
    kv tile j below the diagonal shares a document with query tile i iff j's last id >= i's first id, and
    every pair in it may attend iff both tiles hold one and the same document; a diagonal tile is always
    partial (causal inside it). These are the tiles create_block_mask finds."""
    from torch.nn.attention.flex_attention import BlockMask

    b, s = doc_ids.shape
    tiles = doc_ids.reshape(b, s // FLEX_BLOCK, FLEX_BLOCK)
    first, last = tiles[:, :, 0], tiles[:, :, -1]  # (b, n)
    n = first.shape[1]
    below = torch.ones(n, n, dtype=torch.bool, device=doc_ids.device).tril(-1)  # kv tile j < query tile i
    diagonal = torch.eye(n, dtype=torch.bool, device=doc_ids.device)
    shares = last[:, None, :] >= first[:, :, None]  # (b, i, j)
    one_document = first == last  # (b, n)
    # Below the diagonal j's last id <= i's first, so sharing one means both tiles hold that one document.
    full = below & shares & one_document[:, :, None] & one_document[:, None, :]
    partial = ((below & shares) | diagonal) & ~full
    kv_num, kv_idx = _ordered(partial[:, None])
    full_num, full_idx = _ordered(full[:, None])
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_kv_num_blocks=full_num, full_kv_indices=full_idx,
        BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(s, s),
    )  # fmt: skip


@torch.compiler.assume_constant_result
def _flash_enabled() -> bool:
    """Whether torch may pick flash attention (a process-wide switch, set once by use_attention_backend).
    Read as a constant under torch.compile: the plain call returns a Python bool, which torch.compile
    cannot put in a graph, so it split every compiled layer on the GPU in six graphs around attention."""
    return torch.backends.cuda.flash_sdp_enabled()


FLEX_TILES = {
    "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
    "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
    "bwd_num_stages": 3, "bwd_num_warps": 4,
}  # fmt: skip
"""FlexAttention's Triton tiles on Hopper for 16-bit heads of 64 (llama-1b's): the ones torch's own
autotuning picked on an H100 for document-masked attention (bench/flex_configs.py), where they ran forward
+ backward 12% faster than torch's default for this GPU (128 x 128 forward tiles, 64 x 128 backward)."""

PIN_FLEX_TILES = True
"""Whether `attend` gives FlexAttention FLEX_TILES where they apply. On: through threefold's document-masked
step on an H100 they gained 0.85% (seq 2048, micro-batch 8) and 1.4% (seq 8192, micro-batch 4) on the bench
path and 0.7% through `threefold train`, 10-13% in the kernel alone (docs/benchmarks.md, nineteenth session;
bench/results/issue18-2026-12-05-s19/callE.sh measures them again)."""


@torch.compiler.assume_constant_result
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def flex_kernel_options(q: torch.Tensor) -> dict[str, int] | None:
    """The kernel options threefold pins for FlexAttention over `q`'s heads, or None for torch's choice:
    pinned only where measured and tested, lengths a multiple of FLEX_BLOCK."""
    pinnable = q.shape[-1] == 64 and q.shape[-2] % FLEX_BLOCK == 0
    if PIN_FLEX_TILES and pinnable and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if _hopper(q.device.index if q.device.index is not None else torch.cuda.current_device()):
            return FLEX_TILES
    return None


def _flex() -> Callable[..., Any]:
    # Compiled once per process: the eager FlexAttention materializes the scores and is only a reference.
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    mask: DocumentMask | None = None,
) -> torch.Tensor:
    """Causal attention of (b, a, s, d) queries over (b, k, s, d) keys and values -> (b, a, s, d).

    With `doc_ids` ((b, s)) or a prebuilt `mask` from `document_mask`, attention stays inside each
    document; pass the mask when several layers share one micro-batch, so it is built once.
    """
    if mask is None and doc_ids is not None:
        mask = document_mask(doc_ids)
    group_size = q.shape[1] // k.shape[1]
    if mask is None and fa4_enabled() and q.shape[2] == k.shape[2]:
        return fa4_attention(q, k, v)
    if mask is not None and mask.spans is not None:
        return fa4_document_attention(q, k, v, mask.spans)
    if mask is not None and mask.block is not None:
        return _flex()(
            q, k, v, block_mask=mask.block, enable_gqa=group_size > 1, kernel_options=flex_kernel_options(q)
        )
    flash = mask is None and q.is_cuda and q.dtype != torch.float32 and _flash_enabled()
    if group_size > 1 and not flash:
        # Query head j reads kv head j // group_size. Flash attention reads the shared heads in place
        # (enable_gqa); the other kernels get copies.
        k = k.repeat_interleave(group_size, dim=1)
        v = v.repeat_interleave(group_size, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group_size > 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
