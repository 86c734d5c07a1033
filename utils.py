"""Leaf helpers for the scripts: errors, seeding, atomic checkpoints and JSON logs, distributed set-up.

Nothing here imports from the project.
"""
import datetime
import json
import math
import os
import pickle
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

# How long DDP processes wait for each other (start-up and each collective) before giving up: torch's
# NCCL default (10 min), not Gloo's 30 min, so that a missing rank is reported the same on CPU and GPU.
DIST_TIMEOUT_S = 600.0


def die(message, every_rank=False):
    """End the program on bad input: one line on stderr (from rank 0 only, unless every_rank), exit code 2, no
    traceback. every_rank: for what each process finds on its own (a rank 0 that never started)."""
    rank = os.environ.get("RANK", "0")
    if every_rank or not rank.isdigit() or int(rank) == 0:  # a malformed RANK: the one process there is says it
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


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


# ----------------------------------------------------------------------------- provenance

REPO = os.path.dirname(os.path.abspath(__file__))
NOT_A_CHECKOUT = "not a git checkout"
GIT_TIMEOUT_S = 10


def git_state(folder=REPO):
    """(commit, dirty) of the checkout holding ``folder``: dirty when a tracked or unignored file differs from
    the commit. (NOT_A_CHECKOUT, None) outside git, or without a git command."""
    try:
        def git(*cmd):
            return subprocess.run(["git", "-C", folder, *cmd], capture_output=True, text=True, check=True,
                                  timeout=GIT_TIMEOUT_S).stdout.strip()
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return NOT_A_CHECKOUT, None


def now_iso():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def cpu_name():
    """The processor's model name (Linux's /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device, world_size):
    """What produced a result: code, library versions, machine and command, for one session of a run.

    A session is a start or a resume; the caller fills ``ended`` and
    ``wall_seconds`` (per phase) as it goes.
    """
    import torchvision
    commit, dirty = git_state()
    device = torch.device(device)
    names = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device.type == "cuda"
             else [cpu_name()])
    return {"commit": commit, "dirty": dirty, "python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": torchvision.__version__, "numpy": np.__version__, "device": str(device),
            "device_names": names, "device_count": len(names), "world_size": world_size, "host": socket.gethostname(),
            "command": shlex.join([os.path.basename(sys.executable), *sys.argv]), "started": now_iso(),
            "ended": None, "wall_seconds": {}}


# ----------------------------------------------------------------------------- atomic files

# How torch.save's writer words a write the file system refused (it raises RuntimeError, errno lost).
TORCH_WRITE_FAILURES = ("inline_container.cc", "file write failed", "failed writing")


class WriteError(Exception):
    """A file could not be written (disk full, file-size limit, permissions); the message names it. The file
    it was to replace, if any, is untouched."""


def atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file.

    WriteError (one line) when the disk is full or the write fails otherwise; the earlier file stays.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror or e})") from None
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file open()'s usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        torch_write = isinstance(e, RuntimeError) and any(m in str(e) for m in TORCH_WRITE_FAILURES)
        if isinstance(e, OSError) or torch_write:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
            raise WriteError(f"disk full or write refused writing {path} ({why}); the files written before it "
                             f"are kept") from None
        raise


def let_writes_fail():
    """Ignore SIGXFSZ, so that a write past a file-size limit (ulimit -f) fails with EFBIG, which atomic_write
    reports as a WriteError (one line), instead of the signal killing the process mid-run."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path, checkpoint):
    """torch.save(checkpoint) atomically. The caller builds the dict (state_dict, best_val_acc, epoch, config, ...)."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


class CheckpointError(Exception):
    """A checkpoint file cannot be used; the message names the file and what to do."""


def load_checkpoint(path, map_location="cpu", trusted=False):
    """A checkpoint dict, read with weights_only=True: tensors and plain Python values only.

    A pickle that needs anything else could run code when it is loaded: it
    is refused unless ``trusted`` (the scripts' --trust-checkpoint). Missing,
    empty, truncated or foreign files raise CheckpointError too.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the run that wrote it was stopped mid-write "
                              f"by something other than these scripts, or the disk is full")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the weights-only unpickler met a class or function to call
            raise CheckpointError(f"checkpoint {path} holds more than tensors and plain values, so loading it could "
                                  f"run code from the file; pass --trust-checkpoint only if you trust where it came "
                                  f"from") from None
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # the unpickler meets arbitrary bytes: any failure means "not a checkpoint"
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of these scripts (no state_dict)")
    return ckpt


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def finite_or_none(obj):
    """obj with every NaN or infinite float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path, obj):
    """Atomic, strict JSON (NaN and infinities written as null)."""
    text = json.dumps(finite_or_none(obj), indent=2, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------- save-dir lock

class SaveDirLock:
    """<save-dir>/.lock holding 'pid hostname' while a run writes there; a second run is refused.

    A lock whose process is gone (killed, machine rebooted) is stale and is
    taken over. Creating it also proves the folder is writable, before any
    data is loaded.
    """

    def __init__(self, save_dir, flag="--save-dir", holder="run"):
        self.path, self.held, self.created = os.path.join(save_dir, ".lock"), False, False
        self.flag, self.holder = flag, holder  # how messages name the folder and whoever else holds it

    def acquire(self):
        """Take the lock; CheckpointError (one line) when the folder is unusable or another run holds it."""
        folder = os.path.dirname(self.path)
        self.created = not os.path.isdir(folder)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"{self.flag} {folder} cannot be created ({e.strerror or e})") from None
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder_now()
                if holder:
                    raise CheckpointError(f"{self.flag} {folder} is in use by another {self.holder} ({holder}); wait "
                                          f"for it to finish or choose another {self.flag}") from None
                os.unlink(self.path)  # stale: its process is gone
                continue
            except OSError as e:
                raise CheckpointError(f"{self.flag} {folder} is not writable ({e.strerror or e})") from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {socket.gethostname()}\n")
            except OSError as e:  # a full disk, or a file-size limit of 0
                os.unlink(self.path)
                self.remove_if_made_and_empty()
                raise CheckpointError(f"{self.flag} {folder} is not writable ({e.strerror or e})") from None
            self.held = True
            return self
        raise CheckpointError(f"{self.flag} {folder}: could not take {self.path}")

    def holder_now(self):
        """'pid N on HOST' of a live holder, or None for a stale lock."""
        try:
            pid, host = open(self.path).read().split()
            pid = int(pid)
        except (OSError, ValueError):
            return None
        if host != socket.gethostname():
            return f"pid {pid} on {host}; remove {self.path} if that run is over"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, owned by someone else
        return f"pid {pid}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        """Remove the lock, and the folder too when acquire created it and nothing else was written there."""
        if self.held:
            self.held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.remove_if_made_and_empty()

    def remove_if_made_and_empty(self):
        """A run that stopped before writing anything leaves no folder behind (only one acquire made)."""
        folder = os.path.dirname(self.path)
        if self.created and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


# ----------------------------------------------------------------------------- distributed

def distributed_env():
    """(rank, world_size, local_rank) from torchrun's variables; (0, 1, 0) when they are absent.

    ValueError with a one-line message when they are set but make no sense.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    shown = ", ".join(f"{n}={os.environ.get(n)!r}" for n in names if n in os.environ)
    try:
        rank, world_size, local_rank = (int(os.environ.get(n, "0")) for n in names)
    except ValueError:
        raise ValueError(f"{shown}: torchrun's variables must be integers") from None
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"{shown}: RANK and WORLD_SIZE must both be set, with 0 <= RANK < WORLD_SIZE; start "
                         f"multi-process runs with torchrun")
    return rank, world_size, local_rank


def init_distributed(device_type, timeout_s=DIST_TIMEOUT_S):
    """Start the process group when torchrun set RANK/WORLD_SIZE: NCCL on CUDA, Gloo on CPU.

    timeout_s bounds the wait for every process at start-up and at each collective
    afterwards; ValueError (one line) when they do not all arrive in time.
    Returns (rank, world_size, local_rank); with a single process nothing is started.
    """
    rank, world_size, local_rank = distributed_env()
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if world_size > 1 and not os.environ.get(n)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: start multi-process runs "
                         f"with torchrun")
    if world_size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if rank == 0:
            print(f"[ddp] waiting up to {timeout_s:g} s for all {world_size} processes at {where} (--dist-timeout)",
                  flush=True)
        try:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:  # torch's DistStoreError is a RuntimeError
            raise ValueError(f"rank {rank}: the {world_size} processes did not all meet at {where} within "
                             f"{timeout_s:g} s ({' '.join(str(e).split())[:200]}); start multi-process runs with "
                             f"torchrun, which starts every rank") from None
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
