"""Two-phase experiment pipeline (docs/DESIGN.md, "The experiment pipeline").

    python train.py --dataset fashion-mnist --modulus-type phase_relu --epochs 15 --save-dir runs/fmnist
    torchrun --nproc_per_node=2 train.py --dataset synthetic --train-size 800 --epochs 3 --save-dir runs/ddp

Phase A trains BatchNorm + classifier on frozen scattering features (head_acc);
Phase B starts from Phase A's best model, unfreezes the blocks and trains
everything with two learning rates (finetune_acc, finetune_gain and how far
the filters moved). Results go to <save-dir>/results_<timestamp>.json after
every epoch; checkpoints to <save-dir>/phase_{a,b}/{best,last}.pth.
--from-phase-a DIR skips Phase A by continuing DIR's finished one (a copy):
Phase B variants then differ in their Phase B flags only.
Measured results are in README.md, docs/EXPERIMENTS.md and BENCHMARKS.md, with their commands.
"""
import argparse
import math
import os

import numpy as np
import torch

import data
import wavelet_kernels
from engine import filter_deltas
from runner import (JOINT, LAST_KEYS, add_data_args, add_runtime_args, build_model, check_same_flags,
                    describe_run, find_last_checkpoint, finish_phase, inherit_flags, legacy_curves, load_run_state, new_json_path,
                    make_optimizer, phase_warmup, read_checkpoint, run_phase, run_script, selected_row, setup)
import runner
from scattering_net import ModelConfig, add_model_args
from utils import SaveDirLock, barrier, die, is_main_process, main_print, replicas_agree, save_checkpoint

EXTRACTOR_LR_SCALES = ("fixed", "rms")
# Phase B's defaults, chosen by the ablation in docs/EXPERIMENTS.md ("Phase B without the
# collapse"; epochs selected on the test split then: superseded, to be re-measured).
PHASE_B_RECIPE = {"lr_head_finetune": None, "warmup_epochs": 3.0, "carry_head_state": True,
                  "extractor_lr_scale": "rms"}
# Phase B's head learning rate is --lr-head times this unless --lr-head-finetune says otherwise: Phase A
# ends with the head's lr near 0, and going back to all of --lr-head throws away what it converged to.
HEAD_FINETUNE_FACTOR = 0.1
# The flags that only act in Phase B: the ones a --from-phase-a run may set differently from its source.
PHASE_B_FLAGS = ("epochs", "lr_extractor", "freeze_extractor", "l2_sp", *PHASE_B_RECIPE, "save_dir", "from_phase_a")


# The arms of the experiment, one table for sweep.py (--arm), analyze.py (its arm column) and the plots:
# name -> the train.py flags that make a run of it. The name is <init>-<how the blocks train>.
ARMS = {"wavelet-two-phase": ["--init", "wavelet"], "wavelet-frozen": ["--init", "wavelet", "--freeze-extractor"],
        "wavelet-joint": ["--init", "wavelet", "--joint"], "random-joint": ["--init", "random", "--joint"],
        "cnn-joint": ["--n-blocks", "0", "--head", "cnn", "--joint"]}


# The small-data protocol of Gauthier et al. ("Parametric Scattering Networks", CVPR 2022) on CIFAR-10, as
# sweep.py --preset literature runs it: training sets of PROTOCOL_EPOCHS' sizes (class-stratified, the
# same images for a seed in every arm), a fixed epoch budget per size reported at its last epoch
# (--select last), AutoAugment, everything trained jointly from the start. Budgets are this project's
# (the paper trained for hundreds to thousands of epochs): about 800, 1,200 and 1,600 optimizer steps
# at a batch of 128. Named before any run: learnt Morlet is the learnt arm under the WRN head, and the
# learning rates below (AdamW moves a parameter by about its lr per step: 1e-3 rad per step for the
# Morlet angles; SGD's 0.05 and 5e-4 weight decay are the usual for a WRN).
PROTOCOL_EPOCHS = {100: 800, 500: 300, 1000: 200}
PROTOCOL_SEEDS = (0, 1, 2)
PROTOCOL_EVALUATIONS = 20  # per run (--eval-every = epochs / this): the test split is 10x the largest set
PROTOCOL_SHARED = ["--joint", "--select", "last", "--augment", "autoaugment"]
PROTOCOL_MORLET_LR = ["--learn", "morlet", "--lr-extractor", "1e-3"]
PROTOCOL_WRN = ["--head", "cnn", "--head-depth", "16", "--head-width", "8", "--optimizer", "sgd", "--lr-head", "0.05",
                "--weight-decay", "5e-4"]
PROTOCOL_ARMS = {
    "linear-wavelet-fixed": ["--init", "wavelet", "--learn", "morlet", "--lr-extractor", "0"],
    "linear-wavelet-taps-channel": ["--init", "wavelet", "--mixing-horizon", "1"],
    "linear-wavelet-taps-dense": ["--init", "wavelet"],
    "linear-wavelet-morlet": ["--init", "wavelet", *PROTOCOL_MORLET_LR],
    "linear-random-taps-channel": ["--init", "random", "--mixing-horizon", "1"],
    "linear-random-morlet": ["--init", "random", *PROTOCOL_MORLET_LR],
    "linear-random-fixed": ["--init", "random", "--learn", "morlet", "--lr-extractor", "0"],
    "wrn-wavelet-fixed": ["--init", "wavelet", "--learn", "morlet", "--lr-extractor", "0", *PROTOCOL_WRN],
    "wrn-wavelet-morlet": ["--init", "wavelet", "--learn", "morlet", "--lr-extractor", "1e-2", *PROTOCOL_WRN],
    "wrn-random-fixed": ["--init", "random", "--learn", "morlet", "--lr-extractor", "0", *PROTOCOL_WRN],
    "wrn-random-morlet": ["--init", "random", "--learn", "morlet", "--lr-extractor", "1e-2", *PROTOCOL_WRN],
    "cnn-alone-wrn-16-2": ["--n-blocks", "0", *PROTOCOL_WRN, "--head-width", "2"],
}


def protocol_row(config):
    """(head, filters at init, what trains) of a run, as the literature table names its rows."""
    if config.get("n_blocks") == 0:
        return f"WRN-{config.get('head_depth')}-{config.get('head_width')} alone", "-", "-"
    head = "linear" if config.get("head", "linear") == "linear" else \
        f"WRN-{config.get('head_depth')}-{config.get('head_width')}"
    init = "Morlet" if config.get("init", "wavelet") == "wavelet" else "random"
    if config.get("lr_extractor") == 0 or config.get("freeze_extractor"):
        return head, init, "fixed"
    if config.get("learn", "taps") == "morlet":
        return head, init, "learnt Morlet parameters"
    return head, init, "learnt taps, " + ("per channel" if config.get("mixing_horizon") == 1 else "dense")


def arm_of(config):
    """The arm a run's config belongs to, named as in ARMS (runs from before these flags: wavelet-two-phase)."""
    if config.get("n_blocks") == 0:  # no scattering: the CNN alone, trained jointly
        return "cnn-joint"
    how = "joint" if config.get("joint") else "frozen" if config.get("freeze_extractor") else "two-phase"
    return f"{config.get('init', 'wavelet')}-{how}"


# ----------------------------------------------------------------------------- command line

def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(parser)
    add_model_args(parser)
    phases = parser.add_argument_group("training phases")
    phases.add_argument("--epochs", type=int, default=100, help="max epochs of Phase B (and of Phase A unless "
                                                                  "--head-epochs)")
    phases.add_argument("--head-epochs", "--lr-epochs", type=int, default=None,
                        help="max epochs of Phase A; default: --epochs")
    phases.add_argument("--lr-head", type=float, default=1e-3, help="BN + classifier learning rate (every phase)")
    phases.add_argument("--lr-extractor", type=float, default=1e-4,
                        help="scattering blocks' learning rate (0 with --joint: the blocks stay fixed)")
    phases.add_argument("--joint", action="store_true",
                        help="instead of the two phases: one phase training everything from the start, for "
                             "--head-epochs + --epochs epochs (joint_acc); the protocol for --init random")
    phases.add_argument("--freeze-extractor", action="store_true",
                        help="control: Phase B keeps the blocks frozen (same epochs and schedule): what more head "
                             "training alone gains")
    phases.add_argument("--l2-sp", "--l2-penalty", type=float, default=0.0, metavar="LAMBDA",
                        help="L2-SP: add LAMBDA/2 * ||W - W0||^2 over the blocks' weights to the loss (Li et al., "
                             "ICML 2018), W0 their values when they start to train")
    recipe = parser.add_argument_group("Phase B recipe (docs/EXPERIMENTS.md, \"Phase B without the collapse\")")
    recipe.add_argument("--lr-head-finetune", type=float, default=PHASE_B_RECIPE["lr_head_finetune"],
                        help=f"the head's learning rate in Phase B; default: --lr-head x {HEAD_FINETUNE_FACTOR}")
    recipe.add_argument("--warmup-epochs", type=float, default=PHASE_B_RECIPE["warmup_epochs"],
                        help="Phase B / joint: learning rates rise linearly from 0 over these epochs, then cosine")
    recipe.add_argument("--carry-head-state", action=argparse.BooleanOptionalAction,
                        default=PHASE_B_RECIPE["carry_head_state"],
                        help="Phase B continues Phase A's AdamW moments for BN + classifier")
    recipe.add_argument("--extractor-lr-scale", choices=EXTRACTOR_LR_SCALES, default=PHASE_B_RECIPE["extractor_lr_scale"],
                        help="fixed: every block weight at --lr-extractor; rms: each weight tensor at --lr-extractor x "
                             "its RMS / the RMS of the Morlet wavelets (zero-initialised entries of dense blocks "
                             "move in proportion)")
    training = parser.add_argument_group("training")
    training.add_argument("--global-batch-size", "--batch-size", type=int, default=128,
                          help="the batch over all processes, split evenly across DDP ranks")
    training.add_argument("--optimizer", choices=runner.OPTIMIZERS, default=runner.OPTIMIZERS[0],
                          help="adamw, or sgd (Nesterov momentum 0.9: the usual for --head cnn, with a larger --lr-head "
                               "such as 0.05 and --weight-decay 5e-4); every phase and group uses it")
    training.add_argument("--weight-decay", type=float, default=1e-4, help="the optimizer's weight decay")
    training.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs")
    training.add_argument("--resume", action="store_true", help="continue the interrupted run in --save-dir")
    training.add_argument("--from-phase-a", default=None, metavar="DIR",
                          help="skip Phase A: start Phase B from the finished Phase A of the run in DIR (every flag "
                               "that shapes Phase A must match it; DIR is only read): Phase B variants that share "
                               "one Phase A")
    training.add_argument("--trust-checkpoint", action="store_true",
                          help="load checkpoints that hold more than tensors and plain values (their pickle can run "
                               "code): only for files from a source you trust")
    add_runtime_args(parser)
    return parser


# ----------------------------------------------------------------------------- set-up

# ----------------------------------------------------------------------------- checkpoints and run state

def flag_defaults():
    """{flag: default} of train.py's parser: what a flag newer than a saved run counts as."""
    return vars(get_args_parser().parse_args([]))


def run_settings(config):
    """runner.run_settings with train.py's flags: what a run computes, comparable across runs and commands."""
    return runner.run_settings(config, flag_defaults())


def phase_a_source(args):
    """--from-phase-a DIR: DIR's finished Phase A, read and checked (nothing is written).

    Returns (its last.pth, its best.pth) for ``branch_phase_a``; like a
    resumed run, a run that left out --seed takes the one they record.
    """
    source = args.from_phase_a
    if args.joint:
        die("--from-phase-a and --joint exclude each other: a joint run has no Phase A")
    paths = {name: os.path.join(source, "phase_a", name) for name in ("last.pth", "best.pth")}
    if not os.path.isfile(paths["last.pth"]):
        die(f"--from-phase-a: no Phase A in {source} (looked for {paths['last.pth']})")
    last = read_checkpoint(paths["last.pth"], args)
    missing = [k for k in LAST_KEYS if k not in last]
    if missing or last["phase"] != "phase_a":
        die(f"--from-phase-a: {paths['last.pth']} is not a Phase A last.pth written by train.py")
    if not last["finished"]:
        running = SaveDirLock(source).holder_now()
        if running:
            die(f"--from-phase-a: the Phase A in {source} is still running ({running}), at epoch {last['epoch']} of "
                f"{last['config']['head_epochs']}: wait for it to finish")
        die(f"--from-phase-a: the Phase A in {source} stopped after epoch {last['epoch']} of "
            f"{last['config']['head_epochs']}: finish it first (its command with --resume)")
    return last, read_checkpoint(paths["best.pth"], args)


def branch_phase_a(args, last, best):
    """Check the flags against the borrowed Phase A's, then write its checkpoints into --save-dir as this run's.

    Every flag but Phase B's (PHASE_B_FLAGS) must match. The run is then
    complete on its own and resumable. Returns the last.pth to continue from.
    """
    check_same_flags(last["config"], args, f"--from-phase-a: these flags differ from the run in {args.from_phase_a}",
                     flag_defaults(), PHASE_B_FLAGS)
    config = dict(vars(args))
    last = {**last, "config": config, "json_path": new_json_path(args.save_dir),
            "curves_all": legacy_curves(last["config"], last["curves_all"])}
    if is_main_process():
        for name, checkpoint in (("last.pth", last), ("best.pth", {**best, "config": config})):
            save_checkpoint(os.path.join(args.save_dir, "phase_a", name), checkpoint)
    barrier()
    return last


# ----------------------------------------------------------------------------- phases

def head_group(model, lr):
    return {"params": model.head_parameters(), "lr": lr, "name": "head", "nominal_lr": lr}


def extractor_groups(model, lr, scale):
    """Param groups of the blocks: one at ``lr`` (scale 'fixed'), or one per weight tensor (scale 'rms').

    'rms': a tensor's lr is lr x RMS(tensor) / RMS(Morlet bank). AdamW moves
    each weight by about its lr per step, so this moves every tensor by the
    same fraction of its size: a dense block's zero-initialised off-diagonal
    entries (26 of every 27 at block 1 on RGB input) share the small step of
    their tensor instead of each taking a full one. Under --learn morlet the
    Morlet parameters (angles, frequencies, log-widths: no RMS to scale by)
    form one group at ``lr`` with no weight decay, which would pull every
    orientation towards 0 rad and every width towards 1 px.
    """
    morlet = model.morlet_parameters()
    taken = {id(p) for p in morlet}
    params = [p for p in model.extractor_parameters() if id(p) not in taken]
    groups = [{"params": morlet, "lr": lr, "weight_decay": 0.0, "name": "extractor", "nominal_lr": lr}] if morlet else []
    if scale == "fixed" or not params:
        return groups + ([{"params": params, "lr": lr, "name": "extractor", "nominal_lr": lr}] if params else [])
    reference = morlet_rms(model.config)
    return groups + [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt()) / reference,
                      "name": "extractor", "nominal_lr": lr} for p in params]


def extractor_lr_rule(args):
    """How extractor_groups sets the blocks' learning rates, in words for the log."""
    if args.learn == "morlet":
        rest = f", the phase collapse {args.extractor_lr_scale}" if args.modulus_type == "phase_relu" else ""
        return f"the Morlet parameters without weight decay{rest}"
    return args.extractor_lr_scale


def morlet_rms(config):
    """RMS of the entries of the K x K Morlet wavelets (real and imaginary parts) of a configuration."""
    psi = wavelet_kernels.filter_bank(config.L, config.kernel_size)["psi"]
    return float(np.sqrt(np.mean(np.concatenate([psi.real, psi.imag]) ** 2)))


def carry_head_moments(optimizer, kind, model, phase_a_state):
    """Give the head's parameters in ``optimizer`` the state (AdamW moments, SGD momentum) Phase A ended with
    (its state_dict; kind: --optimizer)."""
    phase_a = make_optimizer(kind, [head_group(model, 1.0)], 0.0)
    phase_a.load_state_dict(phase_a_state)
    for p in model.head_parameters():
        optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in phase_a.state[p].items()}


def l2_sp(params, anchors, strength):
    """The L2-SP penalty strength / 2 * sum ||W - W0||^2 as a callable (None when strength is 0)."""
    if not strength:
        return None
    return lambda: 0.5 * strength * sum((p - a).pow(2).sum() for p, a in zip(params, anchors))


def phase_results(prefix, curves, selected_epoch):
    return {f"{prefix}_epochs": len(curves), f"{prefix}_best_epoch": selected_epoch,
            f"{prefix}_seconds": sum(r["seconds"] for r in curves)}


def selected_results(name, curves, selected_epoch):
    """The selected epoch's test accuracy and top-5 (<name>_acc, <name>_top5) and its held-out accuracy
    (<name>_val_acc; None without a held-out split)."""
    row = selected_row(curves, selected_epoch)
    return {f"{name}_acc": row["test_acc"], f"{name}_top5": row["test_top5"], f"{name}_val_acc": row.get("val_acc")}


def size_results(model, loaders, seed):
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = model.plan
    return {"n_params_total": plan["n_params_total"], "n_params_extractor": plan["n_params_extractor"],
            "n_params_classifier": plan["n_params_head"], "n_params_trainable": n_trainable,
            "actual_train_samples": loaders.n_train, "val_samples": loaders.n_val, "test_samples": loaders.n_test,
            "seed": seed}


def movement_results(model, initial_filters, initial_morlet, world_size):
    """How far the filters moved (filter_delta_*, filter_movement; --learn morlet: the Morlet parameters at the
    start and now) and, under DDP, whether ranks agree."""
    results = {**filter_deltas(initial_filters, model.wavelet_weights()), "filter_movement": model.filter_movement()}
    if initial_morlet is not None:
        results["morlet_parameters"] = {"initial": initial_morlet, "learnt": model.morlet_table()}
    if world_size > 1:  # DDP must have kept the unfrozen filters identical on every rank
        results["replicas_in_sync"] = replicas_agree([p.detach() for p in model.extractor_parameters()])
    return results


def train_head(model, env, args, state):
    """Phase A: BN + classifier on frozen scattering features; records head_acc. Returns the best state."""
    model.blocks.requires_grad_(False)
    state.results.update(size_results(model, env.data, args.seed))
    main_print(f"Phase A: training BN + classifier ({state.results['n_params_trainable']:,} parameters), "
               f"extractor frozen")
    optimizer = make_optimizer(args.optimizer, [head_group(model, args.lr_head)], args.weight_decay)
    best_state, epoch = run_phase("phase_a", model, optimizer, env, args, state, os.path.join(args.save_dir, "phase_a"),
                                  args.head_epochs)
    selected = selected_results("head", state.curves["phase_a"], epoch)
    head_acc = selected["head_acc"]
    state.results.update(**selected, head_err=100.0 - head_acc, baseline_acc=head_acc,
                         **phase_results("phase_a", state.curves["phase_a"], epoch))
    finish_phase(state, os.path.join(args.save_dir, "phase_a"))
    main_print(f"Phase A done: head_acc {head_acc:.2f}% (test accuracy of epoch {epoch}, selected by {args.select})")
    return best_state


def fine_tune(model, initial, env, args, state):
    """Phase B: everything trains, two learning rates (or, --freeze-extractor, the head alone on).

    Records finetune_acc, the gain and how far the filters moved. initial:
    (the filters' and the blocks' parameters' values at the start).
    """
    initial_filters, initial_extractor, initial_morlet = initial
    model.blocks.requires_grad_(not args.freeze_extractor)
    groups = [] if args.freeze_extractor else extractor_groups(model, args.lr_extractor, args.extractor_lr_scale)
    lr_head = args.lr_head * HEAD_FINETUNE_FACTOR if args.lr_head_finetune is None else args.lr_head_finetune
    optimizer = make_optimizer(args.optimizer, groups + [head_group(model, lr_head)], args.weight_decay)
    if args.carry_head_state:
        phase_a_last = read_checkpoint(os.path.join(args.save_dir, "phase_a", "last.pth"), args)
        carry_head_moments(optimizer, args.optimizer, model, phase_a_last["optimizer"])
    penalty = None if args.freeze_extractor else l2_sp(list(model.extractor_parameters()), initial_extractor, args.l2_sp)
    main_print("Phase B: " + ("the head alone, extractor still frozen (--freeze-extractor)" if args.freeze_extractor
                              else f"fine-tuning everything (extractor lr {args.lr_extractor:g}, "
                                   f"{extractor_lr_rule(args)}; head lr {lr_head:g})"))
    warmup = phase_warmup(args.warmup_epochs, args.epochs, "Phase B", state)
    best_state, epoch = run_phase("phase_b", model, optimizer, env, args, state, os.path.join(args.save_dir, "phase_b"),
                                  args.epochs, warmup, penalty)
    model.load_state_dict(best_state)
    selected = selected_results("finetune", state.curves["phase_b"], epoch)
    state.results.update(**selected, finetune_gain=selected["finetune_acc"] - state.results["head_acc"],
                         extractor_frozen=args.freeze_extractor, phase_b_warmup_epochs=warmup,
                         **phase_results("phase_b", state.curves["phase_b"], epoch),
                         **movement_results(model, initial_filters, initial_morlet, env.world_size))
    finish_phase(state, os.path.join(args.save_dir, "phase_b"))


def train_jointly(model, initial, env, args, state):
    """--joint: one phase trains everything from the start for --head-epochs + --epochs; records joint_acc."""
    initial_filters, initial_extractor, initial_morlet = initial
    learnt = args.lr_extractor > 0  # --lr-extractor 0: the blocks stay as they are (no gradient is computed)
    model.blocks.requires_grad_(learnt)
    state.results.update(size_results(model, env.data, args.seed))
    epochs = args.head_epochs + args.epochs
    groups = extractor_groups(model, args.lr_extractor, args.extractor_lr_scale) if learnt else []
    optimizer = make_optimizer(args.optimizer, groups + [head_group(model, args.lr_head)], args.weight_decay)
    main_print(f"joint: training {'everything' if learnt else 'the head on fixed blocks (--lr-extractor 0)'} from the "
               f"start ({args.init} init) for {epochs} epochs")
    warmup = phase_warmup(args.warmup_epochs, epochs, "the joint phase", state)
    best_state, epoch = run_phase(JOINT, model, optimizer, env, args, state, os.path.join(args.save_dir, JOINT), epochs,
                                  warmup, l2_sp(list(model.extractor_parameters()), initial_extractor, args.l2_sp))
    model.load_state_dict(best_state)
    selected = selected_results("joint", state.curves[JOINT], epoch)
    state.results.update(**selected, joint_err=100.0 - selected["joint_acc"], joint_warmup_epochs=warmup,
                         **phase_results(JOINT, state.curves[JOINT], epoch),
                         **movement_results(model, initial_filters, initial_morlet, env.world_size))
    finish_phase(state, os.path.join(args.save_dir, JOINT))


# ----------------------------------------------------------------------------- the pipeline

def check_flags(args):
    """The checks of train.py's own flags (runner.check_common_args does the shared ones); dies with one line."""
    if not (0 < args.lr_head < math.inf and 0 <= args.lr_extractor < math.inf):  # NaN fails both
        die(f"--lr-head must be > 0 and --lr-extractor >= 0, got {args.lr_head:g} and {args.lr_extractor:g}")
    if args.lr_head_finetune is not None and not 0 < args.lr_head_finetune < math.inf:
        die(f"--lr-head-finetune must be a finite number > 0, got {args.lr_head_finetune:g}")
    args.head_epochs = args.head_epochs or args.epochs
    if args.joint and args.freeze_extractor:
        die("--joint and --freeze-extractor exclude each other: a joint run trains the blocks from the start")
    if args.n_blocks == 0 and not (args.head == "cnn" and args.joint):
        die("--n-blocks 0 is the CNN alone: it needs --head cnn and --joint (with no scattering there is nothing to "
            "freeze for a Phase A)")


def main(args):
    """Check the flags, find what to resume, lock --save-dir, run the experiment; returns the results dict."""
    check_flags(args)
    last, borrowed_best = find_last_checkpoint(args), None
    if last is None and args.from_phase_a:
        last, borrowed_best = phase_a_source(args)
    if last:
        inherit_flags(args, last["config"])  # before setup: the seed and the rule draw the data subsets
    env = setup(args, args.global_batch_size)
    with env.lock:
        if borrowed_best:
            last = branch_phase_a(args, last, borrowed_best)
        try:
            return experiment(args, env, last)
        except data.DatasetError as e:  # an image that cannot be read mid-epoch (possibly in a worker)
            die(data.error_line(e))


def experiment(args, env, last):
    """Phase A then Phase B (or the joint phase), from wherever ``last`` (a last.pth or None) left off."""
    state = load_run_state(args, env.seed, last, flag_defaults())
    state.begin_session(env.device, env.world_size)
    state.results["selection"] = args.select
    config = ModelConfig.from_args(args, env.data.info)
    model = build_model(config, args.seed, env.device, args.channels_last)
    describe_run(env, model, "train.py")
    initial = (model.wavelet_weights(), [p.detach().clone() for p in model.extractor_parameters()], model.morlet_table())
    if args.joint:
        train_jointly(model, initial, env, args, state)
        main_print(f"done: joint_acc {state.results['joint_acc']:.2f}%; results in {state.json_path}")
        return state.results
    if state.start_phase == "phase_a":
        best_state = train_head(model, env, args, state)
    else:
        best_state = read_checkpoint(os.path.join(args.save_dir, "phase_a", "best.pth"), args)["state_dict"]
    model.load_state_dict(best_state)
    fine_tune(model, initial, env, args, state)
    results = state.results
    main_print(f"done: head_acc {results['head_acc']:.2f}% -> finetune_acc {results['finetune_acc']:.2f}% "
               f"(gain {results['finetune_gain']:+.2f}), filter delta {results['filter_delta_relative']:.4f} "
               f"relative; results in {state.json_path}")
    return results


if __name__ == "__main__":
    run_script(main, get_args_parser().parse_args())
