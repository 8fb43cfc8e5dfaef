"""bench/transposed_cast_tiles.py: the rowwise step's transposed casts it times, against the planner's
count of a layer's float8 casts and the seventh session's profile."""

import importlib.util
import sys
from pathlib import Path

from threefold.config import ModelConfig
from threefold.plan.time_model import layer_fp8_cast_elements, layer_gemm_shapes
from threefold.presets import MODEL_PRESETS

TOOL = Path(__file__).parents[1] / "bench/transposed_cast_tiles.py"
sys.path.insert(0, str(TOOL.parent))  # its sibling cuda_timing, as `python bench/<script>.py` finds it
SPEC = importlib.util.spec_from_file_location("transposed_cast_tiles", TOOL)
assert SPEC is not None and SPEC.loader is not None
tiles = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tiles)


def test_the_step_casts_are_the_planners_casts_less_the_row_scaled_ones():
    """llama-1b at micro-batch 8 (16384 tokens): 25 transposed casts a layer (the profile of the seventh
    session counted 28, before q/k/v and gate/up shared their input's cast), and their elements are the
    planner's float8 cast elements less the ones cast in place: each input in the forward (row-scaled)
    and each output gradient for the input gradient."""
    model = ModelConfig(**MODEL_PRESETS["llama-1b"])
    tokens = 16384
    casts = tiles.step_casts(model, tokens)
    assert sum(casts.values()) == 25 * model.num_layers
    forward, backward = layer_fp8_cast_elements(model, tokens, 1)
    row_scaled = tokens * (2 * model.hidden_size + model.num_heads * model.head_dim + model.ffn_hidden_size)
    row_scaled += sum(n * out for n, _, out in layer_gemm_shapes(model, tokens, 1))
    elements = sum(rows * cols * calls for (rows, cols, _), calls in casts.items())
    assert elements == model.num_layers * (forward + backward - row_scaled)
    # the forward's weights are the only casts read through a transposed view, one per GEMM
    assert sum(calls for (_, _, view), calls in casts.items() if view) == 7 * model.num_layers


def test_the_tried_launch_shapes_include_todays():
    from threefold.parallel import fp8

    assert tiles.TODAY == (fp8.TILE, fp8.TILE, 4) and tiles.TODAY in tiles.CONFIGS
    assert len(set(tiles.CONFIGS)) == len(tiles.CONFIGS) >= 10
