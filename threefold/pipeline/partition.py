"""Which layers each pipeline chunk holds.

The model's layers are split over pp_size * num_model_chunks chunks (virtual stages). In the loop
placement (1F1B, interleaved) chunk c lives on pipeline rank c % pp_size, so rank r holds chunks r,
r + pp_size, r + 2 pp_size, ... In the V placement (ZB-V, two chunks per rank) the chunks go down the
ranks and come back: rank r holds chunks r and 2 pp_size - 1 - r, so the last rank passes its first
chunk's output to its second chunk without a transfer, and rank 0 holds both the embedding and the loss.

The rule (`parallel.pipeline_balance = "layers"`): as even as possible. When the layers do not divide,
the remainder goes one layer per chunk to the middle chunks first (1, 2, ...), then to the first chunk,
and last to the final chunk: the first chunk also runs the embedding and the final chunk the output
layer and the loss.

With `pipeline_balance = "ends"` the ends count as layers of their cost (`end_layer_costs`): the output
layer and loss as 2 V h forward FLOPs per token over a layer's 2 N_layer + 4 s h, the embedding (a
lookup) as nothing. The layers are then handed out one at a time to the chunk whose layers plus ends
cost least, ties broken in the order above, so a large vocabulary leaves the last chunk fewer layers.
With no end costs this is the even rule exactly. docs/schedules.md compares the two (and splitting the
output layer over the ranks) with the time model.
"""

from __future__ import annotations

import functools
from typing import Literal

PipelineBalance = Literal["layers", "ends"]
"""`parallel.pipeline_balance`: split the layers evenly, or count the embedding and the output layer and
loss as layers of their cost."""


def end_layer_costs(
    balance: str, *, per_layer_params: int, hidden_size: int, vocab_size: int, seq_len: int
) -> tuple[float, float]:
    """(embedding, output layer + loss) in units of one transformer layer's forward FLOPs per token; both 0
    under the "layers" balance. per_layer_params: threefold.metrics.count_parameters(model)["per_layer"]."""
    if balance == "layers":
        return 0.0, 0.0
    layer = 2 * per_layer_params + 4 * seq_len * hidden_size  # matmuls, then attention's QK^T and AV
    return 0.0, 2 * vocab_size * hidden_size / layer


def chunk_layer_ranges(
    num_layers: int, pp_size: int, num_model_chunks: int, end_costs: tuple[float, float] = (0.0, 0.0)
) -> list[tuple[int, int]]:
    """[first_layer, last_layer) of every chunk, indexed by chunk (num_virtual_stages = pp_size *
    num_model_chunks of them in all); end_costs: the first and the last chunk's extra work, in layers."""
    num_virtual_stages = pp_size * num_model_chunks
    if num_virtual_stages > num_layers:
        raise ValueError(
            f"cannot split {num_layers} layers over pp_size ({pp_size}) * num_model_chunks "
            f"({num_model_chunks}) = {num_virtual_stages} chunks: each chunk needs at least one layer"
        )
    ranges, start = [], 0
    for size in _chunk_sizes(num_layers, num_virtual_stages, end_costs):
        ranges.append((start, start + size))
        start += size
    return ranges


@functools.cache
def _chunk_sizes(num_layers: int, num_virtual_stages: int, end_costs: tuple[float, float]) -> tuple[int, ...]:
    """Layers per chunk: one each, then each further layer to the chunk with the least work, middle chunks
    before the two ends (cached: the planner asks for the same split thousands of times)."""
    last = num_virtual_stages - 1
    preference = list(range(1, last)) + [0, last] if last > 0 else [0]
    extra = [0.0] * num_virtual_stages
    extra[0] += end_costs[0]
    extra[last] += end_costs[1]
    sizes = [1] * num_virtual_stages
    for _ in range(num_layers - num_virtual_stages):
        chunk = min(preference, key=lambda c: sizes[c] + extra[c])  # min keeps the first of equals
        sizes[chunk] += 1
    return tuple(sizes)


def chunks_of_rank(pp_rank: int, pp_size: int, num_model_chunks: int, v_shape: bool = False) -> list[int]:
    """The global chunk indices rank `pp_rank` holds, in increasing order."""
    if v_shape:
        assert num_model_chunks == 2, "the V placement holds two chunks per rank"
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + k * pp_size for k in range(num_model_chunks)]


def rank_of_chunk(chunk: int, pp_size: int, v_shape: bool = False) -> int:
    """The pipeline rank that holds global chunk `chunk`."""
    if v_shape and chunk >= pp_size:
        return 2 * pp_size - 1 - chunk
    return chunk % pp_size
