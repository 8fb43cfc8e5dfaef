"""FlashAttention-4 (the `flash-attn-4` package's CuTe-DSL kernels) as the causal attention kernel on
Hopper and Blackwell GPUs: `training.attention_backend = "fa4"`.

Shape legend: b micro-batch, s sequence, a query heads, k key/value heads (k divides a), d head dim.

The kernels are reached through two operators of threefold's own (`threefold::fa4_forward`,
`threefold::fa4_backward`), joined by `register_autograd`. Through operators, torch.compile keeps each
kernel call opaque in its graph (it cannot trace into the package's JIT), while the compiler still fuses
the layout change of q, k and v into the kernel that writes them. Grouped-query attention reads the
shared key/value heads in place. The package is imported only when the backend is chosen; on a machine
without it the choice fails with what to install.

Why not torch's own FA4 switch (`torch.nn.attention.activate_flash_attention_impl`): it replaces the
flash SDPA kernels of the whole process and follows the package's private call signature of the torch
release it shipped with, so a newer package breaks it; here the one call site is ours to keep in step.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch

from threefold.model.cute_packages import check_hopper_or_blackwell, import_kernels

KERNELS_MODULE = "flash_attn.cute.interface"
"""Where the FA4 kernels live (the `flash-attn-4` package on PyPI)."""

OPTION = "training.attention_backend = 'fa4'"
PIN = "flash-attn-4==4.0.0b40"
"""The release threefold's calls into FA4 were written and measured against."""

_active = False


@functools.cache
def kernels() -> ModuleType:
    """The FA4 kernel module; a clear error when the package is missing or has changed."""
    install = f"FlashAttention-4: pip install --pre {PIN}"
    return import_kernels(KERNELS_MODULE, ("_flash_attn_fwd", "_flash_attn_bwd"), OPTION, install, PIN)


def use_fa4(active: bool) -> None:
    """Route causal attention without a document mask through FA4 in this process (a process-wide switch
    like torch's SDPA back-end flags, set once when the trainer is built)."""
    global _active
    if active:
        kernels()  # fail now, with what to install, rather than inside the first compiled step
    _active = active


@torch.compiler.assume_constant_result
def fa4_enabled() -> bool:
    """Whether `use_fa4(True)` was called; a constant under torch.compile, so no graph splits on it."""
    return _active


def check_fa4_device(device: torch.device) -> None:
    """FA4 runs on compute capability 9.x (Hopper) and 10.x (Blackwell); say so before a step fails."""
    check_hopper_or_blackwell(device, OPTION)


def _run_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **documents: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's causal forward -> (out, lse); `documents` are the variable-length arguments (`_documents`)."""
    result = kernels()._flash_attn_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), softmax_scale=scale, causal=True, return_lse=True,
        **documents,
    )  # fmt: skip
    return result[0].contiguous(), result[1].contiguous()  # later releases return more (scores for MLA)


def _run_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    **documents: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = kernels()._flash_attn_bwd(
        q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), dout.contiguous(), lse.contiguous(),
        softmax_scale=scale, causal=True, **documents,
    )[:3]  # fmt: skip
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _documents(spans: torch.Tensor, max_len: int) -> dict[str, Any]:
    """The kernels' variable-length arguments: one sequence per document, the same for queries and keys."""
    return {"cu_seqlens_q": spans, "cu_seqlens_k": spans, "max_seqlen_q": max_len, "max_seqlen_k": max_len}


def _empty_grads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the backward kernels return, for torch.compile's tracing: contiguous tensors like q, k, v."""
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=contiguous),
        torch.empty_like(k, memory_format=contiguous),
        torch.empty_like(v, memory_format=contiguous),
    )


@torch.library.custom_op("threefold::fa4_forward", mutates_args=())
def fa4_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of (b, s, a, d) q over (b, s, k, d) k, v -> out (b, s, a, d) and the fp32
    log-sum-exp of each query's scores, (b, a, s), which the backward reads."""
    return _run_forward(q, k, v, scale)


@fa4_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, a, _ = q.shape
    out = q.new_empty(b, s, a, v.shape[-1])
    return out, q.new_empty(b, a, s, dtype=torch.float32)


@torch.library.custom_op("threefold::fa4_backward", mutates_args=())
def fa4_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `fa4_forward` for q, k, v, in their (b, s, heads, d) shapes."""
    return _run_backward(dout, q, k, v, out, lse, scale)


@fa4_backward.register_fake
def _(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _empty_grads(q, k, v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(
    ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    # The log-sum-exp is an output for the backward only; nothing upstream differentiates it.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = fa4_backward(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


fa4_forward.register_autograd(_backward, setup_context=_setup_context)


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of (b, a, s, d) queries over (b, k, s, d) keys and values -> (b, a, s, d), the
    layout `scaled_dot_product_attention` takes, by FA4 in its (b, s, heads, d) layout."""
    scale = q.shape[-1] ** -0.5
    # contiguous() here, in the traced graph, lets the compiler write q, k, v (after RoPE) straight in
    # the kernel's layout instead of a copy inside the operator.
    q_, k_, v_ = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    out, _ = fa4_forward(q_, k_, v_, scale)
    return out.transpose(1, 2)


# Document masking: FA4's variable-length kernels over the packed rows. The rows of a micro-batch are
# flattened into one (b * s, heads, d) sequence and `spans` (int32, n + 1) holds the cumulative boundaries
# of its n documents (threefold.model.attention.document_spans); attention stays inside each document.
# `max_len` bounds a document's length (the row length, so that nothing is read back from the device).


@torch.library.custom_op("threefold::fa4_varlen_forward", mutates_args=())
def fa4_varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, max_len: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention inside each document of (t, a, d) q over (t, k, d) k, v (t = b * s tokens) ->
    out (t, a, d) and the fp32 log-sum-exp (a, t)."""
    return _run_forward(q, k, v, scale, **_documents(spans, max_len))


@fa4_varlen_forward.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, max_len: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    t, a, _ = q.shape
    return q.new_empty(t, a, v.shape[-1]), q.new_empty(a, t, dtype=torch.float32)


@torch.library.custom_op("threefold::fa4_varlen_backward", mutates_args=())
def fa4_varlen_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spans: torch.Tensor,
    max_len: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `fa4_varlen_forward` for q, k, v, in their (t, heads, d) shapes."""
    return _run_backward(dout, q, k, v, out, lse, scale, **_documents(spans, max_len))


@fa4_varlen_backward.register_fake
def _(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spans: torch.Tensor,
    max_len: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _empty_grads(q, k, v)


def _varlen_setup_context(
    ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
) -> None:
    q, k, v, spans, max_len, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, spans)
    ctx.max_len, ctx.scale = max_len, scale


def _varlen_backward(
    ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None, None]:
    q, k, v, out, lse, spans = ctx.saved_tensors
    dq, dk, dv = fa4_varlen_backward(dout, q, k, v, out, lse, spans, ctx.max_len, ctx.scale)
    return dq, dk, dv, None, None, None


fa4_varlen_forward.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def fa4_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor
) -> torch.Tensor:
    """Causal attention inside each document of (b, a, s, d) queries over (b, k, s, d) keys and values ->
    (b, a, s, d), by FA4's variable-length kernels; `spans` are the documents' boundaries over the
    flattened rows (int32 (n + 1,), on q's device)."""
    b, a, s, d = q.shape
    q_, k_, v_ = (t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[-1]) for t in (q, k, v))
    out, _ = fa4_varlen_forward(q_, k_, v_, spans, s, d**-0.5)
    return out.view(b, s, a, v.shape[-1]).transpose(1, 2)
