"""Does torch._foreach_norm over bf16 gradients (dtype=float32) equal it over their fp32 copies, for
llama-1b's parameter shapes? (Direct gradients against the fp32 buffers, call 2.)"""

import torch

torch.manual_seed(0)
h, f, kv, vocab, layers = 2048, 8192, 512, 128256, 16
shapes = [(vocab, h), (vocab, h), (h,)] + [
    s for _ in range(layers) for s in [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f), (h,), (h,)]
]
grads = [torch.randn(s, device="cuda", dtype=torch.bfloat16) * 1e-3 for s in shapes]
flat = torch.empty(sum(g.numel() for g in grads), device="cuda", dtype=torch.float32)
views, at = [], 0
for g in grads:
    views.append(flat[at : at + g.numel()].view_as(g))
    at += g.numel()
    views[-1].copy_(g)
direct = torch._foreach_norm(grads, 2, dtype=torch.float32)
buffered = torch._foreach_norm(views)
copies = torch._foreach_norm([g.float() for g in grads])


def unequal(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> int:
    return sum(not torch.equal(a, b) for a, b in zip(xs, ys, strict=True))


print(
    f"per-tensor norms unequal (bf16 dtype=f32 vs fp32 bucket views): {unequal(direct, buffered)}"
    f" of {len(grads)}"
)
print(f"unequal (fp32 bucket views vs fresh fp32 copies): {unequal(copies, buffered)}")
print(f"unequal (bf16 dtype=f32 vs fresh fp32 copies): {unequal(copies, direct)}")
tot = [torch.stack(n).square().sum().sqrt().item() for n in (direct, buffered)]
print(f"total norms: {tot[0]!r} {tot[1]!r} relative {abs(tot[0] / tot[1] - 1):.2e}")
