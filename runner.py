"""The run machinery every script shares: set-up, run state, checkpoints and resume, the epoch loop.

    from runner import setup, run_phase        # train.py, quick_check.py, benchmark.py and sweep.py build on it

train.py holds the experiment (Phase A, Phase B, joint training) and its
command line; this module holds what any run needs: the shared flags
(dataset, selection, runtime), the processes, device and data (``setup`` ->
``RunEnv``), the run's state and its checkpoints (``RunState``,
``load_run_state``, ``save_epoch``; a resumed run ends where the
uninterrupted one would), one phase's epochs with model selection
(``run_phase``), and the script entry point (``run_script``). It never
imports train.py: the flag defaults a comparison needs are handed in.
"""
import argparse
import gc
import importlib.util
import math
import os
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

import data
from engine import EarlyStopping, NonFiniteLoss, evaluate, train_one_epoch
from scattering_net import TRAINING_BYTES_PER_PARAM, ModelConfig, ScatteringNet, count_parameters, describe_plan
from spatial_scattering import keep_freed_memory
from utils import (DIST_TIMEOUT_S, CheckpointError, SaveDirLock, WriteError, barrier, broadcast_object,
                   cleanup_distributed, device_memory_bytes, die, distributed_env, init_distributed, is_main_process,
                   let_writes_fail, load_checkpoint, main_print, now_iso, provenance,
                   save_checkpoint, seed_everything, write_json)

PHASES = ("phase_a", "phase_b")
TRAINING_DEVICES = ("cpu", "cuda", "mps")
# What a last.pth must hold to be resumed from (save_epoch writes them).
LAST_KEYS = ("state_dict", "phase", "epoch", "config", "optimizer", "scheduler", "early_stopping", "rng", "finished",
             "results", "curves_all", "json_path")
JOINT = "joint"
# Model selection (--select): which data choose the epoch a phase reports. val: a split held out of the
# training pool; last: the final epoch (fixed budget); test: the best test epoch (optimistic).
SELECT_RULES = ("val", "last", "test")
DEFAULT_SELECT = "val"
# The value of a flag in a run recorded before the flag existed, where it is not the parser's default:
# every run before --select chose its epochs on the test split.
LEGACY_FLAGS = {"select": "test"}
# Values a flag took before it changed type: --augment was on/off (--no-augment) before its choices existed.
LEGACY_VALUES = {"augment": {True: "crop-flip", False: "none"}}
# A resumed or branched run that leaves one of these flags out takes the saved run's value.
INHERITED_FLAGS = ("seed", "select", "val_size")
# Per-epoch keys of a run recorded before --select: its val_* columns were measured on the test split.
LEGACY_CURVE_KEYS = {"val_loss": "test_loss", "val_acc": "test_acc", "val_top5": "test_top5"}
# Config keys that say how or where a run was executed, not what it computed: left out when runs are compared
# (analyze.py pairs and groups runs that differ only in these; sweep.py finds a cell's run in any folder).
# RUNTIME_FLAGS may change on --resume; RUN_KEYS adds where the run and its data lie, and its seed.
RUNTIME_FLAGS = ("resume", "print_freq", "workers", "device", "threads", "compile", "trust_checkpoint", "dist_timeout",
                 "tensorboard")
RUN_KEYS = (*RUNTIME_FLAGS, "seed", "save_dir", "data_dir", "fast_path", "from_phase_a")
# --tensorboard: the event files' folder inside --save-dir, and how often block 0's filters are drawn (epochs).
TENSORBOARD_DIR = "tensorboard"
FILTER_IMAGE_EVERY = 5
# --optimizer: AdamW or SGD; SGD's momentum is the WRN paper's (and torchvision's CIFAR and ImageNet recipes').
OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9
# A warm-up as long as its phase never reaches the cosine: it is clamped to this share of the phase.
WARMUP_MAX_SHARE = 1 / 3
# Exit code of a run stopped by a NaN or infinite loss (README.md, "Failures and recovery").
EXIT_DIVERGED = 3
# Exit code after Ctrl-C (SIGINT): 128 + 2, as shells report a process killed by SIGINT.
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------- command line


def add_data_args(parser, default_dataset="cifar10"):
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset", default=default_dataset, choices=data.DATASETS)
    group.add_argument("--data-dir", default="./data", help="root folder (ImageNet: parent of train/ and val/)")
    group.add_argument("--train-size", default=None,
                       help="stratified subset: a fraction of the training pool (0.1) or a count (5000), drawn "
                            "after the held-out split; 1.0 or none: every image not held out")
    group.add_argument("--image-size", type=int, default=None,
                       help="--dataset folder: resize + centre-crop every image to this size; default: the first "
                            "training image's")
    group.add_argument("--augment", choices=data.AUGMENTATIONS, default=data.AUGMENTATIONS[0],
                       help="the training augmentation: crop-flip, the random crop and flip (where the dataset has "
                            "it); autoaugment, those then AutoAugment's CIFAR-10 policy per image; none (in-memory "
                            "datasets)")
    group.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                       help="the same as --augment none")
    selection = parser.add_argument_group("model selection")
    selection.add_argument("--select", choices=SELECT_RULES, default=None,
                           help="the epoch each phase reports (test accuracy) and keeps as best.pth: val, the best "
                                "epoch on a split held out of the training pool (early stopping on it); last, the "
                                "final epoch (no early stopping); test, the best test epoch (optimistic: how runs "
                                f"were selected before this flag). Default: {DEFAULT_SELECT}; a resumed run keeps its own")
    selection.add_argument("--eval-every", type=int, default=1, metavar="N",
                           help="evaluate (held-out and test splits) every N epochs and at a phase's last: long "
                                "fixed budgets on small training sets, where evaluating would cost more than "
                                "training; early stopping's --patience then counts evaluations")
    selection.add_argument("--val-size", default=None,
                           help="--select val: images held out of the training pool, a fraction (0.1) or a count "
                                f"(5000), class-stratified; default: {data.HOLDOUT_SHARE:.0%} of the pool, at most "
                                f"{data.HOLDOUT_MAX:,}")


def add_runtime_args(parser):
    group = parser.add_argument_group("runtime and speed")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default: cuda when available")
    group.add_argument("--workers", type=int, default=4, help="DataLoader worker processes (DataLoader path)")
    group.add_argument("--fast-path", action=argparse.BooleanOptionalAction, default=None,
                       help="keep the dataset on the device and augment there; default: on for in-memory sets")
    group.add_argument("--amp", action="store_true", help="bf16 autocast")
    group.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--threads", type=int, default=None, help="CPU threads for torch; default: torch's choice")
    group.add_argument("--seed", type=int, default=None, help="random seed; default: drawn at random and recorded")
    group.add_argument("--save-dir", default="runs", help="checkpoints and JSON results")
    group.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_S,
                       help="under torchrun: seconds the processes wait for each other, at start-up and at each "
                            "collective, before the run stops with an error")
    group.add_argument("--print-freq", type=int, default=50, help="progress line every N batches (0: off)")
    group.add_argument("--tensorboard", action="store_true",
                       help=f"also write per-epoch curves, filter movement, block 0's filters and the config as "
                            f"TensorBoard events into <save-dir>/{TENSORBOARD_DIR} (needs the tensorboard package)")


def check_common_args(args, batch_size, world_size):
    """Everything that can be wrong with the shared flags, before anything is loaded or written."""
    positive = {"--epochs": args.epochs, "--patience": args.patience, "--L": args.L, "--eval-every": args.eval_every}
    if args.n_blocks < (0 if args.head == "cnn" else 1):  # 0: the CNN head alone on the image
        die(f"--n-blocks must be >= 1 (or 0 with --head cnn: the CNN alone), got {args.n_blocks}")
    positive.update({flag: value for flag, value in (("--head-epochs", getattr(args, "head_epochs", None)),
                                                     ("--image-size", args.image_size)) if value is not None})
    for flag, value in positive.items():
        if value < 1:
            die(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--workers", args.workers), ("--print-freq", args.print_freq)):
        if value < 0:
            die(f"{flag} must be >= 0, got {value}")
    if args.seed is not None and args.seed < 0:
        die(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        die(f"--threads must be >= 1, got {args.threads}")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        die("--tensorboard needs the tensorboard package: pip install -r requirements-optional.txt")
    if not 0 < args.dist_timeout < math.inf:
        die(f"--dist-timeout must be a finite number of seconds > 0, got {args.dist_timeout}")
    for flag, value in (("--weight-decay", args.weight_decay), ("--l2-sp", getattr(args, "l2_sp", 0.0)),
                        ("--warmup-epochs", getattr(args, "warmup_epochs", 0.0))):
        if not value >= 0 or value == float("inf"):  # NaN fails every comparison
            die(f"{flag} must be a finite number >= 0, got {value}")
    if batch_size < 1 or batch_size % world_size:
        die(f"the batch size {batch_size} must be a positive multiple of the number of processes ({world_size})")
    args.select = args.select or DEFAULT_SELECT
    try:
        args.train_size = data.parse_size(args.train_size)
        args.val_size = data.parse_size(args.val_size, "--val-size")
    except data.DatasetError as e:
        die(e)
    if args.val_size is not None and args.select != "val":
        die(f"--val-size is for --select val: --select {args.select} holds no images out")
    try:
        return count_parameters(ModelConfig.from_args(args, data.dataset_info(args.dataset, args.data_dir,
                                                                               args.image_size)))
    except (ValueError, data.DatasetError) as e:
        die(e)


def check_fits(plan, device):
    """Stop before allocating a model whose weights and optimizer state alone exceed the device's memory."""
    need, have = plan["n_params_total"] * TRAINING_BYTES_PER_PARAM, device_memory_bytes(device)
    if need > have:
        for line in describe_plan(plan):
            main_print("  " + line)
        die(f"the model has {plan['n_params_total']:,} parameters: {need / 2 ** 30:,.1f} GiB for weights, gradients "
            f"and AdamW state, more than the {have / 2 ** 30:,.1f} GiB of {device}; --mixing-horizon, "
            f"--global-avg-pool and --lowpass-last make it smaller (docs/DESIGN.md, \"Fitting 5-6 blocks\")")


# ----------------------------------------------------------------------------- set-up


def pick_device(requested, local_rank):
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        die(f"--device: unknown device {requested!r}")
    if device.type not in TRAINING_DEVICES:
        die(f"--device {requested}: not a device to train on; choose cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        die(f"--device {requested}: MPS (Apple GPU) is not available on this machine")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            die(f"--device {requested}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        elif device.index >= torch.cuda.device_count():
            die(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass
class RunEnv:
    """What ``setup`` built for a run: its processes, device, seed, data and --save-dir lock."""
    rank: int
    world_size: int
    device: torch.device
    seed: int
    data: data.Loaders
    lock: SaveDirLock = None  # held by rank 0 when setup locked --save-dir: ``with env.lock:`` around the run
    tensorboard: Optional["TensorBoardLog"] = None  # rank 0 under --tensorboard


def setup(args, batch_size, lock_save_dir=True):
    """Check the flags, lock --save-dir, start the processes, seed, and build the loaders (data.Loaders).

    Returns a RunEnv whose lock (a SaveDirLock) rank 0 holds when
    lock_save_dir: use ``with env.lock:`` around the run to release it.
    """
    try:
        rank, world_size, local_rank = distributed_env()
    except ValueError as e:
        die(e)
    plan = check_common_args(args, batch_size, world_size)
    device = pick_device(args.device, local_rank)
    check_fits(plan, device)
    lock = SaveDirLock(args.save_dir)
    if rank == 0 and lock_save_dir:
        try:
            lock.acquire()
        except CheckpointError as e:
            die(e)
    with ExitStack() as on_error:
        on_error.callback(lock.release)
        env = start(args, batch_size, device, rank, world_size)
        on_error.pop_all()
    env.lock = lock
    if args.tensorboard and rank == 0:
        env.tensorboard = TensorBoardLog(args.save_dir, vars(args))
    return env


class TensorBoardLog:
    """--tensorboard: the run as TensorBoard events in <save-dir>/tensorboard (rank 0 only).

    Per epoch, under "<phase>/": every number of the epoch's curves row (the same values as the
    results JSON), each block's filter movement from its Morlet init (relative L2), and every
    FILTER_IMAGE_EVERY epochs block 0's real wavelets as images; the config once, as text. A
    resumed run appends to the same folder; steps are epochs.
    """

    def __init__(self, save_dir, config):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(save_dir, TENSORBOARD_DIR))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in sorted(config.items())))
        self.writer.flush()

    def epoch(self, phase, model, row):
        step = row["epoch"]
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{phase}/{key}", value, step)
        for j, moved in enumerate(model.filter_movement()):
            self.writer.add_scalar(f"{phase}/filter_movement_block{j}", moved["relative_l2"], step)
        # None: a low-pass-only block, or no block at all (the CNN alone)
        psi_real = model.blocks[0].filter_convs().get("psi_real") if len(model.blocks) else None
        if psi_real is not None and (step == 1 or step % FILTER_IMAGE_EVERY == 0):
            psi = psi_real.weight.detach().float().cpu().flatten(0, 1).unsqueeze(1)  # (out, in/g, K, K) -> (n, 1, K, K)
            low, high = psi.amin(dim=(1, 2, 3), keepdim=True), psi.amax(dim=(1, 2, 3), keepdim=True)
            self.writer.add_images(f"{phase}/block0_psi_real", (psi - low) / (high - low).clamp_min(1e-12), step)
        self.writer.flush()


def start(args, batch_size, device, rank, world_size):
    """Start the process group, seed, load the data."""
    try:
        init_distributed(device.type, args.dist_timeout)
    except ValueError as e:
        die(e, every_rank=True)  # each rank says it: the one that is missing may be rank 0
    if device.type == "cpu":
        keep_freed_memory()  # before the data too (the CNN alone has no ScatteringBlock to set it)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed = broadcast_object(args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31))
    seed_everything(seed + rank)
    try:
        loaders = data.build_loaders(args.dataset, args.data_dir, args.train_size, batch_size // world_size, device,
                                     args.fast_path, args.workers, seed, rank, world_size, args.augment,
                                     args.image_size, holdout=args.select == "val", val_size=args.val_size)
    except data.DatasetError as e:
        die(data.error_line(e))
    return RunEnv(rank, world_size, device, seed, loaders)


def build_model(config, seed, device, channels_last=False):
    """A ScatteringNet of a ModelConfig on ``device``; ``seed`` fixes the classifier's init (the filters are Morlet)."""
    torch.manual_seed(seed)
    model = ScatteringNet(config)
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)


def wrap_model(model, device, world_size, compile_model):
    """The module the loop calls: DDP under torchrun, DataParallel on several GPUs, else the model itself.

    Build it anew whenever requires_grad changes: DDP synchronises only the
    parameters that required grad when it was constructed.
    """
    runner = model
    if world_size > 1:
        runner = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif device.type == "cuda" and torch.cuda.device_count() > 1:
        runner = nn.DataParallel(model)
    # dynamic=False: the last, smaller batch of an epoch gets its own static graph (inductor fails on this
    # model with symbolic sizes, e.g. "cannot determine truth value of Relational: 96*((s0//2)) < 96")
    return torch.compile(runner, dynamic=False) if compile_model else runner


def describe_run(env, model, mode):
    loaders = env.data
    info = loaders.info
    loader = "in-memory fast path" if isinstance(loaders.train, data.TensorLoader) else "DataLoader"
    held_out = f"{loaders.n_val:,} held out for --select val, " if loaders.val is not None else ""
    main_print(f"{mode}: {info.name} ({loaders.n_train:,} training images, {held_out}{loaders.n_test:,} test; "
               f"{info.in_channels}x{info.spatial}x{info.spatial}), {loader}, device {env.device}, "
               f"{env.world_size} process(es), seed {env.seed}")
    for line in model.describe():
        main_print("  " + line)


# ----------------------------------------------------------------------------- checkpoints and run state


def rng_state():
    """Every random generator's state as plain lists and tensors (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(model, model_state, phase, epoch, best_val_acc, run_config, training=None, provenance=None):
    """The one place the checkpoint dict is built; loadable as README.md's Python API shows.

    run_config: the run's flags (``config``, compared on --resume); the
    model's ModelConfig goes under ``model_config`` (None for another model,
    e.g. benchmark.py's kymatio network). best_val_acc: the selected epoch's
    held-out accuracy (--select val), else its test accuracy. training: the
    optimizer, scheduler, early-stopping and run-state fields of a last.pth.
    provenance: the run's sessions (utils.provenance), newest last.
    """
    config = getattr(model, "config", None)
    return {"state_dict": model_state, "phase": phase, "epoch": epoch, "best_val_acc": best_val_acc,
            "config": run_config, "model_config": asdict(config) if isinstance(config, ModelConfig) else None,
            "rng": rng_state(), "provenance": provenance or [], **(training or {})}


def cpu_state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class RunState:
    """What a run has recorded so far, fresh or resumed: built once by ``load_run_state``.

    ``save()`` writes the results JSON (docs/DESIGN.md, "The experiment pipeline"):
    ``config``, ``results``, ``curves``, and ``provenance``: one entry per
    session (the start and each resume) saying what code, libraries,
    machine and command ran it. ``resume`` is the last.pth the run
    continues from (None for a fresh run); ``start_phase`` the phase it
    continues in; ``legacy``: it was started before --select existed (its
    epochs are chosen on test and its warm-up is never clamped, as when it
    began). json_path None: no JSON (quick_check.py).
    """
    config: dict
    json_path: Optional[str]
    curves: dict
    results: dict = field(default_factory=dict)
    start_phase: str = PHASES[0]
    resume: Optional[dict] = None
    provenance: list = field(default_factory=list)
    legacy: bool = False

    def begin_session(self, device, world_size):
        """Record this session's provenance; warn when the code changed since the run's previous session."""
        session = provenance(device, world_size)
        if self.provenance and self.provenance[-1].get("commit") != session["commit"]:
            main_print(f"warning: this run was started by commit {self.provenance[-1].get('commit')} and continues "
                       f"with {session['commit']}: its provenance records both", file=sys.stderr)
        self.provenance.append(session)

    def add_wall_time(self, phase, seconds):
        session = self.provenance[-1]
        session["wall_seconds"][phase] = session["wall_seconds"].get(phase, 0.0) + seconds
        session["ended"] = now_iso()

    def save(self):
        if self.json_path and is_main_process():
            write_json(self.json_path, {"config": self.config, "results": self.results, "curves": self.curves,
                                        "provenance": self.provenance})

    def resume_point(self, phase):
        """The last.pth to continue ``phase`` from, or None when the phase starts afresh."""
        return self.resume if self.resume and self.resume["phase"] == phase else None

    def checkpoint_fields(self):
        return {"results": self.results, "curves_all": self.curves, "json_path": self.json_path}


def legacy_curves(config, curves):
    """A run's per-epoch curves with today's keys: a run recorded before --select named its test columns val_*."""
    if "select" in config:
        return curves
    return {phase: [{LEGACY_CURVE_KEYS.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row
                    for row in rows] for phase, rows in curves.items()}


def inherit_flags(args, saved):
    """A resumed or branched run takes the saved run's value of each INHERITED_FLAGS flag it left out."""
    for name in INHERITED_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name, LEGACY_FLAGS.get(name)))


def read_checkpoint(path, args):
    """load_checkpoint (weights_only unless --trust-checkpoint), or one line and exit 2 if the file is unusable."""
    try:
        return load_checkpoint(path, trusted=args.trust_checkpoint)
    except CheckpointError as e:
        die(e)


def find_last_checkpoint(args):
    """The newest last.pth in --save-dir to continue from (None for a fresh run); dies on an unusable save-dir."""
    save_dir, resume = args.save_dir, args.resume
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        die(f"--save-dir {save_dir} is a file, not a folder")
    lasts = {p: os.path.join(save_dir, p, "last.pth") for p in (*PHASES, JOINT)}
    existing = [p for p in lasts if os.path.isfile(lasts[p])]
    if not resume:
        if existing:
            die(f"{lasts[existing[0]]} already exists: pass --resume to continue that run, or choose another "
                f"--save-dir (nothing was overwritten)")
        return None
    if not existing:
        die(f"--resume: no checkpoint to continue in {save_dir} (looked for {', '.join(lasts.values())})")
    last = read_checkpoint(lasts[existing[-1]], args)
    missing = [k for k in LAST_KEYS if k not in last]
    if missing:
        die(f"--resume: {lasts[existing[-1]]} is not a last.pth written by train.py (no {', '.join(missing)})")
    return last


def saved_value(config, key, defaults):
    """A flag's value in a recorded config, read as today's parser would have it: a flag the run lacks at its
    LEGACY_FLAGS value, else its default; an older spelling of a value (LEGACY_VALUES) translated."""
    value = config.get(key, LEGACY_FLAGS.get(key, defaults.get(key)))
    legacy = LEGACY_VALUES.get(key, {})
    return legacy[value] if isinstance(value, bool) and value in legacy else value


def run_settings(config, defaults):
    """What a run computes, from its recorded config or a command's parsed flags, comparable across both.

    defaults: {flag: default} of the script's parser. A flag the config
    lacks (newer than the run) counts at its LEGACY_FLAGS value, else its
    default; flags resolved at start (--select, --head-epochs, the sizes)
    are resolved the same way; RUN_KEYS left out.
    """
    settings = {k: saved_value(config, k, defaults) for k in {**defaults, **config}}
    settings["select"] = settings["select"] or DEFAULT_SELECT
    settings["head_epochs"] = settings["head_epochs"] or settings["epochs"]
    for key, flag in (("train_size", "--train-size"), ("val_size", "--val-size")):
        try:
            settings[key] = data.parse_size(settings[key], flag)
        except data.DatasetError:
            pass  # compared as written; train.py refuses it when the run starts
    return {k: v for k, v in sorted(settings.items()) if k not in RUN_KEYS}


def check_same_flags(saved, args, what, defaults, ignored=()):
    """Flags that change the experiment must match the saved run's (a left-out --seed was taken from it).

    what: the start of the one-line error, e.g. "--resume: these flags differ from the interrupted run".
    defaults: {flag: default} of the script's parser; ignored: more flags than RUNTIME_FLAGS to leave out.
    """
    ignored = {*RUNTIME_FLAGS, *ignored}
    current = vars(args)
    # a flag newer than the run: its legacy value, else its default
    saved = {k: saved_value(saved, k, defaults) for k in current}
    differ = [k for k in current if k not in ignored and saved[k] != current[k]]
    if differ:
        die(f"{what}: " + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} (now {current[k]!r})" for k in differ))


def new_json_path(save_dir):
    return os.path.join(save_dir, f"results_{time.strftime('%Y%m%d-%H%M%S')}.json")


def load_run_state(args, seed, last, defaults):
    """The run's state: fresh (last None), or continued from ``last``, the newest last.pth in --save-dir.

    A finished phase's last.pth means: start the next phase afresh, with the
    results and curves that checkpoint carries. Sets args.seed to the run's seed.
    """
    phases = (JOINT,) if args.joint else PHASES
    if last is None:
        args.seed = seed
        return RunState(vars(args), new_json_path(args.save_dir), {p: [] for p in phases}, start_phase=phases[0])
    # --save-dir is where the run is now: the same folder written otherwise (run/, ./run) or a moved one
    check_same_flags(last["config"], args, "--resume: these flags differ from the interrupted run", defaults,
                     ("save_dir",))
    args.seed = last["config"]["seed"]
    start = phases[phases.index(last["phase"]) + 1] if last["finished"] and last["phase"] != phases[-1] \
        else last["phase"]
    json_path = last["json_path"] and os.path.join(args.save_dir, os.path.basename(last["json_path"]))
    return RunState(vars(args), json_path, legacy_curves(last["config"], last["curves_all"]),
                    last["results"], start, last, list(last.get("provenance") or []),
                    legacy="select" not in last["config"])


def save_epoch(state, ckpt_dir, phase, epoch, model, model_state, stopper, improved, optimizer, scheduler):
    """Persist one epoch: best.pth when it improved, last.pth (everything to resume), the results JSON.

    model_state: the epoch's cpu_state(model), taken once for both checkpoints.
    """
    if not is_main_process():
        return
    if improved:
        save_checkpoint(os.path.join(ckpt_dir, "best.pth"),
                        make_checkpoint(model, model_state, phase, epoch, stopper.best, state.config,
                                        provenance=state.provenance))
    training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "early_stopping": stopper.state_dict(), "finished": False, **state.checkpoint_fields()}
    save_checkpoint(os.path.join(ckpt_dir, "last.pth"),
                    make_checkpoint(model, model_state, phase, epoch, stopper.best, state.config, training,
                                    state.provenance))
    state.save()


def finish_phase(state, ckpt_dir):
    """Mark a phase's last.pth finished, carrying the results the phase produced; write the results JSON."""
    if is_main_process():
        path = os.path.join(ckpt_dir, "last.pth")
        save_checkpoint(path, {**load_checkpoint(path), "finished": True, "provenance": state.provenance,
                               **state.checkpoint_fields()})
        state.save()
    barrier()


# ----------------------------------------------------------------------------- the epoch loop


def make_optimizer(kind, groups, weight_decay):
    """--optimizer over param groups that each carry their lr (a group's own weight_decay wins over the default).

    'adamw': AdamW (Loshchilov & Hutter, ICLR 2019), every arm's default. 'sgd': SGD with Nesterov momentum
    SGD_MOMENTUM, what wide residual networks are trained with (Zagoruyko & Komodakis, BMVC 2016).
    """
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=SGD_MOMENTUM, nesterov=True,
                               weight_decay=weight_decay)
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def warmup_cosine(optimizer, steps_per_epoch, epochs, warmup_epochs=0.0):
    """Per-step schedule: every lr rises linearly from 0 over ``warmup_epochs``, then a cosine to 0 at ``epochs``.

    A fresh AdamW's first steps move every weight by about its learning rate
    whatever the gradient's size (its moment estimates start from nothing);
    a warm-up keeps those steps small (Liu et al., "On the Variance of the
    Adaptive Learning Rate and Beyond", ICLR 2020).
    """
    total, warm = steps_per_epoch * epochs, round(steps_per_epoch * warmup_epochs)

    def factor(step):
        if step < warm:
            return (step + 1) / (warm + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def phase_warmup(warmup_epochs, epochs, phase, state):
    """--warmup-epochs for a phase of ``epochs``: one as long as the phase or longer never reaches the
    cosine, so it is clamped to WARMUP_MAX_SHARE of the phase, with a warning (not for a legacy run)."""
    if warmup_epochs < epochs or state.legacy:
        return warmup_epochs
    clamped = epochs * WARMUP_MAX_SHARE
    main_print(f"warning: --warmup-epochs {warmup_epochs:g} is as long as {phase} ({epochs} epochs) or longer: "
               f"clamped to {clamped:.2f} epochs, a third of the phase", file=sys.stderr)
    return clamped


def run_phase(phase, model, optimizer, env, args, state, ckpt_dir, epochs, warmup_epochs=0.0, penalty=None):
    """Epochs of one phase (warm-up then per-step cosine, early stopping), persisted after each by save_epoch.

    Each epoch is evaluated on the held-out split (when --select val made
    one) and on the test split; --select picks the epoch the phase reports
    and keeps (best.pth, the returned state) by the held-out accuracy, the
    last epoch, or the test accuracy. Continues from
    state.resume_point(phase) when there is one. Appends one row per epoch
    to state.curves[phase]; the caller ends with finish_phase. A NaN or
    infinite loss ends the run (diverged). Returns (the selected epoch's
    model state, the selected epoch).
    """
    device, loaders, log = env.device, env.data, main_print if is_main_process() else None
    runner = wrap_model(model, device, env.world_size, args.compile)
    scheduler = warmup_cosine(optimizer, len(loaders.train), epochs, warmup_epochs)
    stopper = EarlyStopping(None if args.select == "last" else args.patience)  # patience None: the last epoch
    best_state, start_epoch, resume = cpu_state(model), 1, state.resume_point(phase)
    if resume:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        stopper.load_state_dict(resume["early_stopping"])
        set_rng_state(resume["rng"])
        if stopper.best_epoch:  # 0 (none yet) when --eval-every left every epoch so far unevaluated
            best_state = read_checkpoint(os.path.join(ckpt_dir, "best.pth"), args)["state_dict"]
        start_epoch = resume["epoch"] + 1
        main_print(f"{phase}: resuming after epoch {resume['epoch']} of {epochs} ({ckpt_dir}/last.pth)")
    elif is_main_process():
        os.makedirs(ckpt_dir, exist_ok=True)
    for epoch in range(start_epoch, epochs + 1):
        if stopper.should_stop:
            break
        started = time.perf_counter()
        loaders.train.set_epoch(epoch)
        try:
            train = train_one_epoch(runner, loaders.train, optimizer, device, epoch, args.amp, args.channels_last,
                                    args.print_freq, log, penalty, scheduler)
        except NonFiniteLoss as e:
            diverged(state, phase, epoch, e.step, ckpt_dir)
        held_out, test, improved = None, None, False
        if epoch % args.eval_every == 0 or epoch == epochs:  # --eval-every: the other epochs are not evaluated
            held_out = (evaluate(runner, loaders.val, device, args.amp, args.channels_last)
                        if loaders.val is not None else None)
            test = evaluate(runner, loaders.test, device, args.amp, args.channels_last)
            improved = stopper.step(held_out["acc"] if held_out else test["acc"], epoch)  # under last: recorded only
        row = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"], **metrics("val", held_out),
               **metrics("test", test), **epoch_lrs(optimizer),
               "seconds": train["seconds"] + sum(r["seconds"] for r in (held_out, test) if r),
               "img_per_s": train["img_per_s"]}
        state.curves[phase].append(row)
        if env.tensorboard:
            env.tensorboard.epoch(phase, model, row)
        held_text = f"val acc {held_out['acc']:.2f}% | " if held_out else ""
        test_text = f"test acc {test['acc']:.2f}% | " if test else "not evaluated | "
        main_print(f"{phase} epoch {epoch}/{epochs}: train loss {train['loss']:.4f} acc {train['acc']:.2f}% | "
                   f"{held_text}{test_text}selected epoch {stopper.best_epoch or '-'} ({args.select})"
                   f" | lr {row['lr']:.2e} | {row['seconds']:.1f} s, {train['img_per_s']:.0f} img/s")
        model_state = cpu_state(model)  # one copy per epoch: the best state, best.pth and last.pth share it
        if improved:
            best_state = model_state
        state.add_wall_time(phase, time.perf_counter() - started)
        save_epoch(state, ckpt_dir, phase, epoch, model, model_state, stopper, improved, optimizer, scheduler)
    if stopper.should_stop:
        main_print(f"{phase}: early stop, no better held-out accuracy for {args.patience} epochs"
                   if args.select == "val" else f"{phase}: early stop, no improvement for {args.patience} epochs")
    return best_state, stopper.best_epoch


def metrics(split, result):
    """An evaluation's loss, accuracy and top-5 as a curve row's ``<split>_*`` columns (none without one)."""
    return {f"{split}_{k}": result[k] for k in ("loss", "acc", "top5")} if result else {}


def epoch_lrs(optimizer):
    """The learning rates now: the head's (or quick_check.py's single one) as 'lr', the nominal extractor one."""
    lrs = {}
    for g in optimizer.param_groups:
        factor = g["lr"] / g["initial_lr"] if g["initial_lr"] else 0.0  # the schedule's factor, the same for all
        lrs["lr_extractor" if g["name"] == "extractor" else "lr"] = g["nominal_lr"] * factor
    return lrs


def diverged(state, phase, epoch, step, ckpt_dir):
    """Record a NaN/inf loss in the JSON (the checkpoints keep the last good epoch) and stop the run."""
    state.results["diverged"] = {"phase": phase, "epoch": epoch, "step": step}
    state.save()
    kept = (f"{ckpt_dir}/last.pth keeps epoch {epoch - 1}" if os.path.exists(os.path.join(ckpt_dir, "last.pth"))
            else "no epoch of it had finished, so it has no checkpoint")
    recorded = f"; recorded in {state.json_path}" if state.json_path else ""
    if is_main_process():
        print(f"error: {phase} diverged: the training loss became NaN or infinite at epoch {epoch}, step {step}; "
              f"{kept}. Try lower learning rates{recorded}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_DIVERGED)


def selected_row(curves, selected_epoch):
    return next(r for r in curves if r["epoch"] == selected_epoch)


# ----------------------------------------------------------------------------- entry point


def run_script(main_function, args, resume_hint=True):
    """A script's entry point: main_function(args), then leave together; Ctrl-C ends with one line, exit 130.

    A write the disk refuses (full, or past a file-size limit: SIGXFSZ is ignored so that such a write
    fails instead of killing the process) ends with one line, exit 2; the files written before stay.
    """
    let_writes_fail()
    try:
        main_function(args)
        gc.collect()  # DDP wrappers sit in reference cycles: free them while the process group is still up
        barrier()  # leave together: a Gloo rank torn down while its peer still finishes can abort
    except WriteError as e:
        die(e)
    except KeyboardInterrupt:
        hint = ("the last completed epoch is saved: run the same command with --resume to continue" if resume_hint
                else "nothing after the last completed epoch was saved")
        if is_main_process():
            print(f"interrupted (Ctrl-C): {hint}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        cleanup_distributed()
