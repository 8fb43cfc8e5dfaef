"""AdamW over fp32 master weights, a warm-up + cosine schedule, and global gradient-norm clipping.

The optimizer saves and restores its own state (`state_dict` / `load_state_dict`) as an
`OptimizerState`: per parameter name, the flat range it updates with that range's fp32 master and
moments, and the step count. Checkpoints move these without knowing AdamW's layout or the ZeRO slicing.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from threefold.adamw import TableCache, adamw_update
from threefold.config import OptimizerConfig
from threefold.offload import HostAdam, host_masters
from threefold.parallel import track
from threefold.parallel.layers import is_tp_primary
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


@dataclass(frozen=True)
class ParamSlice:
    """Optimizer state of one parameter: elements [start, end) of its flattened TP-local tensor.

    `master` and each moment are 1-D fp32 tensors of end - start elements. From `state_dict()` they are
    the optimizer's own tensors (copy them before the next step); `load_state_dict()` accepts any slice
    that covers the range it updates and copies its part of it.
    """

    start: int
    end: int
    master: torch.Tensor
    moments: dict[str, torch.Tensor] = field(default_factory=dict)
    """By name (AdamW: exp_avg, exp_avg_sq); empty before the first step."""


@dataclass(frozen=True)
class OptimizerState:
    """What an optimizer needs to continue exactly where it stopped."""

    step: float
    """Optimizer steps taken (AdamW's bias correction counts them; skipped steps do not count)."""
    params: dict[str, ParamSlice]
    """By parameter name: the range this rank updates, with its master weights and moments."""
    dp_sharded: bool = False
    """Each data-parallel rank holds a distinct part of the state (ZeRO), rather than a replica."""


class Optimizer:
    """AdamW on fp32 masters of the parameter ranges this rank updates.

    `ranges` lists (parameter, start, end) flat ranges (see GradSync.owned_ranges): whole parameters
    without ZeRO, this data-parallel rank's shard of them with ZeRO. Each range gets a 1-D fp32 master:
    the parameter's own storage when training in fp32, a copy (written back after each step) in bf16.
    Gradients come from each parameter's fp32 `main_grad`, or from `grads` (one per range) when given:
    a list, or a function returning this step's list (GradSync.owned_grads with direct gradients, in the
    compute dtype; read in fp32);
    `weights` (one per range) replaces the parameters' ranges as what is updated. With `offload` the
    masters and moments of the last `cfg.offload_fraction` of the elements live in host memory and are
    updated there (threefold/offload.py); the rest as without. `names` gives each
    parameter the name its state goes by in `state_dict()` (default: its position in `params`).
    """

    moment_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        ranges: list[tuple[nn.Parameter, int, int]],
        cfg: OptimizerConfig,
        *,
        mesh: Mesh,
        max_steps: int,
        zero: bool | int = False,
        names: Mapping[nn.Parameter, str] | None = None,
        grads: list[torch.Tensor] | Callable[[], list[torch.Tensor]] | None = None,
        weights: list[torch.Tensor] | None = None,
        offload: bool = False,
    ) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.max_steps = max_steps
        self.zero = bool(zero)
        self.params = list(dict.fromkeys(p for p, _, _ in ranges))
        self.ranges = ranges
        position = {p: str(i) for i, p in enumerate(self.params)}
        self._names = [(names or position)[p] for p, _, _ in ranges]
        assert len(set(self._names)) == len(ranges), "one range per parameter, each with its own name"
        # ZeRO-2/3 keep the reduced gradients (and ZeRO-3 the parameters) in shards of their own: the
        # gradient sync hands over those (GradSync.owned_grads / owned_weights).
        self._targets = weights if weights is not None else [p.data.view(-1)[a:b] for p, a, b in ranges]
        self._grad_source = grads if callable(grads) else None
        self._grads: list[torch.Tensor] = (
            [] if callable(grads)
            else grads if grads is not None
            else [p.main_grad.view(-1)[a:b] for p, a, b in ranges]  # type: ignore[attr-defined]
        )  # fmt: skip
        assert len(self._targets) == len(ranges) and (callable(grads) or len(self._grads) == len(ranges))
        on_cuda = bool(ranges) and ranges[0][0].is_cuda
        self.offload = offload
        decays = [cfg.weight_decay if p.ndim >= 2 else 0.0 for p, _, _ in ranges]  # none on norms, biases
        # Offload keeps the state of the last `offload_fraction` of the elements in host memory (the rest
        # stays on the GPU: Deep Optimizer States' split); masters there are always separate copies.
        total = sum(t.numel() for t in self._targets)
        fraction = cfg.offload_fraction
        assert not isinstance(fraction, str), "offload_fraction 'auto' is resolved at start-up (plan.fit)"
        budget, on_host = total * fraction if offload else 0.0, set()
        for i in reversed(range(len(ranges))):
            if budget <= 0:
                break
            on_host.add(i)
            budget -= self._targets[i].numel()
        self._host = sorted(on_host)
        self._device = [i for i in range(len(ranges)) if i not in on_host]
        on_host_masters = host_masters([self._targets[i] for i in self._host], pin=on_cuda)
        host_of = dict(zip(self._host, on_host_masters, strict=True))
        self.masters = [
            host_of[i] if i in host_of else t if t.dtype == torch.float32 else t.float()
            for i, t in enumerate(self._targets)
        ]
        groups: dict[float, list[torch.Tensor]] = {}
        for i in self._device:
            groups.setdefault(decays[i], []).append(self.masters[i])
        self.fused = on_cuda
        self.adam = torch.optim.AdamW(
            [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()]
            or [{"params": [torch.zeros(0)]}],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            fused=self.fused,
            foreach=None if self.fused else True,
        )
        self.host_adam = (
            HostAdam(
                [self.masters[i] for i in self._host], [decays[i] for i in self._host], cfg, on_cuda=on_cuda
            )
            if self._host
            else None
        )
        # What the one-pass update reads besides the state: each device range's decay and bf16 weight
        # (None where the master is the weight).
        self._device_decays = [decays[i] for i in self._device]
        self._device_weights = [
            None if self._targets[i] is self.masters[i] else self._targets[i] for i in self._device
        ]
        device = ranges[0][0].device if ranges else torch.device("cpu")
        self._lr = torch.zeros((), dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._adamw_tables: TableCache = {}  # the one-launch update's address tables (threefold/adamw.py)
        # The one-pass update is a Triton kernel: on CUDA, for contiguous ranges, with Triton installed;
        # elsewhere torch's AdamW, which is faster on the CPU than the same update in torch operations.
        dense = all(t.is_contiguous() for t in (*self._targets, *self._grads, *self.masters))
        triton = importlib.util.find_spec("triton") is not None
        self._one_pass = bool(cfg.fused_update and self._device and on_cuda and dense and triton)
        self._adams = [self.adam, *(self.host_adam.adams if self.host_adam else [])]
        self._adam_of = {m: a for a in self._adams for g in a.param_groups for m in g["params"]}
        # Count every gradient once in the global norm: a replicated parameter appears on every TP rank
        # (a replicated kv shard on each of its replicas), a tied embedding on both the first and the
        # last pipeline stage, and with ZeRO each rank holds only its own part.
        self._counted_mask = [
            is_tp_primary(p, mesh.tp_rank) and not getattr(p, "tied_copy", False) for p, _, _ in ranges
        ]

    def _current_grads(self) -> list[torch.Tensor]:
        """The gradient of each range: the fixed views, or this step's from the grads function."""
        return self._grad_source() if self._grad_source is not None else self._grads

    def grads(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, gradient of the range this rank updates): what cross-group sums must reach."""
        return [(p, g) for (p, _, _), g in zip(self.ranges, self._current_grads(), strict=True)]

    def state_dict(self) -> OptimizerState:
        """This rank's state by parameter name: its ranges' masters and moments (live tensors)."""
        params = {}
        for name, (_, start, end), master in zip(self._names, self.ranges, self.masters, strict=True):
            adam_state = self._adam_of[master].state.get(master, {})
            moments = {k: adam_state[k] for k in self.moment_names if k in adam_state}
            params[name] = ParamSlice(start, end, master, moments)
        # Every range takes (or skips) every step together, so any one count is all of them.
        steps = [s["step"] for a in self._adams for s in a.state.values() if "step" in s]
        return OptimizerState(float(steps[0]) if steps else 0.0, params, dp_sharded=self.zero)

    @torch.no_grad()
    def load_state_dict(self, state: OptimizerState) -> None:
        """Continue from `state`: each parameter's slice must cover the range this rank updates.

        Slices of parameters this rank does not update are ignored; moments must be given for all of
        this rank's parameters or for none (a fresh start, e.g. a checkpoint saved before the first
        step). Everything is checked (ValueError) before anything is written. The loaded masters are
        copied into the parameters' ranges too; the rest of each parameter is the caller's to restore.
        """
        masters, moments = self._pieces_of(state)
        for master, piece in zip(self.masters, masters, strict=True):
            master.copy_(piece)
        self._write_back(host=True)
        for adam in self._adams:
            position = {m: i for i, m in enumerate(p for g in adam.param_groups for p in g["params"])}
            adam_state: dict[int, dict[str, torch.Tensor]] = {}
            for master, pieces in zip(self.masters, moments, strict=True):
                if pieces and master in position:
                    step = {"step": torch.tensor(state.step, dtype=torch.float32)}
                    adam_state[position[master]] = step | {k: v.to(master.device) for k, v in pieces.items()}
            state_dict = adam.state_dict()
            state_dict["state"] = adam_state  # none: Adam starts afresh
            adam.load_state_dict(state_dict)

    def _pieces_of(self, state: OptimizerState) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """(master, moments by name) of each of this rank's ranges, cut from `state`; ValueError if unfit."""
        missing = [name for name in self._names if name not in state.params]
        if missing:
            more = " ..." if len(missing) > 5 else ""
            raise ValueError(f"optimizer state lacks parameters {missing[:5]}{more}")
        masters, moments = [], []
        for name, (_, start, end) in zip(self._names, self.ranges, strict=True):
            piece = state.params[name]
            if not piece.start <= start <= end <= piece.end:
                raise ValueError(
                    f"optimizer state of {name} holds elements {piece.start}..{piece.end}, "
                    f"which do not cover this rank's {start}..{end}"
                )
            if piece.moments and set(piece.moments) != set(self.moment_names):
                raise ValueError(
                    f"optimizer state of {name} holds {sorted(piece.moments)}; "
                    f"this optimizer keeps {list(self.moment_names)}"
                )
            cut = slice(start - piece.start, end - piece.start)
            for key, t in [("master", piece.master), *piece.moments.items()]:
                if t.numel() != piece.end - piece.start:
                    raise ValueError(
                        f"optimizer state of {name}: {key} has {t.numel()} elements for the "
                        f"{piece.end - piece.start} of {piece.start}..{piece.end}"
                    )
            masters.append(piece.master.reshape(-1)[cut])
            moments.append({k: v.reshape(-1)[cut].clone() for k, v in piece.moments.items()})
        with_moments = [name for name, m in zip(self._names, moments, strict=True) if m]
        if with_moments and len(with_moments) != len(self._names):
            without = [name for name, m in zip(self._names, moments, strict=True) if not m]
            raise ValueError(
                f"optimizer state has moments for {with_moments[:3]} but not for {without[:3]}: "
                "it comes from another optimizer or is incomplete"
            )
        return masters, moments

    def grad_norm(self, grads: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Global L2 norm of the gradient (`grads`, one per range: this step's by default) over the whole
        model (all ranks), in fp32, as a device tensor."""
        every = self._current_grads() if grads is None else grads
        grads = [g for g, counted in zip(every, self._counted_mask, strict=True) if counted]
        device = self.params[0].device if self.params else torch.device("cpu")
        if grads and device.type == "cuda":
            # One fused tree reduction; direct bf16 gradients accumulate and return in fp32 as well.
            fp32 = all(g.dtype == torch.float32 for g in grads)
            norms = torch._foreach_norm(grads) if fp32 else torch._foreach_norm(grads, 2, dtype=torch.float32)
            squares = torch.stack(norms).square().sum()
        elif grads:
            # CPU norms accumulate sequentially in fp32 (5e-5 relative error on a 1.6M-element vocab
            # gradient, enough to make layouts disagree); sum() uses cascade summation.
            squares = torch.stack([g.float().square().sum() for g in grads]).sum()
        else:
            squares = torch.zeros((), device=device)
        if self.zero and self.mesh.dp_cp_size > 1:
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
        same on every rank, so all ranks skip together. On CUDA the update (the one-pass kernel or torch's
        fused AdamW) reads the flag on the device (no host sync); on CPU it is read on the host.
        """
        grads = self._current_grads()
        norm = self.grad_norm(grads)
        skip = ~torch.isfinite(norm)
        if found_inf is not None:
            skip = skip | found_inf
        lr = lr_at(step, self.cfg, self.max_steps)
        for group in self.adam.param_groups:
            group["lr"] = lr
        scale = ((norm + 1e-6) / self.cfg.grad_clip).clamp(min=1.0) if self.cfg.grad_clip > 0 else None
        if self._one_pass:
            self._fused_step(grads, lr, scale, skip)
        else:
            self._torch_step(grads, scale, skip)
        # The host reads the flag: an offloaded update waits for the gradients anyway.
        if self.host_adam is not None and not bool(skip.cpu()):
            self.host_adam.step(
                [grads[i] for i in self._host], [self._targets[i] for i in self._host], scale, lr
            )
        return norm, lr

    def _fused_step(
        self, grads: list[torch.Tensor], lr: float, scale: torch.Tensor | None, skip: torch.Tensor
    ) -> None:
        """The device ranges' update and write-back in one pass per range (threefold/adamw.py)."""
        masters = [self.masters[i] for i in self._device]
        device = masters[0].device
        for master in masters:  # torch's AdamW holds the state (checkpoints read it from there)
            if master not in self.adam.state:
                zeros = functools.partial(torch.zeros_like, master, memory_format=torch.preserve_format)
                step = torch.zeros((), dtype=torch.float32, device=device)
                self.adam.state[master] = {"step": step, "exp_avg": zeros(), "exp_avg_sq": zeros()}
        states = [self.adam.state[m] for m in masters]
        self._lr.fill_(lr)
        adamw_update(
            masters, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], [grads[i] for i in self._device], self._device_weights,
            self._device_decays,
            lr=self._lr, scale=self._one if scale is None else scale, skip=skip.to(device),
            betas=(self.cfg.beta1, self.cfg.beta2), eps=self.cfg.eps, cache=self._adamw_tables,
        )  # fmt: skip

    def _torch_step(self, grads: list[torch.Tensor], scale: torch.Tensor | None, skip: torch.Tensor) -> None:
        """torch's AdamW (fused on CUDA) over the device ranges, then the masters copied into the weights."""
        dev_masters = [self.masters[i] for i in self._device]
        # torch's AdamW wants gradients of the masters' dtype: direct bf16 gradients are read in fp32.
        dev_grads = [grads[i].to(self.masters[i].dtype) for i in self._device]
        if scale is not None:
            # Scale by min(1, clip / norm) without a host sync; the fused kernel divides by grad_scale
            # as it reads each gradient, which saves a pass over all of them.
            if self.fused:
                self.adam.grad_scale = scale  # type: ignore[attr-defined]
            elif dev_grads:
                torch._foreach_div_(dev_grads, scale)
        for master, grad in zip(dev_masters, dev_grads, strict=True):
            master.grad = grad
        if not self._device:
            pass  # everything is offloaded
        elif self.fused:
            self.adam.found_inf = skip.float()  # type: ignore[attr-defined]  # 0-dim, like Adam's steps
            self.adam.step()
        elif not bool(skip):
            self.adam.step()
        for master in dev_masters:
            master.grad = None
        self._write_back()

    def _write_back(self, *, host: bool = False) -> None:
        """Copy the device masters into the weights they are not (bf16); `host`: the host masters too."""
        copies = [(self._targets[i], self.masters[i]) for i in self._device]
        copies = [(t, m) for t, m in copies if t is not m]
        if copies:
            torch._foreach_copy_([t for t, _ in copies], [m for _, m in copies])
        if host and self.host_adam is not None:
            self.host_adam.write_back([self._targets[i] for i in self._host])
