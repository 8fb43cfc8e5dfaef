"""Megatron-style tensor-parallel layers.

Shapes: b micro-batch, s sequence, h hidden, t tp_size, V vocabulary, Vp = V padded to a multiple of t.
"(local)" marks a tensor that holds only this TP rank's shard.

Every sharded parameter carries `tp_dim` (the dimension split across the TP group) and `tp_full_size`
(its unpadded global size along that dimension), so initialization and checkpoints can rebuild the
full tensor. Replicated parameters whose gradient is a partial sum under sequence parallelism carry
`sequence_parallel = True`; their gradients are all-reduced over the TP group after backward.

A sharded parameter may also carry `tp_replicas` > 1: groups of that many consecutive TP ranks hold the
same shard, so the tensor has tp_size / tp_replicas distinct shards (the key/value projections when
tp_size exceeds num_kv_heads: each rank holds the one kv head its query heads read, as Megatron does).
Each replica's gradient then covers only its own query heads; the sum over the replicas, after
backward, is the shard's gradient (threefold.parallel.data_parallel). The first rank of each group is
the shard's primary copy (`is_tp_primary`): the one the gradient norm counts and a checkpoint saves.

`TPContext` is the one options object of the model's tensor-parallel blocks (Megatron's
ModelParallelConfig idea): the trainer builds it once from the config and every block reads its group and
switches from it, so a new option is added here and where it is read, not to every constructor between.

With `fp8` set (a recipe of threefold.parallel.fp8), the column- and row-parallel linears of the
transformer layers run their GEMMs in float8; the layers' parameters and communication stay as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from threefold.config import Fp8Recipe, MlpBackend
from threefold.parallel import fp8 as float8
from threefold.parallel import track
from threefold.parallel.comm import (
    copy_to_tp,
    gather_from_sequence,
    reduce_from_tp,
    reduce_scatter_to_sequence,
)
from threefold.parallel.context import ContextParallel
from threefold.parallel.fp8_cache import Float8WeightCache, cached_weight
from threefold.parallel.weight_grad import WeightGradQueue, accumulate, linear, weight_grads


def mark_sharded(param: nn.Parameter, tp_dim: int, full_size: int, replicas: int = 1) -> nn.Parameter:
    param.tp_dim = tp_dim  # type: ignore[attr-defined]
    param.tp_full_size = full_size  # type: ignore[attr-defined]
    param.tp_replicas = replicas  # type: ignore[attr-defined]
    return param


def mark_sequence_parallel(param: nn.Parameter, enabled: bool) -> nn.Parameter:
    param.sequence_parallel = enabled  # type: ignore[attr-defined]
    return param


def is_sharded(param: torch.Tensor) -> bool:
    return getattr(param, "tp_dim", None) is not None


def tp_replicas(param: torch.Tensor) -> int:
    """How many consecutive TP ranks hold the same shard of `param` (1 unless its shards are replicated)."""
    return getattr(param, "tp_replicas", 1)


def tp_shard_index(param: torch.Tensor, tp_rank: int) -> int:
    """Which of the distinct shards of `param` TP rank `tp_rank` holds."""
    return tp_rank // tp_replicas(param)


def num_tp_shards(param: torch.Tensor, tp_size: int) -> int:
    """How many distinct shards of a sharded `param` a TP group of `tp_size` holds."""
    return tp_size // tp_replicas(param)


def is_tp_primary(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this TP rank's copy of `param` is the one counted once across the TP group (gradient norm,
    checkpoint): every rank's own shard, the first of each group of replicas, rank 0's replicated copy."""
    if not is_sharded(param):
        return tp_rank == 0
    return tp_rank % tp_replicas(param) == 0


def shard_of(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of a full (unpadded) tensor, zero-padded along tp_dim as the layer expects."""
    if not is_sharded(param):
        return full
    dim = param.tp_dim  # type: ignore[attr-defined]
    local = param.shape[dim]
    padded = local * num_tp_shards(param, tp_size)
    if full.shape[dim] < padded:
        pad_shape = list(full.shape)
        pad_shape[dim] = padded - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    return full.narrow(dim, tp_shard_index(param, tp_rank) * local, local)


def full_shape_of(param: torch.Tensor) -> tuple[int, ...]:
    shape = list(param.shape)
    if is_sharded(param):
        shape[param.tp_dim] = param.tp_full_size  # type: ignore[attr-defined]
    return tuple(shape)


def pad_to_multiple(size: int, multiple: int) -> int:
    return multiple * math.ceil(size / multiple)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows: (out/t, in) per rank, no communication.

    The input must already be identical on every TP rank: the caller applies `copy_to_tp` (or
    `gather_from_sequence` under sequence parallelism) once for all projections reading that input.

    With `replicas` r > 1 the rows split into t/r shards only, each held by r consecutive ranks:
    (out r/t, in) per rank (the key/value projections when t exceeds the kv heads).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: ProcessGroup,
        bias: bool,
        pad_output: bool = False,
        replicas: int = 1,
        fp8: Fp8Recipe | None = None,
        weight_grads: WeightGradQueue | None = None,
        fp8_weight_cache: Float8WeightCache | None = None,
    ) -> None:
        """`weight_grads`: the queue that defers this layer's weight gradient (zero-bubble schedules);
        `fp8_weight_cache`: with `fp8`, where the weight's float8 casts are kept for a step."""
        super().__init__()
        self.weight_grads = weight_grads
        tp_size = dist.get_world_size(tp_group)
        if tp_size % replicas:
            raise ValueError(f"replicas ({replicas}) must divide tp_size ({tp_size})")
        num_shards = tp_size // replicas
        if out_features % num_shards and not pad_output:
            shards = f"tp_size ({tp_size})" if replicas == 1 else f"tp_size / replicas ({num_shards})"
            raise ValueError(f"{shards} must divide the output features ({out_features})")
        # pad_output (the vocabulary projection): zero rows up to a multiple of tp_size, masked by the loss.
        local = pad_to_multiple(out_features, num_shards) // num_shards
        self.weight = mark_sharded(nn.Parameter(torch.empty(local, in_features)), 0, out_features, replicas)
        self.bias = None
        if bias:
            self.bias = mark_sharded(nn.Parameter(torch.empty(local)), 0, out_features, replicas)
        self.fp8 = fp8
        if fp8 is not None:
            self.weight.float8_recipe = fp8  # type: ignore[attr-defined]  # read by ZeRO-3's float8 gather
        self.cached_weight = cached_weight(fp8_weight_cache, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s, in) -> (b, s, out/t)
        return linear(x, self.weight, self.bias, self.weight_grads, self.fp8, weight_casts(self))


def weight_casts(layer: ColumnParallelLinear | RowParallelLinear) -> float8.WeightOperands | None:
    """The float8 casts of `layer`'s weight kept for this step (threefold.parallel.fp8_cache), or None
    where the layer casts its weight itself."""
    return None if layer.cached_weight is None else layer.cached_weight.operands()


class _ColumnParallelProjections(torch.autograd.Function):
    """x -> [x W_i^T + b_i for each projection]: every column-parallel projection reading one input (the
    same on every TP rank), with the input gradient's all-reduce overlapped with the weight gradients.

    The input gradient is a partial sum on each TP rank. Megatron's f operator all-reduces it after the
    projections' backward, which leaves the GEMM units idle during the reduction. Here the backward
    computes the input gradient first, starts its all-reduce, computes the weight gradients while it runs,
    and only then waits. While `queue` captures, the weight gradients are deferred instead (the W of a
    zero-bubble schedule fills pipeline idle time, which is worth more than this overlap).

    With an fp8 `recipe` every GEMM runs in float8 (threefold.parallel.fp8), the shared input cast once
    for all projections in forward and once for all weight gradients in backward (deferred or not).

    With `group` None (the input made whole by the caller: one TP rank, or sequence parallelism's
    all-gather) the input gradient is returned as it is, with no collective: under an fp8 recipe the
    projections still share the input's casts, which one float8 linear per projection would repeat.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        group: ProcessGroup | None,
        recipe: Fp8Recipe | None,
        queue: WeightGradQueue | None,
        num_layers: int,
        *tensors: Any,
    ) -> Any:
        """`tensors`: each layer's weight and bias (None where it has none), then, where the step keeps
        them (threefold.parallel.fp8_cache), each weight's float8 operands, four tensors a weight
        (fp8.flatten_weight_operands)."""
        params, cast_tensors = tensors[: 2 * num_layers], tensors[2 * num_layers :]
        assert len(cast_tensors) in (0, 4 * num_layers), "the step keeps every projection's casts or none"
        ctx.num_cast_tensors = len(cast_tensors)
        casts = [float8.unflatten_weight_operands(cast_tensors[4 * i : 4 * i + 4]) for i in range(num_layers)]
        weights, biases = params[0::2], params[1::2]
        ctx.group = group
        ctx.recipe = recipe
        ctx.queue = queue
        if queue is not None:
            ctx.params = params  # for the deferred weight gradients
        ctx.set_materialize_grads(False)  # an output left out of the loss costs no GEMMs in backward
        ctx.has_bias = [b is not None for b in biases]
        if recipe is None:
            ctx.save_for_backward(x, None, *weights)
            return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))
        # x is (b*s, h) here: outputs that were views of the GEMM's would refuse the in-place ops after.
        x_fp8 = float8.operand(x, float8.E4M3, recipe, "a")
        # tensorwise, the backward's cast of x reuses this scale (a power of two: its reciprocal is exact);
        # with `casts` (each weight's float8 operands, kept for the step) their backward halves are saved
        kept = [t for c in casts if c is not None for t in c.backward]
        ctx.save_for_backward(x, x_fp8.scale if recipe == "tensorwise" else None, *weights, *kept)
        outputs = []
        for w, b, cast in zip(weights, biases, casts, strict=True):
            y = float8.forward_gemm(x_fp8, w, recipe, x.dtype, cast.forward if cast is not None else None)
            outputs.append(y if b is None else y + b)  # (b*s, out/t)
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        x, x_scale, *saved = ctx.saved_tensors
        num = len(ctx.has_bias)
        weights, kept = saved[:num], saved[num:]
        w_casts = [float8.Operand(*kept[2 * i : 2 * i + 2]) for i in range(num)] if kept else [None] * num
        h, recipe = x.shape[-1], ctx.recipe
        none = [None] * ctx.num_cast_tensors  # the float8 operands' gradients
        # (b*s, out/t) each; None for an output that took no part in the loss
        flat_grads = [g.reshape(-1, g.shape[-1]) if g is not None else None for g in grads]
        grad_input = x.new_zeros(x.shape).view(-1, h) if all(g is None for g in flat_grads) else None
        deferred = ctx.queue is not None and ctx.queue.capturing
        # float8: each dy cast once for both of its GEMMs (its weight-gradient side unless deferred)
        grads_fp8 = [
            None if g is None or recipe is None
            else float8.grad_operands(g, recipe, for_input=True, for_weight=not deferred)
            for g in flat_grads
        ]  # fmt: skip
        parts = list(zip(flat_grads, grads_fp8, weights, w_casts, strict=True))
        # Without a group (one rank, or sequence parallelism), summed last projection first: autograd's
        # order when each projection is its own linear (the one created last runs first), which the
        # zero-bubble schedules' layers are, so that both paths give the same bits.
        for g, g_fp8, w, w_cast in reversed(parts) if ctx.group is None else parts:
            if g is None:
                continue
            if g_fp8 is not None:
                assert recipe is not None and g_fp8.for_input is not None
                part = float8.grad_input_gemm(g_fp8.for_input, w, recipe, g.dtype, w_cast)
                grad_input = part if grad_input is None else grad_input.add_(part)
            else:
                grad_input = g.mm(w) if grad_input is None else grad_input.addmm_(g, w)  # (b*s, h)
        assert grad_input is not None
        if ctx.group is None:
            param_grads = _weight_grads(x, x_scale, recipe, ctx.has_bias, flat_grads, grads_fp8)
            return (grad_input.view(x.shape), None, None, None, None, *param_grads, *none)
        with track.collective(ctx.group, "all_reduce"):
            reduced = torch.ops._c10d_functional.all_reduce(grad_input, "sum", ctx.group.group_name)
        if deferred:
            ctx.queue.defer(_deferred_projection_grads(x, grads, ctx.params, recipe))
            with track.waiting_for(ctx.group, "all_reduce(input gradient)"):
                reduced = torch.ops._c10d_functional.wait_tensor(reduced)
            return (reduced.view(x.shape), None, None, None, None, *([None] * len(ctx.params)), *none)
        # the weight gradients run while the all-reduce is in flight
        param_grads = _weight_grads(x, x_scale, recipe, ctx.has_bias, flat_grads, grads_fp8)
        with track.waiting_for(ctx.group, "all_reduce(input gradient)"):
            reduced = torch.ops._c10d_functional.wait_tensor(reduced)
        return (reduced.view(x.shape), None, None, None, None, *param_grads, *none)


def _weight_grads(
    x: torch.Tensor,
    x_scale: torch.Tensor | None,
    recipe: Fp8Recipe | None,
    has_bias: list[bool],
    flat_grads: list[torch.Tensor | None],
    grads_fp8: list[Any],
) -> list[torch.Tensor | None]:
    """[dW_i, db_i] of every projection of `_ColumnParallelProjections`' backward (None for an output left
    out of the loss); under fp8, the input x cast once for all of them (with its forward scale
    `x_scale`, tensorwise)."""
    flat_input = x.reshape(-1, x.shape[-1])
    cast = None if x_scale is None else x_scale.reciprocal()
    x_fp8 = None if recipe is None else float8.operand(flat_input, float8.E4M3, recipe, "b", cast)
    param_grads: list[torch.Tensor | None] = []
    for g, g_fp8, bias in zip(flat_grads, grads_fp8, has_bias, strict=True):
        if g is None:
            param_grads += [None, None]
            continue
        grad_t = None if g_fp8 is None else g_fp8.for_weight
        dw_db = weight_grads(flat_input, g, bias, recipe, x_fp8, grad_t)
        param_grads += dw_db if bias else [*dw_db, None]  # (out/t, h), (out/t,)
    return param_grads


def _deferred_projection_grads(
    x: torch.Tensor, grads: tuple[torch.Tensor | None, ...], params: tuple[Any, ...], recipe: Fp8Recipe | None
) -> Callable[[], None]:
    """The weight-gradient work of the projections' backward, for a WeightGradQueue (under an fp8
    `recipe`, x cast once for all of them)."""

    def work() -> None:
        flat_x = x.reshape(-1, x.shape[-1])
        x_fp8 = None if recipe is None else float8.operand(flat_x, float8.E4M3, recipe, "b")
        targets, values = [], []
        for g, weight, bias in zip(grads, params[0::2], params[1::2], strict=True):
            if g is not None:
                targets += [weight] if bias is None else [weight, bias]
                values += weight_grads(flat_x, g, bias is not None, recipe, x_fp8)
        accumulate(targets, values)

    return work


@torch.compiler.disable
def column_parallel_projections(
    x: torch.Tensor, layers: list[ColumnParallelLinear], group: ProcessGroup, recipe: Fp8Recipe | None = None
) -> list[torch.Tensor]:
    """Apply column-parallel `layers` to one input x (b, s, h), the same on every TP rank: [(b, s, out_i/t)].

    Runs eagerly inside a compiled layer: inductor would be free to move the wait before the weight
    gradients (nothing ties them together), and the GEMMs gain nothing from compilation.
    """
    return _projections(x, layers, group, recipe)


def _projections(
    x: torch.Tensor, layers: list[ColumnParallelLinear], group: ProcessGroup | None, recipe: Fp8Recipe | None
) -> list[torch.Tensor]:
    """`_ColumnParallelProjections` over `layers`' parameters: [(b, s, out_i/t)] for x (b, s, h)."""
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    queue = layers[0].weight_grads
    if recipe is None:
        return list(_ColumnParallelProjections.apply(x, group, None, queue, len(layers), *params))
    casts = [t for layer in layers for t in float8.flatten_weight_operands(weight_casts(layer))]
    flat_x = x.reshape(-1, x.shape[-1])
    outputs = _ColumnParallelProjections.apply(flat_x, group, recipe, queue, len(layers), *params, *casts)
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in outputs]


STACK_PROJECTIONS = False
"""Whether `TPContext.project` runs projections reading one input (q/k/v, gate/up) as one GEMM on their
stacked weights (`stacked_projections`) where that applies. Off: llama-1b in bf16 on an H100 ran no faster
stacked (65,698 against 65,834 tokens/s at micro-batch 8) and peaked 2.4 GiB higher (2026-12-05,
bench/results/issue18-2026-12-05-s13/). A module-level switch for A/B runs (bench/fp8.py --stack-projections),
set before the first compile."""


class _StackedProjections(torch.autograd.Function):
    """x (M, K) -> x W^T + b with W the projections' weights stacked, (sum_i out_i, K), and b their biases.
    It saves the layers' own weights, not the stacked copy, and stacks them again in backward (a copy of
    the weights, small beside the activations). The caller splits the output into each layer's; autograd
    concatenates their gradients back for this backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, num_layers: int, *params: Any) -> torch.Tensor:
        weights, biases = params[:num_layers], params[num_layers:]
        ctx.widths = [w.shape[0] for w in weights]
        ctx.has_bias = bool(biases)
        ctx.save_for_backward(x, *weights)
        return F.linear(x, torch.cat(weights), torch.cat(biases) if biases else None)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, *weights = ctx.saved_tensors
        grad_x = grad.mm(torch.cat(weights)) if ctx.needs_input_grad[0] else None
        grad_w = grad.t().mm(x).split(ctx.widths)  # rows of each layer's weight
        grad_b = grad.sum(0).split(ctx.widths) if ctx.has_bias else ()
        return (grad_x, None, *grad_w, *grad_b)


def shared_input_projections(
    x: torch.Tensor, layers: list[ColumnParallelLinear], recipe: Fp8Recipe
) -> list[torch.Tensor]:
    """The float8 `layers` on one input x (b, s, h), already whole on this rank: [(b, s, out_i/t)], with
    x cast once for all of their forward GEMMs and once for all of their weight gradients, where one
    float8 linear each would cast it as many times. No communication, so compiled code traces it. The
    layers' own forward (and its hooks) do not run, as with tensor parallelism's overlapped projections."""
    return _projections(x, layers, None, recipe)  # no deferred weight gradients here (TPContext.project)


def stacked_projections(x: torch.Tensor, layers: list[ColumnParallelLinear]) -> list[torch.Tensor] | None:
    """The bf16 (or fp32) `layers` reading one input x (b, s, h) as one GEMM on their stacked weights:
    [(b, s, out_i/t)]; None where that does not apply (float8, deferred weight gradients, biases on some
    layers only). The input gradient is then one GEMM over the stacked output gradients instead of a sum
    of one per layer, and the weight gradients one GEMM whose rows are each layer's. On one H200 at
    llama-1b's sizes (16,384 tokens) forward and both backward GEMMs took 0.884 ms against 1.003 for q, k,
    v, and 4.650 against 4.901 for gate and up, the weights' stacking counted but not the output
    gradients' (bench/step_kernels.py, 2026-12-04). The layers' own forward (and its hooks) do not run.
    """
    if any(layer.fp8 or layer.weight_grads is not None for layer in layers):
        return None
    biases = [layer.bias for layer in layers]
    if len({b is None for b in biases}) > 1:
        return None
    params = [layer.weight for layer in layers] + [b for b in biases if b is not None]
    y = _StackedProjections.apply(x.reshape(-1, x.shape[-1]), len(layers), *params)
    return list(y.view(*x.shape[:-1], y.shape[-1]).split([layer.weight.shape[0] for layer in layers], dim=-1))


class RowParallelLinear(nn.Module):
    """y = sum_over_tp(x_local W_local^T) + b with W split by input columns: (out, in/t) per rank.

    Reduces with an all-reduce (g), or a reduce-scatter along the sequence under sequence parallelism.
    The bias is replicated and added after the reduction, so it is counted once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: ProcessGroup,
        bias: bool,
        sequence_parallel: bool,
        fp8: Fp8Recipe | None = None,
        weight_grads: WeightGradQueue | None = None,
        fp8_weight_cache: Float8WeightCache | None = None,
    ) -> None:
        """`weight_grads`: the queue that defers this layer's weight gradient (zero-bubble schedules);
        `fp8_weight_cache`: with `fp8`, where the weight's float8 casts are kept for a step."""
        super().__init__()
        self.weight_grads = weight_grads
        tp_size = dist.get_world_size(tp_group)
        if in_features % tp_size:
            raise ValueError(f"tp_size ({tp_size}) must divide the input features ({in_features})")
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.weight = mark_sharded(
            nn.Parameter(torch.empty(out_features, in_features // tp_size)), 1, in_features
        )
        self.bias = None
        if bias:
            self.bias = mark_sequence_parallel(nn.Parameter(torch.empty(out_features)), sequence_parallel)
        self.fp8 = fp8
        if fp8 is not None:
            self.weight.float8_recipe = fp8  # type: ignore[attr-defined]  # read by ZeRO-3's float8 gather
        self.cached_weight = cached_weight(fp8_weight_cache, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, s, in/t) -> (b, s, out) or (b, s/t, out)
        return self.reduce(linear(x, self.weight, None, self.weight_grads, self.fp8, weight_casts(self)))

    def reduce(self, y: torch.Tensor) -> torch.Tensor:  # (b, s, out) -> (b, s, out) or (b, s/t, out)
        """The layer's output from this rank's partial product y = x_local W_local^T: summed over the
        group (scattered along the sequence under sequence parallelism), then the bias."""
        y = (
            reduce_scatter_to_sequence(y, self.tp_group)
            if self.sequence_parallel
            else reduce_from_tp(y, self.tp_group)
        )
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split across TP ranks: (Vp/t, h) per rank.

    Each rank looks up the ids it owns and writes zeros elsewhere; the sum over the group (all-reduce,
    or reduce-scatter along the sequence under sequence parallelism) is the full embedding.
    """

    def __init__(
        self, vocab_size: int, hidden_size: int, *, tp_group: ProcessGroup, sequence_parallel: bool
    ) -> None:
        super().__init__()
        tp_size = dist.get_world_size(tp_group)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_to_multiple(vocab_size, tp_size)
        local = self.padded_vocab_size // tp_size
        self.vocab_start = dist.get_rank(tp_group) * local
        self.weight = mark_sharded(nn.Parameter(torch.empty(local, hidden_size)), 0, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (b, s) -> (b, s, h) or (b, s/t, h)
        if dist.get_world_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        local_ids = ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.weight.shape[0])
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence(out, self.tp_group)
        return reduce_from_tp(out, self.tp_group)


@torch.no_grad()
def gather_full(param: torch.Tensor, tp_group: ProcessGroup) -> torch.Tensor:
    """The full, unpadded tensor of a (possibly sharded) parameter, on every TP rank."""
    if not is_sharded(param):
        return param.detach().clone()
    dim, size = param.tp_dim, param.tp_full_size  # type: ignore[attr-defined]
    world = dist.get_world_size(tp_group)
    parts = [torch.empty_like(param) for _ in range(world)]
    dist.all_gather(parts, param.detach().contiguous(), group=tp_group)
    distinct = parts[:: tp_replicas(param)]  # the first rank of each group of replicas
    return torch.cat(distinct, dim=dim).narrow(dim, 0, size)


@dataclass(frozen=True)
class TPContext:
    """What a transformer block needs to know about tensor parallelism, and its recomputation mode."""

    group: ProcessGroup
    """The tensor-parallel group."""
    sequence_parallel: bool = False
    """Split the activations outside the tensor-parallel regions (norms, residuals) along the sequence."""
    recompute: str = "none"
    """Activation recomputation: 'none', 'selective' (the attention core) or 'full' (each layer)."""
    overlap_comm: bool = True
    """All-reduce column-parallel input gradients during the weight gradients (without sequence
    parallelism)."""
    fp8: Fp8Recipe | None = None
    """Float8 GEMMs in the layers' column- and row-parallel linears: the recipe, or None for none."""
    fp8_output_layer: bool = False
    """With `fp8` set: the output layer's GEMMs (threefold.model.loss) in float8 too."""
    fp8_weight_cache: Float8WeightCache | None = None
    """With `fp8` set: where the layers' weight casts are kept for an optimizer step
    (threefold.parallel.fp8_cache), when a step runs several micro-batches on a rank; None: each float8
    linear casts its weight at every pass."""
    context: ContextParallel | None = None
    """Context parallelism (cp_size > 1): the sequence is split over its ranks, attention crosses them."""
    weight_grads: WeightGradQueue | None = None
    """Set when the pipeline schedule splits the backward (zero-bubble): the linear layers then defer their
    weight gradients to the schedule's W actions (threefold.parallel.weight_grad)."""
    mlp_backend: MlpBackend = "auto"
    """The llama MLP's kernels: 'auto' (cuBLAS GEMMs, SwiGLU in the compiled layer) or 'quack' (QuACK's
    GEMMs with SwiGLU in their epilogues, threefold.model.quack_mlp)."""
    size: int = field(init=False)
    """tp_size, read from the group."""
    rank: int = field(init=False)
    """This rank's index in the group."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", dist.get_world_size(self.group))
        object.__setattr__(self, "rank", dist.get_rank(self.group))

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Make the block input whole on every TP rank before column-parallel projections."""
        return gather_from_sequence(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)

    def project(self, x: torch.Tensor, layers: list[ColumnParallelLinear]) -> list[torch.Tensor]:
        """Column-parallel `layers` applied to the block input x ((b, s/t, h) under sequence parallelism,
        else (b, s, h)): [(b, s, out_i/t)]."""
        if self.size > 1 and self.overlap_comm and not self.sequence_parallel:
            return column_parallel_projections(x, layers, self.group, self.fp8)
        x = self.enter(x)
        if len(layers) > 1 and self.fp8 is not None and all(layer.weight_grads is None for layer in layers):
            return shared_input_projections(x, layers, self.fp8)
        stacked = stacked_projections(x, layers) if STACK_PROJECTIONS and len(layers) > 1 else None
        return stacked if stacked is not None else [layer(x) for layer in layers]
