"""Run a function on N gloo ranks in forked processes and collect what each returns.

Fork (not spawn) keeps a 4-rank launch around a third of a second: children inherit the imported
torch instead of re-importing it. A hung collective fails the test after `timeout` seconds.

Gloo's rendezvous on a loaded machine now and then loses a connection before any test code runs
("connectFullMesh failed ... Connection closed by peer"). Such a launch is torn down and started
again on a fresh port, at most `RENDEZVOUS_TRIES` times; a failure inside `fn` is never retried.
"""

from __future__ import annotations

import gc
import io
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_TRIES = 3


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    torch.set_num_threads(1)
    try:
        try:
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
            )
        except Exception:
            queue.put((rank, "rendezvous", traceback.format_exc()))
            return
        result = fn(rank, world_size, *args)
        # Tensors go by value: shared-memory handles would die with this process.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _RendezvousFailed(Exception):
    pass


def _launch(world_size: int, fn: Callable, args: tuple, timeout: float) -> list[Any]:
    """One launch on a fresh port; raises _RendezvousFailed if the process group could not form."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    # The parent's objects frozen for the fork: each rank's first full collection (the training loop's
    # scheduled one, `training.gc_interval`) then walks only what the rank made, not the test process's
    # whole heap, and leaves its pages shared rather than copied on write. Measured on the 2-core dev
    # machine, the whole suite: 870 s without, 713 s with (2026-12-07).
    gc.freeze()
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()
    results: dict[int, Any] = {}
    errors: list[str] = []
    rendezvous: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            elif status == "rendezvous":
                rendezvous.append(f"rank {rank} could not join the process group on port {port}:\n{payload}")
                break
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    except Exception as e:  # queue.Empty on timeout
        errors.append(
            f"timed out after {timeout}s waiting for ranks ({type(e).__name__}); got {sorted(results)}"
        )
    finally:
        failed = bool(errors or rendezvous)
        for p in procs:
            p.join(timeout=5 if not failed else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        if failed:  # what the other ranks said before they were stopped
            try:
                while True:
                    rank, status, payload = queue.get(timeout=0.1)
                    if status != "ok":
                        said = rendezvous if status == "rendezvous" else errors
                        said.append(f"rank {rank} ({status}):\n{payload}")
            except Exception:  # empty, or cut short by a killed writer
                pass
        queue.close()
    exits = ", ".join(f"rank {r}: {p.exitcode}" for r, p in enumerate(procs))
    if errors:
        raise AssertionError("\n".join([*errors, *rendezvous, f"exit codes: {exits}"]))
    if rendezvous:
        raise _RendezvousFailed("\n".join([*rendezvous, f"exit codes: {exits}"]))
    return [results[r] for r in range(world_size)]


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = 120.0) -> list[Any]:
    """fn(rank, world_size, *args) on every rank; returns the results ordered by rank."""
    failures: list[str] = []
    for _ in range(RENDEZVOUS_TRIES):
        try:
            return _launch(world_size, fn, args, timeout)
        except _RendezvousFailed as e:
            failures.append(str(e))
    raise AssertionError(
        f"the gloo process group failed to form {RENDEZVOUS_TRIES} times:\n" + "\n".join(failures)
    )


def train_and_gather(rank: int, world_size: int, config: Any) -> dict:
    """Rank body: build the mesh, train, and report losses, norms and the full weights this rank holds.

    Weights come from TP rank 0 of DP rank 0 and CP rank 0 of each stage (tied copies left out), so
    merging every rank's dict gives the whole model once.
    """
    from threefold.parallel.layers import gather_full
    from threefold.parallel.mesh import build_mesh
    from threefold.train import train

    p = config.parallel
    mesh = build_mesh(p.tp_size, p.dp_size, p.pp_size, p.cp_size)
    result = train(config, mesh, torch.device("cpu"))
    weights = {}
    for chunk in result.trainer.chunks.values():
        for name, param in chunk.named_parameters():
            if not getattr(param, "tied_copy", False):
                weights[name] = gather_full(param, mesh.tp_group)
    keep = mesh.tp_rank == 0 and mesh.dp_rank == 0 and mesh.cp_rank == 0
    return {"losses": result.losses, "val": result.val_losses, "norms": result.grad_norms,
            "weights": weights if keep else {}}  # fmt: skip


def train_merged(config: Any, timeout: float = 240.0) -> dict:
    """`train_and_gather` of `config` on all its ranks: rank 0's losses, validation losses and norms, the
    weights every rank reported merged into the whole model, and each rank's own result under "ranks"."""
    results = run_ranks(config.world_size, train_and_gather, config, timeout=timeout)
    weights = {name: w for r in results for name, w in r["weights"].items()}
    return results[0] | {"weights": weights, "ranks": results}


def assert_trains_like(got: dict, ref: dict) -> None:
    """`got` (train_merged of a layout) trained like `ref` (the one-process reference): every rank's losses
    and validation losses, the gradient norms and every weight, to float32 round-off."""
    assert ref["losses"][-1] < ref["losses"][0], "training must make progress for the comparison to mean much"
    for rank in got["ranks"]:
        # Every rank reports the same global loss (it lives on the last stage and is shared).
        losses, ref_losses = torch.tensor(rank["losses"]), torch.tensor(ref["losses"])
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
        assert rank["val"].keys() == ref["val"].keys()
        val, ref_val = torch.tensor(list(rank["val"].values())), torch.tensor(list(ref["val"].values()))
        torch.testing.assert_close(val, ref_val, rtol=1e-5, atol=0)
    # Step 0's norm sees identical weights: a replicated parameter counted twice would show here.
    torch.testing.assert_close(got["norms"][0], ref["norms"][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), rtol=1e-5, atol=0)
    assert got["weights"].keys() == ref["weights"].keys()
    for name, ref_w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], ref_w, rtol=1e-5, atol=1e-5, msg=name)


def assert_same_training(got: dict, want: dict, *, from_step: int = 0, exact: bool = True) -> None:
    """`got` (train_merged) trained like `want` after `want`'s first `from_step` losses (for a run resumed
    from a checkpoint of `want`, the steps `want` had taken since it started when it saved that checkpoint):
    the same later losses and final weights, bit for bit where `exact` (the same layout and kernels), else to
    float32 round-off (another summation order)."""
    if exact:
        assert got["losses"] == want["losses"][from_step:]
    else:
        later = torch.tensor(want["losses"][from_step:])
        torch.testing.assert_close(torch.tensor(got["losses"]), later, rtol=1e-5, atol=0)
    assert got["weights"].keys() == want["weights"].keys()
    for name, w in want["weights"].items():
        if exact:
            assert torch.equal(got["weights"][name], w), name
        else:
            torch.testing.assert_close(got["weights"][name], w, rtol=1e-5, atol=1e-5, msg=name)
