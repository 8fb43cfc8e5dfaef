"""AdamW over fp32 master weights, a warm-up + cosine schedule, and global gradient-norm clipping."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from threefold.config import OptimizerConfig
from threefold.parallel import track
from threefold.parallel.layers import is_sharded
from threefold.parallel.mesh import Mesh


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
    """AdamW on fp32 masters of the parameter ranges this rank updates.

    `ranges` lists (parameter, start, end) flat ranges (see GradSync.owned_ranges): whole parameters
    without ZeRO, this data-parallel rank's shard of them with ZeRO. Each range gets a 1-D fp32 master:
    the parameter's own storage when training in fp32, a copy (written back after each step) in bf16.
    Gradients come from each parameter's fp32 `main_grad`.
    """

    def __init__(
        self,
        ranges: list[tuple[nn.Parameter, int, int]],
        cfg: OptimizerConfig,
        *,
        mesh: Mesh,
        max_steps: int,
        zero: bool = False,
    ) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.max_steps = max_steps
        self.zero = zero
        self.params = list(dict.fromkeys(p for p, _, _ in ranges))
        self.ranges = ranges
        self._targets = [p.data.view(-1)[a:b] for p, a, b in ranges]
        self.masters = [t if t.dtype == torch.float32 else t.float() for t in self._targets]
        self._grads = [p.main_grad.view(-1)[a:b] for p, a, b in ranges]  # type: ignore[attr-defined]
        # Norms and biases (1-D) get no weight decay.
        decay = [m for m, (p, _, _) in zip(self.masters, ranges, strict=True) if p.ndim >= 2]
        no_decay = [m for m, (p, _, _) in zip(self.masters, ranges, strict=True) if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.fused = bool(ranges) and ranges[0][0].is_cuda
        self.adam = torch.optim.AdamW(
            [g for g in groups if g["params"]] or [{"params": [torch.zeros(0)]}],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            fused=self.fused,
            foreach=None if self.fused else True,
        )
        # Count every gradient once in the global norm: a replicated parameter appears on every TP rank,
        # a tied embedding on both the first and the last pipeline stage, and with ZeRO each rank holds
        # only its own part.
        self._counted = [
            g
            for g, (p, _, _) in zip(self._grads, ranges, strict=True)
            if (is_sharded(p) or mesh.tp_rank == 0) and not getattr(p, "tied_copy", False)
        ]

    def state_of(self, index: int) -> dict[str, torch.Tensor]:
        """Adam's moments of range `index` (empty before the first step)."""
        return self.adam.state.get(self.masters[index], {})

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradient over the whole model (all ranks), as a device tensor."""
        grads = self._counted
        device = self.params[0].device if self.params else torch.device("cpu")
        if grads and device.type == "cuda":
            squares = torch.stack(torch._foreach_norm(grads)).square().sum()  # one fused tree reduction
        elif grads:
            # CPU norms accumulate sequentially in fp32 (5e-5 relative error on a 1.6M-element vocab
            # gradient, enough to make layouts disagree); sum() uses cascade summation.
            squares = torch.stack([g.square().sum() for g in grads]).sum()
        else:
            squares = torch.zeros((), device=device)
        if self.zero and self.mesh.dp_size > 1:
            with track.collective(None, "all_reduce(grad norm)"):
                dist.all_reduce(squares)  # every rank holds a distinct part of the gradient
        elif self.mesh.tp_size * self.mesh.pp_size > 1:
            with track.collective(self.mesh.model_parallel_group, "all_reduce(grad norm)"):
                dist.all_reduce(squares, group=self.mesh.model_parallel_group)
        return squares.sqrt()

    def step(self, step: int, *, found_inf: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Clip, update, and copy masters back; returns (grad norm before clipping, lr used).

        The update is skipped (weights, moments and Adam's step count untouched) when the global grad
        norm is not finite or `found_inf` (a device bool, e.g. a non-finite loss) is set. Both are the
        same on every rank, so all ranks skip together. On CUDA the fused kernel reads the flag on the
        device (no host sync); on CPU it is read on the host.
        """
        norm = self.grad_norm()
        skip = ~torch.isfinite(norm)
        if found_inf is not None:
            skip = skip | found_inf
        lr = lr_at(step, self.cfg, self.max_steps)
        for group in self.adam.param_groups:
            group["lr"] = lr
        if self.cfg.grad_clip > 0:
            # Scale by min(1, clip / norm) without a host sync; the fused kernel divides by grad_scale
            # as it reads each gradient, which saves a pass over all of them.
            scale = ((norm + 1e-6) / self.cfg.grad_clip).clamp(min=1.0)
            if self.fused:
                self.adam.grad_scale = scale  # type: ignore[attr-defined]
            else:
                torch._foreach_div_(self._grads, scale)
        for master, grad in zip(self.masters, self._grads, strict=True):
            master.grad = grad
        if self.fused:
            self.adam.found_inf = skip.float()  # type: ignore[attr-defined]  # 0-dim, like Adam's steps
            self.adam.step()
        elif not bool(skip):
            self.adam.step()
        for master in self.masters:
            master.grad = None
        copies = [(t, m) for t, m in zip(self._targets, self.masters, strict=True) if t is not m]
        if copies:
            torch._foreach_copy_([t for t, _ in copies], [m for _, m in copies])
        return norm, lr
