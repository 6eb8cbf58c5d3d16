"""Where one model runs on several processes: the process group that torchrun (or accelerate launch) starts, and
the few collective steps the project needs around the Trainer's own data parallelism.

Under a launcher every process trains the same model: each takes a share of every batch and of the validation rows,
rank 0 decides what is read from or written to disk and tells the others. Without a launcher there is one process
(rank 0 of 1) and every function here is a no-op.
"""
import os

import numpy as np
import torch
import torch.distributed as dist

from utils import InputError


def launched():
    """Whether a launcher started this process as one of several (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    """This process's rank; a launched process knows it (RANK) before it joins the group."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    return rank() == 0


def start():
    """Join the launcher's process group (NCCL on GPUs, gloo on CPUs); return this process's device."""
    if not launched():
        return None
    device = "cpu"
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not is_distributed():
        dist.init_process_group(backend="nccl" if device != "cpu" else "gloo")
    return device


def finish():
    """Leave the process group, all ranks together, before the process exits: left open, gloo's threads can abort
    the exit ("terminate called without an active exception"), and torchrun then reports a run that succeeded as
    failed. The barrier keeps a rank that is done (the others return before rank 0's summary) from closing its
    connections while rank 0 still holds its own: CI saw rank 1 abort so once with the group destroyed unsynchronised."""
    if is_distributed():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def check_launch(given):
    """InputError when a flag that places models on processes (`given`: the settings named on the command line)
    clashes with a launcher that already did."""
    clashing = [flag for name, flag in (("WORKERS", "--workers"), ("GPUS", "--gpus")) if name in given]
    if launched() and clashing:
        raise InputError(f"{' and '.join(clashing)} under torchrun: the launcher places the processes, one per GPU "
                         f"(--nproc_per_node); drop {' and '.join(clashing)}")


def barrier():
    if is_distributed():
        dist.barrier()


def from_main(value):
    """Rank 0's `value`, on every rank."""
    if not is_distributed():
        return value
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_decides(decide):
    """decide() run on rank 0 only (it may read and write files), its answer on every rank; an exception it raises
    is raised on every rank."""
    if not is_distributed():
        return decide()
    outcome = None
    if is_main():
        try:
            outcome = ("value", decide())
        except Exception as error:  # every rank raises it, so none waits on the others forever
            outcome = ("error", error)
    kind, value = from_main(outcome)
    if kind == "error":
        raise value
    return value


def share(items):
    """This rank's share of `items`: every world_size-th one from its rank on."""
    return items[rank()::world_size()]


def gather_shares(mine):
    """Every rank's `share` (a list or an array of rows), put back in the order of the items they were taken from."""
    if not is_distributed():
        return mine
    shares = [None] * world_size()
    dist.all_gather_object(shares, mine)
    total = sum(len(part) for part in shares)
    whole = [None] * total if isinstance(mine, list) else np.empty((total, *mine.shape[1:]), dtype=mine.dtype)
    for position, part in enumerate(shares):
        whole[position::len(shares)] = part
    return whole
