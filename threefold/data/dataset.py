"""Token datasets: memory-mapped token files (the format is threefold.data.format, written by
threefold.data.prepare) read back as samples and batched deterministically.

Training samples are windows of ``seq_len + 1`` tokens cut from a split without overlap; inputs are
the first ``seq_len`` tokens and targets the last ``seq_len``. Batching is a pure function of
(seed, global sample position), so a run resumed from ``consumed_samples`` sees exactly the samples
that the uninterrupted run would have seen, whatever the data-parallel layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

# Re-exported: the format's readers and checks, imported from here by train, runguard and the commands.
from threefold.data.format import (  # noqa: F401
    FORMAT_VERSION,
    INDEX_DTYPE,
    SPLITS,
    check_dataset,
    dataset_files,
    read_index,
    read_meta,
    verify_checksums,
)

Batch = tuple[torch.Tensor, torch.Tensor]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`, its copy queued without the host waiting for the device. On CUDA a host tensor goes
    through page-locked memory, whose copies are queued like kernels: from pageable memory the driver
    queued two 128 KB copies (micro-batch 8's inputs and targets) at once, and a third waited for all the
    work queued before it (H100, 2026-12-05, bench/results/issue18-2026-12-05-s16/callE.sh). pin_memory()
    copies into torch's cached page-locked blocks, which are not reused before the copy out of them has
    run."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class TokenDataset:
    """One split of a prepared dataset, memory-mapped, as non-overlapping (inputs, targets) samples."""

    def __init__(self, path: str | Path, split: str, seq_len: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} must be one of {list(SPLITS)}")
        if seq_len < 1:
            raise ValueError(f"seq_len ({seq_len}) must be at least 1")
        self.meta = read_meta(path)
        self.split = split
        self.seq_len = seq_len
        file = Path(path) / f"{split}.bin"
        dtype = np.dtype(self.meta["dtype"])
        size = file.stat().st_size if file.is_file() else 0
        expected = self.meta["num_tokens"][split]
        if size != expected * dtype.itemsize:
            raise ValueError(
                f"{str(file)!r} holds {size} bytes, but meta.json promises {expected} {dtype.name} tokens"
            )
        self.num_tokens = expected
        # A sample needs seq_len inputs plus one more token for the last target.
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"{split} split of {str(path)!r} has {self.num_tokens} tokens, but one sample of "
                f"seq_len {seq_len} needs {seq_len + 1}"
            )
        self.tokens = np.memmap(file, dtype=dtype, mode="r")
        self.num_samples = (self.num_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Batch:
        inputs, targets = self.get_batch(np.array([index]))
        return inputs[0], targets[0]

    def get_batch(self, indices: np.ndarray) -> Batch:
        """Stack the samples at ``indices`` into (inputs, targets), each int64 of shape (n, seq_len)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(
                f"sample indices must lie in [0, {self.num_samples}), got some in "
                f"[{indices.min()}, {indices.max()}]"
            )
        offsets = indices[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # (n, seq_len + 1)
        window = torch.from_numpy(np.asarray(self.tokens[offsets], dtype=np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class SampleLoader(Protocol):
    """What the training loop and checkpoints need of a loader (BatchLoader, blend.BlendLoader)."""

    @property
    def consumed_samples(self) -> int: ...

    def next_batch(self) -> list[Batch]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _check_dp(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank ({dp_rank}) must lie in [0, dp_size ({dp_size}))")


def check_batching(
    micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int, start_sample: int
) -> None:
    """ValueError unless the arguments describe a loader: the global batch splits into whole micro-batches
    on every DP rank, and the seed and the start are non-negative."""
    _check_dp(dp_rank, dp_size)
    if micro_batch_size < 1 or global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a positive multiple of "
            f"micro_batch_size ({micro_batch_size}) * dp_size ({dp_size})"
        )
    if seed < 0:
        raise ValueError(f"seed ({seed}) must be non-negative")
    if start_sample < 0:
        raise ValueError(f"start_sample ({start_sample}) must be non-negative")


def _split_micro_batches(dataset: TokenDataset, indices: np.ndarray, micro_batch_size: int) -> list[Batch]:
    inputs, targets = dataset.get_batch(indices)
    return list(zip(inputs.split(micro_batch_size), targets.split(micro_batch_size), strict=True))


class BatchLoader:
    """Deterministic training batches, sharded over data-parallel ranks.

    The global sample stream maps position k to sample ``perm(seed, k // N)[k % N]`` with N the
    dataset's sample count: every epoch is a fresh permutation (the identity without shuffling).
    Each optimizer step takes the next ``global_batch_size`` positions; DP rank r takes the r-th
    contiguous slice of them and cuts it into micro-batches. Everything depends only on
    ``consumed_samples``, which is the same on every rank and is all a checkpoint needs.
    """

    def __init__(
        self,
        dataset: TokenDataset,
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
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self._consumed = start_sample
        self._perms: dict[int, np.ndarray] = {}

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all DP ranks together; the resume point for a new loader."""
        return self._consumed

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # A step's block spans at most two epochs, so only the newest two are kept.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            n = self.dataset.num_samples
            rng = np.random.default_rng((self.seed, epoch))
            self._perms[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._perms[epoch]

    def sample_indices(self, positions: np.ndarray) -> np.ndarray:
        """Dataset sample indices at the given global stream positions."""
        n = self.dataset.num_samples
        epochs, offsets = np.divmod(positions, n)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(int(epoch))[offsets[mask]]
        return out

    def next_batch(self) -> list[Batch]:
        """This rank's micro-batches for one optimizer step, each (inputs, targets) of (mbs, seq_len)."""
        per_rank = self.global_batch_size // self.dp_size
        start = self._consumed + self.dp_rank * per_rank
        indices = self.sample_indices(np.arange(start, start + per_rank, dtype=np.int64))
        self._consumed += self.global_batch_size
        return _split_micro_batches(self.dataset, indices, self.micro_batch_size)

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self._consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples": self.dataset.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["consumed_samples"]``; the stream must be the one the state came from."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_samples"):
            if state.get(key, mine[key]) != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {key}={mine[key]!r}; "
                    "resuming would not continue the same sample stream"
                )
        self._consumed = int(state["consumed_samples"])


def eval_batches(
    dataset: TokenDataset, *, num_sequences: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[Batch]:
    """This DP rank's share of the first ``num_sequences`` samples of ``dataset``, unshuffled, in
    micro-batches of ``micro_batch_size`` (the last one may be smaller).

    Rank r scores the r-th contiguous slice of them, so every layout (any dp size, any micro-batch size)
    evaluates the same sequences. A split smaller than ``num_sequences`` is scored whole, never twice.
    """
    _check_dp(dp_rank, dp_size)
    if micro_batch_size < 1 or num_sequences < 1:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}) and num_sequences ({num_sequences}) must be at least 1"
        )
    total = min(num_sequences, dataset.num_samples)
    if total < dp_size:
        raise ValueError(
            f"the validation split holds {dataset.num_samples} sequence(s) and training.eval_sequences is "
            f"{num_sequences}: fewer than the {dp_size} data-parallel ranks that share them"
        )
    first, last = dp_rank * total // dp_size, (dp_rank + 1) * total // dp_size
    return _split_micro_batches(dataset, np.arange(first, last, dtype=np.int64), micro_batch_size)


# ---------------------------------------------------------------------------------------------
# Command line: threefold data prepare ...
# ---------------------------------------------------------------------------------------------
