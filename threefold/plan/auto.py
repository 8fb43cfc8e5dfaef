"""`threefold train --layout auto`: plan for this run's world and train with the planner's first choice.

The launching process applies the chosen layout to its `Config` directly; only the workers it re-executes
receive the layout as `--section.key=value` strings (`Layout.overrides()`), since a command line is all a
new process gets. Under torchrun every rank plans for itself; the search is deterministic, so they agree.
"""

from __future__ import annotations

import torch

from threefold.config import Config
from threefold.launch import WorldInfo
from threefold.plan.cli import auto_layout, host_hardware
from threefold.plan.hardware import preset_for_device
from threefold.plan.layout import Layout

NEUTRAL_LAYOUT = (
    "--parallel.tp_size=1",
    "--parallel.pp_size=1",
    "--parallel.dp_size=1",
    "--parallel.num_model_chunks=1",
    "--parallel.pipeline_schedule=1f1b",
    "--training.micro_batch_size=1",
)
"""Overrides that make any config valid on one rank: load the run's config with these before planning,
so that the file's own layout (meant for another world size, say) cannot fail validation."""


def choose_layout(config: Config, *, world: WorldInfo | None, nproc: int | None) -> Layout:
    """The planner's best layout for `config`'s model and batch on this run's ranks.

    The ranks are torchrun's world when there is one, else `--nproc`, else every visible GPU.
    Rank 0 (or the launcher) prints the choice.
    """
    use_cuda = config.training.device == "cuda" or (
        config.training.device == "auto" and torch.cuda.is_available()
    )
    if world is not None:
        world_size, per_node = world.world_size, world.local_world_size
    elif nproc is not None:
        world_size = per_node = nproc
    elif use_cuda:
        world_size = per_node = torch.cuda.device_count()
    else:
        raise ValueError("--layout auto on CPU needs --nproc N (how many processes to plan for)")
    hw = (preset_for_device(torch.cuda.get_device_name()) if use_cuda else None) or host_hardware(per_node)
    layout = auto_layout(config, world_size=world_size, gpus_per_node=per_node, hw=hw)
    if world is None or world.rank == 0:
        print(f"--layout auto on {world_size} x {hw.name}: {layout.label()}", flush=True)
    return layout


def apply_layout(config: Config, layout: Layout) -> Config:
    """`config` with `layout` in its parallel and training sections, validated again as a whole."""
    return layout.apply(config)
