"""Grids of train.py runs: one command for "when does learning the wavelets help?", then analyze.py.

    python sweep.py --out runs/sweep --arm wavelet-two-phase,wavelet-frozen,random-joint \\
        --train-size 0.01,0.05,0.2 --seed 0,1,2 --dataset fashion-mnist --epochs 10 --jobs 2
    python analyze.py --results-dir runs/sweep      # means, std, paired t-tests, data-efficiency plot

Every train.py flag given a comma list is an axis of the grid; every other one is shared by
all cells. --arm sets the experimental arm of a cell (train.ARMS); without it each --init value
is one arm, and random init trains --joint unless the grid says otherwise. Each cell runs
train.py in its own save-dir under --out, named from its arm, its axes and its --train-size and
--seed. A cell is known by its full settings (the config its run recorded), not by its folder's
name: extending a grid (a seed, a size, an arm) reruns nothing that already ran, however the
earlier command was written, and a folder holding a run of other settings (a changed shared
flag) is never taken as done: the sweep refuses before anything runs. A finished cell is
skipped, an interrupted one resumed (--resume), a failing one reported at the end with its log;
Ctrl-C stops every running cell cleanly and the next call carries on.

Slots: --gpus 0,1,2,3 runs one cell per GPU (CUDA_VISIBLE_DEVICES), --gpus 0-3:2 two per GPU;
without GPUs --jobs N runs N cells with the CPU threads split between them.
--print-commands writes one command per line for a cluster's scheduler (a SLURM job array or
GNU parallel); --dry-run lists the cells and how many are done.

--preset literature is the small-data CIFAR-10 protocol (train.PROTOCOL_ARMS x sizes 100, 500, 1000
with their epoch budgets x seeds 0-2; docs/LITERATURE.md); --arm and --seed narrow it, other flags are
shared by every cell (the dataset, its folder), and analyze.py --literature reads it:

    python sweep.py --preset literature --out runs/literature --dataset folder --data-dir data/cifar10-sample
    python analyze.py --results-dir runs/literature --literature
"""
import argparse
import contextlib
import glob
import io
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import runner
import train
from utils import CheckpointError, SaveDirLock, die, format_seconds, write_json

# Where cells run: this machine's slots, or one submitit job each (SLURM, or local processes).
EXECUTORS = ("local", "slurm", "submitit-local")
# A cell's submitit job, recorded in its folder: what a rerun asks the scheduler about.
JOB_RECORD = "job.json"
# DDP ports of submitit jobs (rendezvous_port), away from torchrun's default 29500.
PORT_RANGE = (20000, 29000)
# Seconds between looks at the submitted jobs.
POLL_S = 2.0
# Named in every cell's folder when given, as an axis or not: the flags a grid is most often extended along.
ALWAYS_NAMED = ("--train-size", "--seed")
# Exit code of a sweep stopped by SIGTERM (128 + the signal, as a shell reports it); Ctrl-C is runner's 130.
EXIT_TERMINATED = 128 + signal.SIGTERM
# Named grids (--preset).
PRESETS = ("literature",)
# What a finished run's results JSON holds.
FINAL_KEYS = ("finetune_acc", "joint_acc")
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "train.py")


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="Any other flag goes to train.py; a comma list makes it an axis.")
    parser.add_argument("--out", required=True, help="folder of the cells' save-dirs")
    parser.add_argument("--arm", default=None, help=f"comma list of arms, from {list(train.ARMS)} (with --preset "
                                                     f"literature: from train.PROTOCOL_ARMS)")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="a named grid: literature, the small-data protocol (its arms, sizes, budgets and seeds)")
    parser.add_argument("--gpus", default=None, help="GPU slots: 0,1,2,3 (one cell each) or 0-3:2 (two per GPU)")
    parser.add_argument("--jobs", type=int, default=1, help="without --gpus: cells at a time on the CPU")
    parser.add_argument("--print-commands", action="store_true", help="print the cells' commands, run nothing")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    cluster = parser.add_argument_group("cluster (submitit; pip install -r requirements-optional.txt)")
    cluster.add_argument("--executor", choices=EXECUTORS, default="local",
                         help="local: cells on this machine's slots; slurm: one SLURM job per cell through submitit; "
                              "submitit-local: the same jobs as local processes (a workstation, the tests)")
    cluster.add_argument("--partition", default=None, help="slurm: the partition")
    cluster.add_argument("--nodes", type=int, default=1, help="slurm: nodes per cell")
    cluster.add_argument("--gpus-per-node", type=int, default=0, help="slurm: GPUs per node for each cell")
    cluster.add_argument("--tasks-per-node", type=int, default=None,
                         help="processes per node (DDP ranks); default: one per GPU, else 1")
    cluster.add_argument("--timeout-min", type=int, default=24 * 60, help="slurm: a job's time limit; a job that "
                         "reaches it is requeued and resumes from its last completed epoch")
    cluster.add_argument("--slurm-extra", default=None, help="slurm: more sbatch parameters, key=value,key=value")
    return parser


# ----------------------------------------------------------------------------- the grid

def train_flags():
    """{'--flag': takes_a_value} of every train.py option (aliases included)."""
    flags = {}
    for action in train.get_args_parser()._actions:
        for option in action.option_strings:
            flags[option] = action.nargs != 0
    return flags


def parse_grid(extra):
    """(axes, shared) from train.py flags: axes {'--flag': [values]} for comma lists, shared [argv]."""
    known, axes, shared, i = train_flags(), {}, [], 0
    while i < len(extra):
        flag = extra[i]
        if flag not in known or flag in ("--save-dir", "--resume", "-h", "--help"):
            die(f"sweep.py: {flag!r} is not a train.py flag a sweep can set (see python train.py --help)")
        if not known[flag]:
            shared.append(flag)
            i += 1
            continue
        if i + 1 >= len(extra):
            die(f"sweep.py: {flag} needs a value")
        value = extra[i + 1]
        values = [v for v in value.split(",") if v]
        if "," in value and len(values) > 1:
            axes[flag] = values
        else:
            shared += [flag, value]
        i += 2
    return axes, shared


def cells(axes, shared, arms):
    """[(name, train.py argv, arm)] of the grid: the product of the axes and the arms, in a fixed order."""
    names = list(axes)
    if arms is None and "--init" in axes:
        arms = [f"{init}-{'joint' if init == 'random' else 'two-phase'}" for init in axes.pop("--init")]
        names.remove("--init")
    fixed = {flag: shared[shared.index(flag) + 1] for flag in ALWAYS_NAMED if flag in shared and flag not in names}
    order = [n for n in names if n not in ALWAYS_NAMED] + [f for f in ALWAYS_NAMED if f in names or f in fixed]
    grid = []
    for arm in arms or [None]:
        for values in itertools.product(*(axes[n] for n in names)):
            value_of = {**fixed, **dict(zip(names, values))}
            settings = ([f"arm={arm}"] if arm else []) + [f"{n.lstrip('-')}={value_of[n]}" for n in order]
            # the arm's flags first: a shared flag or axis that contradicts them wins, and checked_config refuses it
            argv = (train.ARMS[arm] if arm else []) + list(shared) + [x for n, v in zip(names, values) for x in (n, v)]
            if not arm and random_init(argv) and "--joint" not in argv and "--joint" not in names:
                argv.append("--joint")  # random init's protocol
            grid.append(("__".join(settings) or "run", argv, arm))
    return grid


def protocol_cells(axes, shared, arms):
    """[(name, train.py argv, None)] of --preset literature: each protocol arm at each size with its budget and
    each seed (train.PROTOCOL_*); ``arms`` and a --seed list narrow it, ``shared`` goes to every cell."""
    unknown = [a for a in arms or [] if a not in train.PROTOCOL_ARMS]
    if unknown:
        die(f"--arm: unknown protocol arm(s) {unknown}; choose from {list(train.PROTOCOL_ARMS)}")
    other = [flag for flag in axes if flag != "--seed"]
    fixed = [flag for flag in ("--train-size", "--epochs", "--head-epochs", "--eval-every") if flag in shared]
    if other or fixed:
        die(f"--preset literature sets {', '.join(other + fixed)} itself (only --seed may narrow it)")
    if "--seed" in shared:  # one seed (no comma): the grid's only seed
        at = shared.index("--seed")
        axes, shared = {**axes, "--seed": [shared[at + 1]]}, shared[:at] + shared[at + 2:]
    grid = []  # size, then seed, then arm: a sweep stopped early has whole paired rows of the smallest sizes
    for size, epochs in train.PROTOCOL_EPOCHS.items():
        budget = ["--train-size", str(size), "--head-epochs", str(epochs // 2), "--epochs", str(epochs - epochs // 2),
                  "--eval-every", str(max(1, epochs // train.PROTOCOL_EVALUATIONS))]
        for seed in axes.get("--seed", train.PROTOCOL_SEEDS):
            for arm in arms or train.PROTOCOL_ARMS:
                argv = [*train.PROTOCOL_SHARED, *train.PROTOCOL_ARMS[arm], *shared, *budget, "--seed", str(seed)]
                grid.append((f"{arm}__train-size={size}__seed={seed}", argv, None))
    return grid


def checked_config(name, argv, arm):
    """The config a cell's train.py argv makes, checked as train.py checks it before loading anything.

    Dies (one line naming the cell, exit 2) on a value train.py would refuse and on shared flags that
    make the cell another arm than its name says, so that no cell runs before every cell is sound.
    """
    parser = train.get_args_parser()
    parser.error = lambda message: die(f"sweep.py: cell {name}: {message}")
    args = parser.parse_args(argv)
    if arm and train.arm_of(vars(args)) != arm:
        die(f"sweep.py: cell {name}: its flags ({shlex.join(argv)}) make a {train.arm_of(vars(args))} run; leave "
            f"--init, --joint and --freeze-extractor to --arm")
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            train.check_flags(args)
            runner.check_common_args(args, args.global_batch_size, 1)
    except SystemExit:
        die(f"sweep.py: cell {name}: {said.getvalue().strip().removeprefix('error: ')}")
    return vars(parser.parse_args(argv))  # as given: the checks fill in defaults the run records as None


def cell_settings(name, argv, arm):
    """(train.run_settings, seed) of the run a cell's train.py argv makes; seed None: train.py draws one."""
    config = checked_config(name, argv, arm)
    return train.run_settings(config), config["seed"]


def recorded_settings(save_dir):
    """(train.run_settings, seed) of the run a folder's newest readable results JSON records, or None."""
    for path in sorted(glob.glob(os.path.join(save_dir, "results_*.json")), reverse=True):
        try:
            with open(path) as f:
                config = json.load(f)["config"]
            return train.run_settings(config), config.get("seed")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def place_cells(grid, out):
    """[(name, save_dir, argv)]: each cell in the folder under ``out`` that holds its run, whatever an earlier
    command named it (the folder of its own name first), else in a new folder of its name.

    Dies, before anything runs, when a cell's flags are bad, when two cells are the same run (a value
    repeated on an axis) or when a cell's name holds a run of other settings.
    """
    folders = sorted(glob.glob(os.path.join(glob.escape(out), "*", "")))
    recorded = {os.path.normpath(f): recorded_settings(f) for f in folders}
    placed, seen = [], {}
    for name, argv, arm in grid:
        settings, seed = cell_settings(name, argv, arm)
        key = json.dumps([settings, seed], sort_keys=True, default=str)
        if key in seen:
            die(f"sweep.py: cell {name} is in the grid twice (a value repeated on an axis)" if seen[key] == name else
                f"sweep.py: cells {seen[key]} and {name} are the same run")
        seen[key] = name
        own = os.path.join(out, name)
        candidates = [own] + [f for f in recorded if f != own]
        home = next((f for f in candidates if recorded.get(f) and recorded[f][0] == settings
                     and (seed is None or recorded[f][1] == seed)), None)
        if home is None and recorded.get(own):
            before, _ = recorded[own]
            changed = ", ".join(f"--{k.replace('_', '-')} {before.get(k)!r} (now {settings.get(k)!r})"
                                for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k))
            die(f"--out {out}: {own} holds a run of other settings ({changed or 'another seed'}): a changed shared "
                f"flag is a new grid; choose another --out")
        placed.append((name, home or own, argv))
    return placed


def random_init(argv):
    return any(a == "--init" and b == "random" for a, b in zip(argv, argv[1:])) or "--random-init" in argv


def state_of(save_dir):
    """'done', 'interrupted' (has a last.pth to resume), 'failed' (diverged) or 'new'.

    A results JSON that cannot be read, or whose "results" is not a mapping, does not make its cell done
    (one warning line).
    """
    for path in glob.glob(os.path.join(save_dir, "results_*.json")):
        try:
            with open(path) as f:
                results = json.load(f)["results"]
        except (OSError, ValueError, KeyError, TypeError):
            results = None
        if not isinstance(results, dict):
            print(f"warning: {path} holds no readable results; its cell is not counted as done", file=sys.stderr)
            continue
        if "diverged" in results:
            return "failed"
        if any(k in results for k in FINAL_KEYS):
            return "done"
    return "interrupted" if glob.glob(os.path.join(save_dir, "*", "last.pth")) else "new"


def command(argv, save_dir, resume, threads=None):
    extra = ["--resume"] if resume else []
    extra += ["--threads", str(threads)] if threads and "--threads" not in argv else []
    return [sys.executable, SCRIPT, *argv, "--save-dir", save_dir, *extra]


# ----------------------------------------------------------------------------- slots

def default_sigint():
    """In a cell's process: SIGINT stops it (stop() relies on it) even when the sweep was started with
    SIGINT ignored, as a shell does for background jobs; Python then turns it into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def parse_gpus(text):
    """['0', '1', ...] of CUDA_VISIBLE_DEVICES values, one per slot: '0,1' or '0-3:2' (two per GPU)."""
    try:
        ids, _, per_gpu = text.partition(":")
        if "-" in ids:
            low, high = (int(x) for x in ids.split("-"))
            ids = [str(g) for g in range(low, high + 1)]
        else:
            ids = [str(int(g)) for g in ids.split(",")]
        per_gpu = int(per_gpu or 1)
    except ValueError:
        die(f"--gpus: expected a list like 0,1,2,3 or a range like 0-3:2, got {text!r}")
    if not ids or per_gpu < 1:
        die(f"--gpus: expected a list like 0,1,2,3 or a range like 0-3:2, got {text!r}")
    return [g for g in ids for _ in range(per_gpu)]


class Sweep:
    """Runs the cells over the slots; prints a progress line whenever one ends."""

    def __init__(self, todo, slots, threads):
        self.todo, self.slots, self.threads = list(todo), slots, threads
        self.running, self.failed, self.done, self.walls = {}, [], 0, []
        self.lock, self.stopping, self.total = threading.Lock(), False, len(todo)

    def run(self):
        workers = [threading.Thread(target=self.worker, args=(slot,)) for slot in self.slots]
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                time.sleep(0.2)
        except KeyboardInterrupt:
            self.stop()
            for w in workers:
                w.join()
            raise

    def worker(self, slot):
        while True:
            with self.lock:
                if self.stopping or not self.todo:
                    return
                name, save_dir, resume, argv = self.todo.pop(0)
                self.running[name] = None
            try:
                self.run_cell(slot, name, save_dir, resume, argv)
            except OSError as e:  # the cell's folder or log cannot be written: the cell fails, the sweep goes on
                with self.lock:
                    self.running.pop(name, None)
                    self.failed.append((name, f"{e.strerror or e} writing {e.filename or save_dir}", None))
                    self.progress()

    def run_cell(self, slot, name, save_dir, resume, argv):
        os.makedirs(save_dir, exist_ok=True)
        env = dict(os.environ)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        log_path, start = os.path.join(save_dir, "train.log"), time.perf_counter()
        with open(log_path, "a") as log:
            proc = subprocess.Popen(command(argv, save_dir, resume, self.threads), stdout=log,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                    preexec_fn=default_sigint)
            with self.lock:
                self.running[name] = proc
            code = proc.wait()
        with self.lock:
            del self.running[name]
            if code == 0:
                self.done += 1
                self.walls.append(time.perf_counter() - start)
            elif not self.stopping:
                self.failed.append((name, f"exit code {code}", log_path))
            self.progress()

    def progress(self):
        left = len(self.todo)
        eta = ""
        if self.walls and (left or self.running):
            per_slot = sum(self.walls) / len(self.walls) / len(self.slots)
            eta = f", ETA {format_seconds(per_slot * (left + len(self.running)))}"
        print(f"[sweep] done {self.done} / running {len(self.running)} / failed {len(self.failed)} / left {left}{eta}",
              flush=True)

    def stop(self):
        """Ctrl-C or SIGTERM: every running cell gets SIGINT and saves its last epoch (train.py exits 130)."""
        with self.lock:
            self.stopping = True
            for proc in self.running.values():
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGINT)


# ----------------------------------------------------------------------------- submitit executors

class CellJob:
    """A cell as a submitit job: train.py in a subprocess, resumed from its last epoch when one is saved.

    Each of the job's tasks (nodes x tasks per node) is one DDP rank: its RANK, WORLD_SIZE,
    LOCAL_RANK and rendezvous address come from submitit's JobEnvironment, as torchrun would set
    them. Whether to resume is decided when the job starts, so a job that SLURM preempts or times
    out (``checkpoint``: requeued with the same callable) continues where it stopped.
    """

    def __init__(self, argv, save_dir):
        self.argv, self.save_dir = argv, save_dir

    def __call__(self):
        import submitit
        cmd = command(self.argv, self.save_dir, state_of(self.save_dir) == "interrupted")
        env, job = dict(os.environ), submitit.JobEnvironment()
        if job.num_tasks > 1:
            env.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank),
                       MASTER_ADDR=job.hostnames[0], MASTER_PORT=str(rendezvous_port(job.job_id)))
        with open(os.path.join(self.save_dir, "train.log"), "a") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code:
            raise RuntimeError(f"train.py exited with code {code}; log: {os.path.join(self.save_dir, 'train.log')}")
        return code

    def checkpoint(self):
        import submitit
        return submitit.helpers.DelayedSubmission(self)


def rendezvous_port(job_id):
    """A job's DDP port, from its id, in PORT_RANGE: jobs sharing a node do not collide (unless ids do)."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return PORT_RANGE[0] + int(digits) % (PORT_RANGE[1] - PORT_RANGE[0])


def require_submitit(executor):
    try:
        import submitit
    except ImportError:
        die(f"--executor {executor} needs the submitit package: pip install -r requirements-optional.txt")
    return submitit


def submitit_executor(args, save_dir):
    """A submitit executor writing its files into <cell>/submitit."""
    submitit = require_submitit(args.executor)
    folder = os.path.join(save_dir, "submitit")
    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    if args.executor == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=args.timeout_min, tasks_per_node=tasks)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    extra = dict(kv.split("=", 1) for kv in args.slurm_extra.split(",")) if args.slurm_extra else {}
    executor.update_parameters(timeout_min=args.timeout_min, slurm_partition=args.partition, nodes=args.nodes,
                               gpus_per_node=args.gpus_per_node, tasks_per_node=tasks, slurm_additional_parameters=extra)
    return executor


def job_running(save_dir, executor):
    """Whether the job recorded in a cell's folder is still queued or running (asked of the scheduler)."""
    try:
        with open(os.path.join(save_dir, JOB_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    if record.get("executor") != executor:
        return False
    if executor == "submitit-local":  # the job is a local process: its id is its pid
        try:
            os.kill(int(record["job_id"]), 0)
            return True
        except (ProcessLookupError, ValueError, KeyError):
            return False
    import submitit
    state = submitit.SlurmJob(folder=os.path.join(save_dir, "submitit"), job_id=str(record["job_id"])).state
    return state in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")


def run_submitit(args, todo):
    """Submit each pending cell (or wait for its job already in the queue), then wait for them all.

    Returns [(name, why, log)] of the cells that did not finish.
    """
    jobs, waited = {}, []
    for name, save_dir, _, argv in todo:
        if job_running(save_dir, args.executor):
            print(f"[sweep] {name}: its job is still queued or running; waiting for it", flush=True)
            waited.append((name, save_dir))
            continue
        os.makedirs(save_dir, exist_ok=True)
        import sweep as importable  # the job is unpickled in another process: its class must not be __main__'s
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
        job = submitit_executor(args, save_dir).submit(importable.CellJob(argv, save_dir))
        record = {"executor": args.executor, "job_id": job.job_id, "stdout": str(job.paths.stdout),
                  "stderr": str(job.paths.stderr), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(os.path.join(save_dir, JOB_RECORD), record)
        print(f"[sweep] {name}: job {job.job_id} (log {job.paths.stdout})", flush=True)
        jobs[name] = (job, save_dir)
    while any(not job.done() for job, _ in jobs.values()) or any(job_running(d, args.executor) for _, d in waited):
        time.sleep(POLL_S)
    failed = []
    for name, save_dir in [(n, d) for n, (_, d) in jobs.items()] + waited:
        if state_of(save_dir) != "done":
            failed.append((name, f"job state {state_of(save_dir)}", os.path.join(save_dir, "train.log")))
    print(f"[sweep] done {len(jobs) + len(waited) - len(failed)} / failed {len(failed)}", flush=True)
    return failed


# ----------------------------------------------------------------------------- main

def main(args, extra):
    axes, shared = parse_grid(extra)
    arms = args.arm.split(",") if args.arm else None
    unknown = [a for a in arms or [] if a not in train.ARMS]
    if unknown and not args.preset:
        die(f"--arm: unknown arm(s) {unknown}; choose from {list(train.ARMS)}")
    if args.jobs < 1:
        die(f"--jobs must be >= 1, got {args.jobs}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        die(f"--out {args.out} is a file, not a folder")
    grid = place_cells(protocol_cells(axes, shared, arms) if args.preset else cells(axes, shared, arms), args.out)
    states = {name: state_of(save_dir) for name, save_dir, _ in grid}
    if args.print_commands:
        for name, save_dir, argv in grid:
            print(shlex.join(command(argv, save_dir, states[name] == "interrupted")))
        return 0
    if args.dry_run:
        for name, save_dir, _ in grid:
            elsewhere = os.path.normpath(save_dir) != os.path.normpath(os.path.join(args.out, name))
            print(f"{states[name]:<12} {name}" + (f" (its run is in {save_dir})" if elsewhere else ""))
        print(f"{sum(s == 'done' for s in states.values())} of {len(grid)} cells done")
        return 0
    slots = parse_gpus(args.gpus) if args.gpus is not None else [None] * args.jobs
    threads = None if args.gpus is not None else max(1, (os.cpu_count() or 1) // args.jobs)
    todo = [(name, save_dir, states[name] == "interrupted", argv) for name, save_dir, argv in grid
            if states[name] in ("new", "interrupted")]
    where = f"{len(slots)} slot(s)" if args.executor == "local" else f"{args.executor} jobs"
    print(f"[sweep] {len(grid)} cells, {len(grid) - len(todo)} already done, {len(todo)} to run on {where} under "
          f"{args.out}", flush=True)
    if args.executor != "local":
        require_submitit(args.executor)  # a missing package: one line before anything is written
        if args.nodes < 1 or (args.tasks_per_node or 1) < 1 or args.gpus_per_node < 0:
            die("--nodes and --tasks-per-node must be >= 1 and --gpus-per-node >= 0")
        if args.executor == "submitit-local" and args.nodes > 1:
            die("--executor submitit-local runs on this machine: --nodes must be 1")
    sweep = Sweep(todo, slots, threads)
    lock = SaveDirLock(args.out, "--out", "sweep")  # also proves --out can be written, before any cell starts
    try:
        lock.acquire()
    except CheckpointError as e:
        die(e)
    with lock:
        if args.executor != "local":
            try:
                failed = run_submitit(args, todo)
            except KeyboardInterrupt as e:
                print(f"[sweep] {stop_reason(e)} while waiting: the submitted jobs go on; run the same command to "
                      f"wait for them again", file=sys.stderr, flush=True)
                return stop_code(e)
            for name, why, log_path in failed:
                print(f"[sweep] failed: {name} ({why}); log: {log_path}", file=sys.stderr)
            return 1 if failed else 0
        try:
            sweep.run()
        except KeyboardInterrupt as e:
            print(f"[sweep] {stop_reason(e)}: the running cells saved their last epoch; run the same command to "
                  f"carry on", file=sys.stderr, flush=True)
            return stop_code(e)
    diverged = [(name, f"exit code {runner.EXIT_DIVERGED}", os.path.join(save_dir, "train.log"))
                for name, save_dir, _ in grid if states[name] == "failed"]
    for name, why, log_path in diverged + sweep.failed:
        print(f"[sweep] failed: {name} ({why})" + (f"; log: {log_path}" if log_path else ""), file=sys.stderr)
    return 1 if diverged or sweep.failed else 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler ending the job): stops the sweep as Ctrl-C does."""


def terminate(signum, frame):
    raise Terminated


def stop_reason(interrupt):
    return "stopped (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted (Ctrl-C)"


def stop_code(interrupt):
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else runner.EXIT_INTERRUPTED


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, terminate)
    try:
        parsed, rest = get_args_parser().parse_known_args()
        sys.exit(main(parsed, rest))
    except KeyboardInterrupt as stopped:  # before any cell started
        print(f"[sweep] {stop_reason(stopped)} before any cell started", file=sys.stderr)
        sys.exit(stop_code(stopped))
