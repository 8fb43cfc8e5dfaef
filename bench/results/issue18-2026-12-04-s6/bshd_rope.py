"""Call 1's variant: RoPE applied to q and k in (b, s, heads, d) order, then the transpose to (b, heads, s, d)
as a view, so that the tensors scaled_dot_product_attention gets keep the projections' layout (and cuDNN's
output, which follows q's layout, is already the layout o_proj reads). Imported before bench/profile_step.py
runs: `python bench/results/issue18-2026-12-04-s6/bshd_rope.py [profile_step args]`."""

import runpy
import sys

import torch

from threefold.model import transformer
from threefold.model.transformer import Attention, apply_rope


def forward(self, x, rope, mask=None):  # Attention.forward with the reorder
    q, k, v = self.tp.project(x, [self.q_proj, self.k_proj, self.v_proj])
    b, s, _ = q.shape
    q = q.view(b, s, self.num_local_heads, self.head_dim)
    k = k.view(b, s, self.num_local_kv_heads, self.head_dim)
    v = v.view(b, s, self.num_local_kv_heads, self.head_dim)
    if self.use_rope:
        cos, sin = rope
        # (s, d) -> (s, 1, d); per-row (b, 1, s, d) -> (b, s, 1, d)
        cos, sin = (
            (cos[:, None], sin[:, None]) if cos.dim() == 2 else (cos.transpose(1, 2), sin.transpose(1, 2))
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = self.core(q, k, v, mask)
    y = y.transpose(1, 2).reshape(b, s, self.num_local_heads * self.head_dim)
    return self.o_proj(y)


Attention.forward = forward
assert transformer.Attention.forward is forward
print("bshd rope patch on; torch", torch.__version__, file=sys.stderr)
sys.argv = ["bench/profile_step.py", *sys.argv[1:]]
runpy.run_path("bench/profile_step.py", run_name="__main__")
