"""The inductor heuristic compiled layers change (threefold/model/compile_choices.py): row reductions up to
8192 elements wide kept in one program, everything else as inductor decides."""

from __future__ import annotations

import types

import pytest
import sympy
import torch
import torch.distributed as dist
from distributed import run_ranks
from tiny import TINY_LLAMA
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.virtualized import V

from threefold.config import ModelConfig
from threefold.model.compile_choices import COMPILE_OPTIONS, PERSISTENT_ROW_LIMIT, WideRowReductions
from threefold.model.transformer import build_model
from threefold.parallel.layers import TPContext


class _Features:
    """What the heuristic reads of a kernel: its reduction's kind and length, and its size."""

    def __init__(self, hint: ReductionHint, numel: int) -> None:
        self.hint, self.reduction_numel = hint, sympy.Integer(numel)
        self.numel = sympy.Integer(16 * numel)  # 16 rows: read by the cooperative case

    def get_reduction_hint(self) -> ReductionHint:
        return self.hint


@pytest.mark.parametrize("hint", [ReductionHint.INNER, ReductionHint.OUTER, ReductionHint.DEFAULT])
@pytest.mark.parametrize("numel", [256, 2048, 8192, 16384])
@pytest.mark.parametrize("cooperative", [False, True])
def test_rows_up_to_the_limit_are_persistent_and_nothing_else_changes(hint, numel, cooperative):
    """llama-1b's norm rows (2048) and MLP rows (8192) persistent; wider rows, reductions across rows
    (a column's amax) and cooperative reductions as inductor's own heuristic says."""
    with V.set_graph_handler(types.SimpleNamespace(sizevars=SizeVarAllocator())):  # type: ignore[arg-type]
        ours = WideRowReductions().should_use_persistent_reduction(_Features(hint, numel), cooperative)
        theirs = InductorChoices.should_use_persistent_reduction(_Features(hint, numel), cooperative)
    widened = hint == ReductionHint.INNER and numel <= PERSISTENT_ROW_LIMIT and not cooperative
    assert ours == (True if widened else theirs)
    if widened and numel > 1024:
        assert not theirs  # the case the heuristic is for: inductor would loop over these rows


def test_the_choices_enter_the_compile_cache_key():
    assert WideRowReductions().uuid() == f"threefold.WideRowReductions.{PERSISTENT_ROW_LIMIT}"
    assert COMPILE_OPTIONS == {"inductor_choices_class": WideRowReductions}


def _compiled_against_eager(rank: int, world_size: int) -> dict:
    compiled_with: list[dict] = []
    original = torch.nn.Module.compile

    def record(module: torch.nn.Module, *args, **kwargs) -> None:
        compiled_with.append(kwargs)
        original(module, *args, **kwargs)

    torch.nn.Module.compile = record  # type: ignore[method-assign]
    try:
        cfg = ModelConfig(**TINY_LLAMA)
        tp = TPContext(dist.group.WORLD)
        models = [build_model(cfg, tp, seed=3, compiled=c) for c in (False, True)]
    finally:
        torch.nn.Module.compile = original  # type: ignore[method-assign]
    # The graphs (forward, backward) inductor lowers asking these choices (can_fuse: asked on the CPU too),
    # by the phase of the step that compiled them.
    asked: dict[str, set[str]] = {"forward": set(), "backward": set()}
    phase = "forward"

    def can_fuse(*args, **kwargs) -> bool:
        asked[phase].add("backward" if V.graph.is_backward else "forward")
        return InductorChoices.can_fuse(*args, **kwargs)

    WideRowReductions.can_fuse = staticmethod(can_fuse)  # type: ignore[method-assign]
    # lowered here, not read whole from an earlier run's cache (its C++ kernels may come from the cache)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    before = type(V.choices)  # made now, from inductor's config: as if something else compiled first
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = [m(tokens[:, :-1], tokens[:, 1:]) for m in models]
    phase = "backward"
    losses[1].backward()
    return {
        "options": [sorted(k["options"]) for k in compiled_with],
        "losses": [float(loss) for loss in losses],
        "asked": asked,
        "choices": (before, type(V.choices)),
    }


def test_a_compiled_model_compiles_each_layer_with_the_choices_and_computes_the_same():
    """Each layer's compile gets the options (the cache key), and inductor asks the choices while it
    compiles the layers, forward and backward, though this thread's own choices are inductor's: the
    backward is compiled with the forward, and the thread's choices are its own again after."""
    got = run_ranks(1, _compiled_against_eager)[0]
    assert got["options"] == [["inductor_choices_class"]] * TINY_LLAMA["num_layers"]
    eager, compiled = got["losses"]
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert got["asked"] == {"forward": {"forward", "backward"}, "backward": set()}
    assert got["choices"] == (InductorChoices, InductorChoices)
