"""Which layers each pipeline chunk holds.

The model's layers are split over pp_size * num_model_chunks chunks (virtual stages). In the loop
placement (1F1B, interleaved) chunk c lives on pipeline rank c % pp_size, so rank r holds chunks r,
r + pp_size, r + 2 pp_size, ... In the V placement (ZB-V, two chunks per rank) the chunks go down the
ranks and come back: rank r holds chunks r and 2 pp_size - 1 - r, so the last rank passes its first
chunk's output to its second chunk without a transfer, and rank 0 holds both the embedding and the loss.

The rule: as even as possible. When the layers do not divide, the remainder goes one layer per chunk to
the middle chunks first (1, 2, ...), then to the first chunk, and last to the final chunk: the first
chunk also runs the embedding and the final chunk the output layer and the loss, which for a large
vocabulary costs about as much as a layer.
"""

from __future__ import annotations


def chunk_layer_ranges(num_layers: int, pp_size: int, num_model_chunks: int) -> list[tuple[int, int]]:
    """[first_layer, last_layer) of every chunk, indexed by chunk (num_virtual_stages = pp_size *
    num_model_chunks of them in all)."""
    num_virtual_stages = pp_size * num_model_chunks
    if num_virtual_stages > num_layers:
        raise ValueError(
            f"cannot split {num_layers} layers over pp_size ({pp_size}) * num_model_chunks "
            f"({num_model_chunks}) = {num_virtual_stages} chunks: each chunk needs at least one layer"
        )
    base, extra = divmod(num_layers, num_virtual_stages)
    last = num_virtual_stages - 1
    preference = list(range(1, last)) + [0, last] if last > 0 else [0]
    sizes = [base] * num_virtual_stages
    for chunk in preference[:extra]:
        sizes[chunk] += 1
    ranges, start = [], 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


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
