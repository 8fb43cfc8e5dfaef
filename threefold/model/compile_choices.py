"""The one inductor heuristic threefold's compiled layers change: how wide a row reduction may be and
still be kept whole in one Triton program.

Inductor keeps a row in registers ("persistent reduction") only up to 1024 elements. A wider row is
reduced in a loop, and a kernel that then writes something computed from the row (a norm's output scaled
by the row's sum of squares, a row-scaled float8 cast after the row's amax) loops over the row a second
time, reading its inputs again from memory. llama-1b's norms are 2048 wide and its MLP rows 8192, so both
kinds read twice. Up to PERSISTENT_ROW_LIMIT elements these kernels now read once.

Only the kernels' schedule changes: the same sums in another order (the float8 amax, a maximum, is exact
either way; the norms' sums of squares round differently).

Two parts, both needed. COMPILE_OPTIONS, passed to each layer's torch.compile, puts the choices in the
compile cache's key. `applied()`, around the layers' calls, makes them the choices inductor reads: inductor
keeps one choices object per thread, made from the options of the first compile in that thread, so options
alone are ignored where anything else compiled first. The backward, which inductor would compile later in
autograd's own thread, is compiled with the forward, inside `applied()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch._functorch.config as functorch
import torch._inductor.config as inductor
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

PERSISTENT_ROW_LIMIT = 8192
"""The widest row (elements) a compiled layer's row reductions keep in one program."""


class WideRowReductions(InductorChoices):
    """Inductor's choices, with row reductions up to PERSISTENT_ROW_LIMIT wide kept persistent."""

    @staticmethod
    def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
        if (
            inductor.triton.persistent_reductions
            and not cooperative_reduction
            and features.get_reduction_hint() == ReductionHint.INNER
            and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_LIMIT)
        ):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    def uuid(self) -> str:
        """Part of inductor's cache key: code compiled with another limit is not reused."""
        return f"threefold.WideRowReductions.{PERSISTENT_ROW_LIMIT}"


COMPILE_OPTIONS: dict[str, Any] = {"inductor_choices_class": WideRowReductions}
"""torch.compile's options for a layer."""


@contextlib.contextmanager
def applied() -> Iterator[None]:
    """The compiled layers' calls: a layer compiled here is compiled (forward and backward) with these
    choices, whatever this thread compiled before. The thread's own choices come back after."""
    with V.set_choices_handler(WideRowReductions()), functorch.patch(force_non_lazy_backward_lowering=True):
        yield
