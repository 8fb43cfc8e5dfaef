"""The host half of an offloaded optimizer (optimizer.offload): fp32 masters and AdamW moments in host
memory, updated on the CPU while the gradients stream down and the new weights stream back up.

The ranges are cut into parts of at most `part_numel` elements, each with an AdamW of its own. Part k's
gradients are copied into one of two pinned staging buffers on a device-to-host stream while the CPU
updates part k-1, and part k-1's new weights go back on a host-to-device stream while the CPU updates
part k: transfers in both directions overlap the CPU's work (ZeRO-Offload's pipelined update), and the
host holds 12 bytes per parameter plus the two staging buffers, not a whole fp32 gradient copy.

From a GPU the update is torch's fused CPU AdamW: one vectorized pass per tensor, spread over the cores,
where foreach makes a memory-bound pass per arithmetic step. On a CPU-only run (the tests) it is the
foreach kernel that the run without offload uses, so the two give the same weights bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from threefold.config import OptimizerConfig

PART_NUMEL = 1 << 26
"""Elements per part: 256 MiB of fp32 per staging buffer; enough to keep each copy near PCIe speed."""


def host_masters(targets: list[torch.Tensor], *, pin: bool) -> list[torch.Tensor]:
    """fp32 copies of `targets` as views of one flat host tensor, page-locked when `pin`.

    Page-locked by registering ordinary memory with CUDA (cudaHostRegister), exactly its size: torch's
    pinned allocator rounds each block up to a power of two, which would cost up to 2x on tens of GiB.
    """
    flat = torch.empty(sum(t.numel() for t in targets), dtype=torch.float32)
    if pin and flat.numel():
        try:
            err = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel() * 4, 0)
            ok = int(getattr(err, "value", err)) == 0
        except (AttributeError, RuntimeError):
            ok = False
        if not ok:
            flat = flat.pin_memory()
    masters, offset = [], 0
    for t in targets:
        masters.append(flat[offset : offset + t.numel()].view(t.shape))
        masters[-1].copy_(t)
        offset += t.numel()
    return masters


class HostAdam:
    """AdamW on host masters of device weights. `masters` are the 1-D fp32 host tensors (one per range),
    `decays` their weight decay; `on_cuda`: the weights and gradients live on the GPU."""

    def __init__(
        self,
        masters: list[torch.Tensor],
        decays: list[float],
        cfg: OptimizerConfig,
        *,
        on_cuda: bool,
        part_numel: int | None = None,
    ) -> None:
        part_numel = part_numel or PART_NUMEL
        self.masters = masters
        self.on_cuda = on_cuda
        self.parts: list[list[int]] = [[]]  # indices into masters
        size = 0
        for i, m in enumerate(masters):
            if self.parts[-1] and size + m.numel() > part_numel:
                self.parts.append([])
                size = 0
            self.parts[-1].append(i)
            size += m.numel()
        self.adams: list[torch.optim.AdamW] = []
        for part in self.parts:
            groups: dict[float, list[torch.Tensor]] = {}
            for i in part:
                groups.setdefault(decays[i], []).append(masters[i])
            self.adams.append(
                torch.optim.AdamW(
                    [{"params": ps, "weight_decay": wd} for wd, ps in groups.items()],
                    lr=cfg.lr,
                    betas=(cfg.beta1, cfg.beta2),
                    eps=cfg.eps,
                    fused=on_cuda,
                    foreach=None if on_cuda else True,
                )
            )
        largest = max((sum(masters[i].numel() for i in part) for part in self.parts), default=0)
        self._staging = [torch.empty(largest, dtype=torch.float32, pin_memory=on_cuda) for _ in range(2)]
        self._down = torch.cuda.Stream() if on_cuda else None
        self._up = torch.cuda.Stream() if on_cuda else None

    def step(
        self, grads: list[torch.Tensor], targets: list[torch.Tensor], scale: torch.Tensor | None, lr: float
    ) -> None:
        """Update the masters from the device `grads` (divided by `scale` if given), then write them into
        `targets` (the device weights). The compute stream waits for the new weights, the host does not."""
        for adam in self.adams:
            for group in adam.param_groups:
                group["lr"] = lr
        host_scale = None if scale is None else scale.cpu()
        compute = torch.cuda.current_stream() if self.on_cuda else None
        if self._down is not None:
            self._down.wait_stream(compute)  # type: ignore[arg-type]  # the gradients are final
        staged = [self._stage(0, grads)]
        for k, (part, adam) in enumerate(zip(self.parts, self.adams, strict=True)):
            if k + 1 < len(self.parts):
                staged.append(self._stage(k + 1, grads))  # in flight while the CPU updates part k
            views, done = staged[k]
            if done is not None:
                done.synchronize()
            if host_scale is not None:
                torch._foreach_div_(views, host_scale)
            for i, view in zip(part, views, strict=True):
                self.masters[i].grad = view
            adam.step()
            for i in part:
                self.masters[i].grad = None
            self._write(part, targets)
        if self._up is not None:
            compute.wait_stream(self._up)  # type: ignore[union-attr]

    def _stage(self, k: int, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """Start copying part k's gradients into staging buffer k % 2; returns the views and an event."""
        buffer = self._staging[k % 2]
        views, offset = [], 0
        for i in self.parts[k]:
            n = self.masters[i].numel()
            views.append(buffer[offset : offset + n])
            offset += n
        if self._down is None:
            torch._foreach_copy_(views, [grads[i] for i in self.parts[k]])
            return views, None
        with torch.cuda.stream(self._down):
            for view, i in zip(views, self.parts[k], strict=True):
                view.copy_(grads[i], non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return views, done

    def _write(self, part: list[int], targets: list[torch.Tensor]) -> None:
        if self._up is None:
            torch._foreach_copy_([targets[i] for i in part], [self.masters[i] for i in part])
            return
        with torch.cuda.stream(self._up):
            for i in part:
                if targets[i].dtype == torch.float32:
                    targets[i].copy_(self.masters[i], non_blocking=True)
                else:  # bf16: move fp32 and convert on the GPU (a CPU-side cast would block on the host)
                    targets[i].copy_(self.masters[i].to(targets[i].device, non_blocking=True))

    def write_back(self, targets: list[torch.Tensor]) -> None:
        """Copy every master into its target (after a checkpoint load)."""
        for part in self.parts:
            self._write(part, targets)
        if self._up is not None:
            torch.cuda.current_stream().wait_stream(self._up)
