"""Weighted blends of prepared datasets: one deterministic sample stream drawn from several sources.

The global stream is cut into blocks of ``BLOCK`` positions. Every block holds the same sequence of
sources: source s gets ``c_s`` of its positions (the weights apportioned to BLOCK by largest remainder),
spread through the block in the order of their ideal times ``(i + 1/2) / c_s`` (Sainte-Laguë's
divisors, the "largest deficit first" rule Megatron blends with). So position k maps to

    source  = block_source[k % BLOCK]
    m       = (k // BLOCK) * c_source + block_rank[k % BLOCK]   # how many earlier samples that source gave
    sample  = perm(seed_source, m // N_source)[m % N_source]    # per-source epochs, as BatchLoader

a pure function of (seed, weights, k) computed in O(1) after the block is built once. Each source's own
counter follows from the position, so ``consumed_samples`` is still all a checkpoint needs, and a resumed
run sees the same samples under any data-parallel or micro-batch layout.

Guarantees: over any prefix of k positions, source s has given within 1 of ``q_s * k``, where
``q_s = c_s / BLOCK`` is its weight quantized to 1/BLOCK (|q_s - w_s| < 1/BLOCK), so within
``1 + k / BLOCK`` of ``w_s * k``. A source with one sample weight gives the BatchLoader's stream exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from threefold.config.sections import BLEND_RESOLUTION
from threefold.data.dataset import Batch, BatchLoader, TokenDataset, check_batching, read_meta

BLOCK = BLEND_RESOLUTION
"""Positions per block of the blend: the weights are quantized to 1/BLOCK (a smaller share is refused by
config validation)."""


def apportion(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainder; ties to the
    earlier source)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"blend weights {list(weights)} must be finite, >= 0 and sum to a positive number")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - counts)))  # largest remainder first
    counts[order[:short]] += 1
    return counts


def block_sequence(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, rank within its source) of each position of one block holding counts[s] of source s.

    Source s's i-th position is due at (i + 1/2) / counts[s] of the block; positions go in order of due
    time (ties to the lower source), which keeps every prefix within one sample of its share.
    """
    sources = np.repeat(np.arange(len(counts)), counts)
    ranks = np.concatenate([np.arange(c) for c in counts])
    due = (2 * ranks + 1) / (2.0 * counts[sources])
    order = np.lexsort((sources, due))
    return sources[order], ranks[order]


def source_seed(seed: int, source: int) -> int:
    """Source 0 shuffles with the run's seed (so a one-source blend is the plain loader); others with a
    seed derived from (seed, source)."""
    if source == 0:
        return seed
    return int(np.random.SeedSequence((seed, source)).generate_state(1)[0])


@dataclass(frozen=True)
class BlendSource:
    """One source of a blend: its name (in metrics), training split and weight."""

    name: str
    dataset: TokenDataset
    weight: float


class BlendLoader:
    """Deterministic training batches from a weighted blend of datasets, sharded over data-parallel ranks.

    The same interface and contract as BatchLoader (one step takes the next ``global_batch_size`` stream
    positions, rank r the r-th contiguous slice); the stream is the blend described in the module doc.
    """

    def __init__(
        self,
        sources: Sequence[BlendSource],
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        start_sample: int = 0,
        shuffle: bool = True,
    ) -> None:
        check_batching(micro_batch_size, global_batch_size, dp_rank, dp_size, seed, start_sample)
        if not sources:
            raise ValueError("a blend needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"the sources of a blend need distinct names, got {names}")
        seq_lens = {s.dataset.seq_len for s in sources}
        if len(seq_lens) != 1:
            raise ValueError(f"the sources of a blend must share seq_len, got {sorted(seq_lens)}")
        self.sources = list(sources)
        self.counts = apportion([s.weight for s in sources], BLOCK)
        self.block_source, self.block_rank = block_sequence(self.counts)
        # One BatchLoader per source maps its own stream position to a sample (its epoch permutations).
        self._streams = [
            BatchLoader(
                s.dataset,
                micro_batch_size=1,
                global_batch_size=1,
                dp_rank=0,
                dp_size=1,
                seed=source_seed(seed, i),
                shuffle=shuffle,
            )
            for i, s in enumerate(sources)
        ]
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self._consumed = start_sample

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all DP ranks together; the resume point for a new loader."""
        return self._consumed

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, position in that source's own stream) of each global stream position."""
        blocks, offsets = np.divmod(np.asarray(positions, dtype=np.int64), BLOCK)
        sources = self.block_source[offsets]
        return sources, blocks * self.counts[sources] + self.block_rank[offsets]

    def sample_indices(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index in that source's split) at the given global stream positions."""
        sources, local = self.locate(positions)
        indices = np.empty_like(local)
        for s in np.unique(sources):
            mask = sources == s
            indices[mask] = self._streams[int(s)].sample_indices(local[mask])
        return sources, indices

    def samples_per_source(self, consumed: int | None = None) -> dict[str, int]:
        """How many of the first `consumed` (default: consumed_samples) stream positions each source gave;
        O(BLOCK), exact after any resume."""
        k = self._consumed if consumed is None else consumed
        blocks, offset = divmod(k, BLOCK)
        partial = np.bincount(self.block_source[:offset], minlength=len(self.sources))
        return {
            s.name: int(blocks * c + p) for s, c, p in zip(self.sources, self.counts, partial, strict=True)
        }

    def next_batch(self) -> list[Batch]:
        """This rank's micro-batches for one optimizer step, each (inputs, targets) of (mbs, seq_len)."""
        per_rank = self.global_batch_size // self.dp_size
        start = self._consumed + self.dp_rank * per_rank
        sources, indices = self.sample_indices(np.arange(start, start + per_rank, dtype=np.int64))
        self._consumed += self.global_batch_size
        seq_len = self.sources[0].dataset.seq_len
        inputs = torch.empty(per_rank, seq_len, dtype=torch.int64)
        targets = torch.empty_like(inputs)
        for s in np.unique(sources):
            rows = np.flatnonzero(sources == s)
            x, y = self.sources[int(s)].dataset.get_batch(indices[rows])
            inputs[torch.from_numpy(rows)], targets[torch.from_numpy(rows)] = x, y
        mbs = self.micro_batch_size
        return list(zip(inputs.split(mbs), targets.split(mbs), strict=True))

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self._consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "blend": [[s.name, s.weight] for s in self.sources],
            "num_samples": [s.dataset.num_samples for s in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["consumed_samples"]``; the blend (names and weights), the seed and the sources'
        sizes, where the state holds them, must be this loader's: another would not continue the stream."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "blend", "num_samples"):
            if key not in state:
                continue
            theirs = [list(t) for t in state[key]] if key == "blend" else state[key]
            if key == "num_samples":
                theirs = list(theirs)
            if theirs != mine[key]:
                raise ValueError(
                    f"loader state has {key}={theirs!r} but this blend has {key}={mine[key]!r}; resuming "
                    "would not continue the same sample stream"
                )
        self._consumed = int(state["consumed_samples"])


def check_compatible(datasets: Sequence[tuple[str, str | Path]]) -> list[dict]:
    """The metas of (name, path) datasets, which must share tokenizer, vocab_size and EOS id to be blended
    (ValueError naming both datasets and their values otherwise)."""
    metas = [read_meta(path) for _, path in datasets]
    first_name, first = datasets[0][0], metas[0]
    for (name, _), meta in zip(datasets[1:], metas[1:], strict=True):
        for key in ("tokenizer", "vocab_size", "eos_token_id"):
            if meta[key] != first[key]:
                raise ValueError(
                    f"data.sources {first_name!r} and {name!r} differ in {key} ({first[key]!r} vs "
                    f"{meta[key]!r}); a blend's sources must be prepared with the same tokenizer"
                )
    return metas


def val_loss(losses: dict[str, float], weights: dict[str, float]) -> float:
    """The blend's overall validation loss: each source's mean loss weighted by its blend weight (the
    mixture the training loss averages over), so it doesn't depend on the sizes of the val splits."""
    total = sum(weights.values())
    return sum(weights[name] / total * loss for name, loss in losses.items())
