"""Leaf helpers for the scripts: errors, seeding, atomic checkpoints and JSON logs, distributed set-up.

Nothing here imports from the project.
"""
import ctypes
import datetime
import json
import os
import random
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

# glibc malloc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a
# fresh mmap and unmaps it when freed, so each forward pass page-faults its activations in again:
# on 2 CPU cores that is half the time of a CIFAR-sized scattering forward (BENCHMARKS.md).
# mallopt parameter numbers from glibc's malloc.h; 32 MiB is the largest threshold it accepts on 64-bit.
GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2 ** 20
KEEP_FREED_BYTES = 2 ** 30  # freed memory kept for reuse before glibc returns it to the system


def die(message):
    """End the program on bad input: one line on stderr (from rank 0 only), exit code 2, no traceback."""
    if distributed_env()[0] == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def keep_freed_memory():
    """Make glibc malloc reuse freed blocks up to 32 MiB instead of unmapping them; False when not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(GLIBC_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def device_memory_bytes(device):
    """Total memory of a CUDA device, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def format_seconds(seconds):
    return str(datetime.timedelta(seconds=int(round(seconds))))


# ----------------------------------------------------------------------------- atomic files

def _atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file open()'s usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path, checkpoint):
    """torch.save(checkpoint) atomically. The caller builds the dict (state_dict, best_val_acc, epoch, config, ...)."""
    _atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain Python values only, never code from the file."""
    return torch.load(path, map_location=map_location, weights_only=True)


def write_json(path, obj):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


# ----------------------------------------------------------------------------- distributed

def distributed_env():
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when they are absent."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def init_distributed(device_type):
    """Start the process group when torchrun set RANK/WORLD_SIZE: NCCL on CUDA, Gloo on CPU.

    Returns (rank, world_size, local_rank); with a single process nothing is started.
    """
    rank, world_size, local_rank = distributed_env()
    if world_size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, local_rank


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def is_main_process():
    return not is_distributed() or dist.get_rank() == 0


def all_reduce_sum(tensor):
    """Sum a tensor over ranks, in place; a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min_positive(tensor):
    """The smallest positive value of an integer tensor over ranks, 0 when no rank has one (single process: itself)."""
    if is_distributed():
        never = torch.iinfo(tensor.dtype).max
        tensor = torch.where(tensor > 0, tensor, never)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        tensor = torch.where(tensor == never, 0, tensor)
    return tensor


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def replicas_agree(tensors):
    """True when every rank holds bitwise the same tensors (compared through their float64 sums and min/max)."""
    if not is_distributed():
        return True
    summary = torch.stack([torch.stack([t.double().sum(), t.double().pow(2).sum()]) for t in tensors]).flatten()
    low, high = summary.clone(), summary.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def barrier():
    if is_distributed():
        dist.barrier()


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def main_print(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)
