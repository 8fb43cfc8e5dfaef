"""The float8 transposed cast's launch shape on one GPU: every tile size and warp count in CONFIGS against
today's (fp8.TILE square, 4 warps), on the casts one rowwise training step makes.

Usage (one GPU): PYTHONPATH=. python bench/transposed_cast_tiles.py [--model llama-1b] [--tokens 16384]
Rowwise casts every weight twice, every output gradient once and every distinct linear input once with
`fp8.transposed_cast` (the forward's weights from a transposed view, the rest contiguous), each with one
scale per column. For each of those shapes it times every config (CUDA events, median of 20 after 5) and
checks its output equals today's bit for bit, then prints the bandwidth table (read 2 + write 1 bytes an
element) and what the step's casts would take with each config (calls a step from `step_casts`).
The seventh session measured 12.34 ms a step for 448 casts at micro-batch 8, about 2.9 TB/s.
"""

from __future__ import annotations

import argparse
from collections import Counter
from functools import partial

import torch
from cuda_timing import median_ms

from threefold.config import ModelConfig
from threefold.plan.time_model import layer_gemm_shapes, layer_linear_inputs
from threefold.presets import MODEL_PRESETS

CONFIGS = [(r, c, w) for r in (32, 64, 128) for c in (32, 64, 128) for w in (4, 8) if r * c >= 2048]
"""(BLOCK_ROWS, BLOCK_COLS, num_warps) tried; tiles under 2048 elements leave most of a warp idle."""
TODAY = (64, 64, 4)


def step_casts(model: ModelConfig, tokens: int) -> Counter[tuple[int, int, bool]]:
    """The transposed casts of one rowwise step at tensor-parallel size 1, as (rows, cols, from a
    transposed view) -> calls a step: for each GEMM (n, k, out) of a layer, its weight W (out, k) read
    through W^T for the forward and as itself for the input gradient, and its output gradient (n, out);
    then each distinct input of the layer (projections of one input share its cast)."""
    casts: Counter[tuple[int, int, bool]] = Counter()
    for n, k, out in layer_gemm_shapes(model, tokens, 1):
        casts[(k, out, True)] += model.num_layers  # the forward's W^T
        casts[(out, k, False)] += model.num_layers  # W, for the input gradient
        casts[(n, out, False)] += model.num_layers  # dy, for the weight gradient
    for width in layer_linear_inputs(model, 1):  # q/k/v's input, o's, the MLP's, down's
        casts[(tokens, width, False)] += model.num_layers
    return casts


def launch(t: torch.Tensor, scale: torch.Tensor, config: tuple[int, int, int]) -> torch.Tensor:
    """fp8.transposed_cast's kernel under one launch shape (per-column scale), e4m3."""
    from threefold.parallel import fp8
    from threefold.parallel._fp8_kernel import transposed_cast_kernel

    rows, cols = t.shape
    out = torch.empty((cols, rows), dtype=fp8.E4M3, device=t.device)
    block_rows, block_cols, warps = config
    grid = ((rows + block_rows - 1) // block_rows, (cols + block_cols - 1) // block_cols)
    s_row, s_col, along = fp8.scale_strides(scale)
    transposed_cast_kernel[grid](
        t, out, scale, rows, cols, *t.stride(), s_row, s_col, fp8.FP8_MAX[fp8.E4M3], along,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=warps,
    )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens a step (micro-batch x seq)")
    args = parser.parse_args()
    model = ModelConfig(**MODEL_PRESETS[args.model])
    casts = step_casts(model, args.tokens)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {sum(casts.values())} casts a step")
    generator = torch.Generator(device="cuda").manual_seed(0)
    step_ms = dict.fromkeys(CONFIGS, 0.0)
    print("| rows x cols | view | calls | " + " | ".join(f"{r}x{c}/{w}" for r, c, w in CONFIGS) + " |")
    print("|---|---|---:|" + "---:|" * len(CONFIGS))
    for (rows, cols, view), calls in sorted(casts.items()):
        shape = (cols, rows) if view else (rows, cols)
        source = torch.randn(shape, device="cuda", generator=generator).to(torch.bfloat16)
        t = source.t() if view else source
        scale = torch.rand(1, cols, device="cuda", generator=generator) * 4
        expected = launch(t, scale, TODAY)
        cells = []
        for config in CONFIGS:
            got = launch(t, scale, config)
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (rows, cols, config)
            ms = median_ms(partial(launch, t, scale, config))
            step_ms[config] += ms * calls
            cells.append(f"{3 * rows * cols / ms / 1e9:.2f}")
        print(f"| {rows} x {cols} | {'W^T' if view else '-'} | {calls} | " + " | ".join(cells) + " |")
    print("\nTB/s above (3 bytes an element); the step's transposed casts with each config:")
    for config, ms in sorted(step_ms.items(), key=lambda kv: kv[1]):
        mark = "  (today)" if config == TODAY else ""
        print(f"  {config[0]}x{config[1]}, {config[2]} warps: {ms:.2f} ms{mark}")


if __name__ == "__main__":
    main()
