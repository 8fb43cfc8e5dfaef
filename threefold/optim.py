"""AdamW over fp32 master weights, a warm-up + cosine schedule, and global gradient-norm clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from threefold import watchdog
from threefold.config import OptimizerConfig
from threefold.layers import is_sharded
from threefold.mesh import Mesh


def lr_at(step: int, cfg: OptimizerConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.decay_steps or max_steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


class Optimizer:
    """AdamW on fp32 masters of the model's parameters (the parameters themselves when training in fp32).

    Gradients come from each parameter's fp32 `main_grad` (see data_parallel.GradSync).
    """

    def __init__(self, model: nn.Module, cfg: OptimizerConfig, *, mesh: Mesh, max_steps: int) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.max_steps = max_steps
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masters = [
            p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone()) for p in self.params
        ]
        # Norms and biases (1-D) get no weight decay.
        decay = [m for m in self.masters if m.ndim >= 2]
        no_decay = [m for m in self.masters if m.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = bool(self.params) and self.params[0].is_cuda
        self.adam = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            fused=fused,
            foreach=None if fused else True,
        )
        # Count every gradient once in the global norm: a replicated parameter appears on every TP rank,
        # and a tied embedding on both the first and the last pipeline stage.
        self._counted = [
            p
            for p in self.params
            if (is_sharded(p) or mesh.tp_rank == 0) and not getattr(p, "tied_copy", False)
        ]

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradient over the whole model (all TP and PP ranks), as a device tensor."""
        grads = [p.main_grad for p in self._counted]  # type: ignore[attr-defined]
        device = self.params[0].device
        if grads and device.type == "cuda":
            squares = torch.stack(torch._foreach_norm(grads)).square().sum()  # one fused tree reduction
        elif grads:
            # CPU norms accumulate sequentially in fp32 (5e-5 relative error on a 1.6M-element vocab
            # gradient, enough to make layouts disagree); sum() uses cascade summation.
            squares = torch.stack([g.square().sum() for g in grads]).sum()
        else:
            squares = torch.zeros((), device=device)
        if self.mesh.tp_size * self.mesh.pp_size > 1:
            with watchdog.collective(self.mesh.model_parallel_group, "all_reduce(grad norm)"):
                dist.all_reduce(squares, group=self.mesh.model_parallel_group)
        return squares.sqrt()

    def step(self, step: int, *, found_inf: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Clip, update, and copy masters back; returns (grad norm before clipping, lr used).

        The update is skipped (weights, moments and Adam's step count untouched) when the global grad
        norm is not finite or `found_inf` (a device bool, e.g. a non-finite loss) is set. Both are the
        same on every rank, so all ranks skip together. On CUDA the fused kernel reads the flag on the
        device (no host sync); on CPU it is read on the host.
        """
        grads = [p.main_grad for p in self.params]  # type: ignore[attr-defined]
        norm = self.grad_norm()
        skip = ~torch.isfinite(norm)
        if found_inf is not None:
            skip = skip | found_inf
        if self.cfg.grad_clip > 0:
            # Scale by min(1, clip / norm) without a host sync.
            coef = (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)
        lr = lr_at(step, self.cfg, self.max_steps)
        for group in self.adam.param_groups:
            group["lr"] = lr
        for master, grad in zip(self.masters, grads, strict=True):
            master.grad = grad
        if self.adam.defaults.get("fused"):
            self.adam.found_inf = skip.float().reshape(1)  # type: ignore[attr-defined]
            self.adam.step()
        elif not bool(skip):
            self.adam.step()
        for master in self.masters:
            master.grad = None
        low_precision = [(p, m) for p, m in zip(self.params, self.masters, strict=True) if p is not m]
        if low_precision:
            torch._foreach_copy_([p.data for p, _ in low_precision], [m.data for _, m in low_precision])
        return norm, lr
