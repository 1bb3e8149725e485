"""The process group of a run, for every launch mode, and errors that every rank agrees on."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from molscale.datasets.errors import EXIT_BAD_INPUT, InputError, MolscaleError, RunError


def launch_rank() -> int:
    """This process's global rank as the launcher set it (deepspeed, torchrun and SLURM scripts set RANK);
    0 for a plain ``python`` start. Known before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def accelerator():
    """DeepSpeed's accelerator: DS_ACCELERATOR when set, else the one DeepSpeed detects
    (deepspeed/accelerator/real_accelerator.py, get_accelerator). DeepSpeed's engine places the model with it,
    so the trainer's tensors and the process group follow it too, not torch.cuda: with DS_ACCELERATOR=cpu on a
    GPU machine (tests, `make demo`) the whole run stays on the CPU."""
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


def run_device() -> torch.device:
    """This rank's device: the one DeepSpeed's engine moves the model to (deepspeed/runtime/engine.py,
    DeepSpeedEngine._set_distributed_vars: ``torch.device(get_accelerator().device_name(local_rank))``)."""
    return torch.device(accelerator().device_name(local_rank()))


def backend() -> str:
    """The accelerator's process-group backend: nccl for CUDA, gloo (ccl with oneCCL) for the CPU."""
    return accelerator().communication_backend_name()


def skip_cpu_inference_comm_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory collective op. The op serves only
    inference_all_reduce (deepspeed/comm/torch.py: build_shm_op, TorchBackend.inference_all_reduce), which training
    never calls. Left on, it is compiled at the first init under a lock file in ~/.cache/torch_extensions (a
    launch killed while compiling leaves the lock behind, and every later launch waits on it without a word),
    and each rank maps a 67 MB /dev/shm buffer that outlives a killed rank and stays in memory."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_minutes: float = 10.0) -> None:
    """One process group for every launch mode: plain python gets a world of one. A collective that waits
    ``timeout_minutes`` for a rank that never comes fails instead of hanging."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import deepspeed
    if run_device().type != "cpu":
        accelerator().set_device(local_rank())  # before the group: NCCL collectives use the current device
    else:
        skip_cpu_inference_comm_op()
        if "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks on one machine share its cores; more threads than cores makes every rank crawl.
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_ranks)))
    deepspeed.init_distributed(dist_backend=backend(), timeout=datetime.timedelta(minutes=timeout_minutes))


def end_process_group() -> None:
    """Destroy the process group and DeepSpeed's cached groups built on it (deepspeed/utils/groups.py keeps the
    world group it cloned first), so that a later group in the same process (a benchmark, tests) starts clean."""
    from deepspeed.utils import groups
    if dist.is_initialized():
        dist.destroy_process_group()
    groups._WORLD_GROUP = None
    groups._DATA_PARALLEL_GROUP = None


class LostRankError(RunError):
    """A collective failed because another rank is gone (its node stopped, the network failed) or silent."""


# What the backends say when a peer disappears (gloo: the TCP pair; NCCL: its watchdog and remote errors)
# or stays silent past the timeout. They raise RuntimeError (or torch's DistError) with these words.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
              "timed out", "Timed out", "Socket Timeout", "NCCL communicator was aborted", "ncclRemoteError",
              "Watchdog caught collective operation timeout")


def lost_rank_error(err: BaseException, run_dir: str) -> LostRankError | None:
    """The one-line error for a collective that failed because another rank is gone; None for anything else."""
    text = str(err)
    if not (isinstance(err, getattr(dist, "DistError", ())) or
            (isinstance(err, RuntimeError) and any(marker in text for marker in _PEER_LOST))):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    latest = os.path.join(run_dir, "latest")
    resume = (f"it continues from {open(latest).read().strip()}" if os.path.exists(latest)
              else "no checkpoint was completed yet")
    return LostRankError(f"lost contact with another rank ({first[:200]}): a node stopped or the network failed. "
                         f"Start the same command on every node with --resume auto; {resume}.")


def raise_if_any_rank_failed(problem: MolscaleError | None) -> None:
    """A collective check point: if any rank found a problem, every rank raises the lowest failing rank's
    (marked ``all_ranks``, so only rank 0 prints it); otherwise return on every rank.

    Called where every rank has finished its own checks and before the next collective, so a rank with bad
    input cannot leave the others waiting in a collective it never joins.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        if problem is not None:
            problem.all_ranks = True
            raise problem
        return
    mine = None if problem is None else (str(problem), problem.exit_code)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    failed = [(rank, found) for rank, found in enumerate(everyone) if found is not None]
    if not failed:
        return
    rank, (message, exit_code) = failed[0]
    if problem is not None and rank == dist.get_rank():
        err = problem
    else:
        err = (InputError if exit_code == EXIT_BAD_INPUT else RunError)(
            message if rank == 0 else f"{message} (found on rank {rank})")
    err.all_ranks = True
    raise err
