"""Single-phase sanity run (docs/DESIGN.md, "The experiment pipeline"): one model, one AdamW, a cosine schedule.

    python quick_check.py --dataset fashion-mnist --epochs 3
    # fixed 2-block L=8 scattering + BN + linear on 2 CPU cores, a few minutes; its last line names the
    # selected epoch (by default the best on a held-out 10 % of the training set) and its test accuracy

The wavelets are frozen unless --learnable: then only BN + classifier train,
which is what a fixed scattering transform with a linear head measures.
Saves the best model to <save-dir>/best.pth (loadable as train.py's).
"""
import argparse
import math
import os
import time

import runner
from scattering_net import ModelConfig, add_model_args
from utils import die, format_seconds, main_print


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    runner.add_data_args(parser)
    add_model_args(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--learnable", action="store_true", help="train the wavelet filters too")
    group.add_argument("--epochs", type=int, default=150, help="training epochs")
    group.add_argument("--batch-size", "--global-batch-size", type=int, default=128,
                       help="mini-batch size (global under torchrun)")
    group.add_argument("--lr", type=float, default=1e-3, help="initial AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    group.add_argument("--patience", type=int, default=1000, help="early-stopping patience in epochs")
    runner.add_runtime_args(parser)
    return parser


def fit_single_phase(phase, model, env, args, save_dir):
    """AdamW on every trainable parameter at --lr, cosine over --epochs, train.py's epoch loop and checkpoints.

    Saves <save_dir>/best.pth (the epoch --select chose) and last.pth;
    returns (that epoch's test accuracy, the epoch, the per-epoch curves).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    group = {"params": params, "lr": args.lr, "name": "all", "nominal_lr": args.lr}
    optimizer = runner.make_optimizer("adamw", [group], args.weight_decay)
    state = runner.RunState(vars(args), json_path=None, curves={phase: []})
    state.begin_session(env.device, env.world_size)
    _, epoch = runner.run_phase(phase, model, optimizer, env, args, state, save_dir, args.epochs)
    runner.finish_phase(state, save_dir)
    return runner.selected_row(state.curves[phase], epoch)["test_acc"], epoch, state.curves[phase]


def main(args):
    if not 0 < args.lr < math.inf:
        die(f"--lr must be > 0, got {args.lr}")
    existing = [p for p in (os.path.join(args.save_dir, n) for n in ("best.pth", "last.pth")) if os.path.exists(p)]
    if existing:
        die(f"{existing[0]} already exists: choose another --save-dir (nothing was overwritten)")
    start = time.perf_counter()
    env = runner.setup(args, args.batch_size)
    args.seed = env.seed
    config = ModelConfig.from_args(args, env.data.info)  # --learnable is ModelConfig.learnable
    model = runner.build_model(config, args.seed, env.device, args.channels_last)
    runner.describe_run(env, model, "quick_check.py")
    with env.lock:
        test_acc, epoch, curves = fit_single_phase("quick_check", model, env, args, args.save_dir)
    main_print(f"test acc {test_acc:.2f}% at epoch {epoch} (selected by {args.select}) in "
               f"{format_seconds(time.perf_counter() - start)}; model saved to {os.path.join(args.save_dir, 'best.pth')}")
    return {"test_acc": test_acc, "selected_epoch": epoch, "curves": curves}


if __name__ == "__main__":
    runner.run_script(main, get_args_parser().parse_args(), resume_hint=False)
