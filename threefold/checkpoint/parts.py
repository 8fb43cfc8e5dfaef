"""What a checkpoint saves and restores, as parts that answer for themselves (torchtitan's `Stateful`).

The checkpoint layer never opens another object's private state. It sees one rank's training state as

    model chunks    named parameters, with their TP metadata (tp_dim, tp_full_size, tied_copy)
    optimizer       `state_dict()` / `load_state_dict()` (threefold.optim.OptimizerState): per parameter
                    name the flat range this rank updates, its fp32 master and moments, the step count
    grad syncs      `quiesce()`: no ZeRO parameter all-gather may still be writing while a checkpoint
                    reads or overwrites the parameters
    RNG             this process's random-number state (below)

threefold.train.Trainer is a `TrainState`; the data position (the loader's consumed samples) and the
step travel as plain numbers through the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from threefold.config import Config
from threefold.optim import OptimizerState
from threefold.parallel.mesh import Mesh

RNG_CPU, RNG_CUDA = "rng::cpu", "rng::cuda"


class Quiescent(Protocol):
    def quiesce(self) -> None:
        """Return once no collective started earlier still writes into the parameters."""


class OptimizerPart(Protocol):
    def state_dict(self) -> OptimizerState: ...

    def load_state_dict(self, state: OptimizerState) -> None: ...


class TrainState(Protocol):
    """One rank's training state as a checkpoint sees it (read-only attributes)."""

    @property
    def config(self) -> Config: ...

    @property
    def mesh(self) -> Mesh: ...

    @property
    def chunks(self) -> Mapping[int, nn.Module]:
        """Global chunk index -> model chunk held by this rank."""

    @property
    def optimizer(self) -> OptimizerPart: ...

    @property
    def grad_syncs(self) -> Mapping[int, Quiescent]: ...


def named_parameters(state: TrainState) -> dict[str, nn.Parameter]:
    """Every parameter this rank holds, by name (names are unique across a rank's chunks)."""
    pairs = [pair for chunk in state.chunks.values() for pair in chunk.named_parameters()]
    named = dict(pairs)
    assert len(named) == len(pairs), "two chunks of one rank hold parameters of the same name"
    return named


def quiesce(state: TrainState) -> None:
    """Wait until no ZeRO parameter all-gather is still writing (a no-op without ZeRO)."""
    for grad_sync in state.grad_syncs.values():
        grad_sync.quiesce()


def rng_state(on_cuda: bool) -> dict[str, torch.Tensor]:
    """This process's random-number state (restored when the layout is unchanged; nothing in training
    draws random numbers today, but data augmentation or dropout would)."""
    state = {RNG_CPU: torch.get_rng_state()}
    if on_cuda and torch.cuda.is_available():
        state[RNG_CUDA] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    if RNG_CPU in state:
        torch.set_rng_state(state[RNG_CPU])
    if RNG_CUDA in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[RNG_CUDA])
