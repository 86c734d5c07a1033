"""Tables, paired tests and plots over train.py's results: each run counted once.

    python analyze.py --results-dir runs/demo --curves
    # one row per run found under runs/demo (results_*.json, recursively; a file reached twice through a
    # link, or a run recorded twice, counts once), then means over seeds and paired t-tests
    python analyze.py --results-dir runs/demo --filters runs/demo/<cell>/phase_b/best.pth
    # block 0's wavelets before, after, and the change; how far each orientation moved
    python analyze.py --results-dir runs/demo --stability runs/a/phase_b/best.pth runs/b/joint/best.pth
    # how far each checkpoint's scattering coefficients move under shifts, rotations, zooms and smooth
    # warps of growing strength, beside the distance between unrelated images
    python analyze.py --results-dir runs/literature --literature --held-out
    # the small-data table beside the published numbers; the best learnt linear arm chosen on the
    # training-pool images no run trained on
    python analyze.py --results-dir runs/linear runs/wrn --literature --plots-dir runs/both/plots
    # several folders read as one (each run once): here the WRN head against the linear head, by seed

Written to <the first --results-dir>/plots/ (or --plots-dir): runs.csv (one row per run, with its selection
rule, commit, wall time, and the last-epoch and best-test-epoch accuracies
beside the selected one), summary.csv (per configuration: n, mean and std over seeds),
significance.csv (paired differences), plot_data_efficiency.png,
plot_advantage.png, plot_size_vs_gain.png, plot_delta_vs_gain.png; with
--curves, curves/curves_exp<N>.png (N: the row of runs.csv); with --filters,
filters_block0__<checkpoint path>.png; with --stability, stability.csv (per
checkpoint), stability_summary.csv (per model and training-set size, over its
checkpoints) and plot_stability.png; with --literature, literature.csv,
literature_layout.csv (the paper's layout), literature_pairs.csv,
literature_wrn_target.csv (with WRN runs), plot_literature.png and, with
--held-out, literature_best.csv. Runs recorded before --select existed
chose their epochs on the test split: they are read as --select test, and
runs of different rules are never averaged or paired. Headless (Agg) unless
--interactive.
"""
import argparse
import glob
import json
import math
import os
import sys

import numpy as np
import pandas as pd
import torch

import data
import runner
import train
import wavelet_kernels
from scattering_net import ModelConfig, ScatteringNet
from utils import CheckpointError, WriteError, atomic_write, die, let_writes_fail, load_checkpoint

# How a run's blocks trained, the second half of its arm's name (train.arm_of): head then fine-tuning, head
# then more head training with the blocks frozen (--freeze-extractor), one joint phase (--joint).
TWO_PHASE, FROZEN, JOINT = "two-phase", "frozen", "joint"
# The arm whose accuracy the comparisons are about.
OURS = "wavelet-two-phase"
REQUIRED_CONFIG = ("dataset", "n_blocks", "L", "modulus_type")
REQUIRED_RESULTS = {
    TWO_PHASE: ("head_acc", "finetune_acc", "finetune_gain", "filter_delta_l2", "filter_delta_relative",
                "n_params_total", "n_params_trainable", "actual_train_samples"),
    JOINT: ("joint_acc", "filter_delta_l2", "filter_delta_relative", "n_params_total", "n_params_trainable",
            "actual_train_samples")}
REQUIRED_RESULTS[FROZEN] = REQUIRED_RESULTS[TWO_PHASE]
COLUMNS = ["dataset", "train_size", "n_blocks", "L", "modulus_type", "learn", "init", "arm", "select", "head_acc",
           "finetune_acc", "finetune_gain", "joint_acc", "last_epoch_acc", "best_test_epoch_acc", "filter_delta_l2",
           "filter_delta_relative", "n_params_total", "n_params_trainable"]
# The phase whose test accuracy is each arm's answer (beside it: its last epoch's and its best test epoch's).
FINAL_PHASE = {TWO_PHASE: "phase_b", FROZEN: "phase_b", JOINT: "joint"}
# Pearson's r of fewer points says nothing (two points always lie on a line).
MIN_POINTS_FOR_R = 3
# A t-interval from two pairs has one degree of freedom (t_0.975 = 12.7): wider than the plot says anything.
MIN_PAIRS_FOR_CI = 3
# Config keys that choose a run's arm (how a run was executed: runner.RUN_KEYS).
ARM_KEYS = ("init", "joint", "freeze_extractor")
ACCURACIES = ("head_acc", "finetune_acc", "joint_acc")
# The paired comparisons: wavelet two-phase finetune_acc minus (arm, accuracy column) of the same seed.
COMPARISONS = {"wavelet fine-tuned - random joint": ("random-joint", "joint_acc"),
               "wavelet fine-tuned - frozen continuation": ("wavelet-frozen", "finetune_acc"),
               "wavelet fine-tuned - its own head": (OURS, "head_acc")}
CONFIDENCE = 0.95


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--results-dir", nargs="+", default=["runs"],
                        help="one or more folders, searched recursively for results_*.json (a run found in several "
                             "counts once)")
    parser.add_argument("--plots-dir", default=None,
                        help="where the tables and figures go; default: <the first --results-dir>/plots")
    parser.add_argument("--curves", action="store_true", help="also plot each experiment's training curves")
    parser.add_argument("--interactive", action="store_true", help="show the plots in a window too")
    parser.add_argument("--filters", metavar="CHECKPOINT", default=None,
                        help="instead of the table: draw block 0's learnt wavelets of this checkpoint against "
                             "their Morlet init, and print how far each orientation moved")
    parser.add_argument("--literature", action="store_true",
                        help="also print and save (literature.csv) the small-data table beside the published numbers "
                             "of Parametric Scattering Networks (sweep.py --preset literature)")
    parser.add_argument("--held-out", action="store_true",
                        help="--literature: evaluate each run's final checkpoint on the training-pool images its "
                             "training set left out, and choose the best learnt linear arm per size on them")
    parser.add_argument("--stability", metavar="CHECKPOINT", nargs="+", default=None,
                        help="instead of the table: the relative change of each checkpoint's scattering coefficients "
                             "under translations, rotations, scalings and smooth random warps of growing strength, "
                             "on its dataset's test images, beside the change between unrelated images")
    parser.add_argument("--stability-images", type=int, default=STABILITY_IMAGES,
                        help="--stability: test images measured (the same ones for every checkpoint of a dataset)")
    parser.add_argument("--data-dir", default=None,
                        help="--stability, --held-out: where the runs' dataset lies; default: the folder each recorded")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="--filters, --stability, --held-out: load a checkpoint that holds more than tensors and plain values (its "
                             "pickle can run code): only for files from a source you trust")
    return parser


# ----------------------------------------------------------------------------- reading

def results_files(results_dirs):
    """Every results_*.json under the folders, each once: a file reached through a link counts where it lies."""
    found = [path for folder in results_dirs
             for path in glob.glob(os.path.join(folder, "**", "results_*.json"), recursive=True)]
    return sorted({os.path.realpath(path) for path in found})


def load_experiments(results_dirs):
    """[(path, parsed JSON)] of every usable results_*.json, sorted by path, each run once; warns about the others.

    A run recorded before --select gets select 'test' and today's curve keys
    (runner.legacy_curves). Two files of one run (the same configuration,
    arm and seed: a copied folder, a sweep cell run twice) count once: the
    newest, with a warning naming both.
    """
    experiments = []
    for path in results_files(results_dirs):
        try:
            with open(path) as f:
                exp = json.load(f)
            config, results = exp.get("config") or {}, exp.get("results") or {}
            required = REQUIRED_RESULTS[training_of(train.arm_of(config))]
            missing = [f"config.{key}" for key in REQUIRED_CONFIG if config.get(key) is None]
            missing += [f"results.{key}" for key in required if key not in results]
            missing += [f"results.{key} as a finite number" for key in required
                        if key in results and not is_number(results[key])]
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
            missing = [f"unreadable ({type(e).__name__})"]
        if missing:
            print(f"warning: skipping {path}: missing {', '.join(missing)}", file=sys.stderr)
            continue
        exp["curves"] = runner.legacy_curves(exp["config"], exp["curves"]) if isinstance(exp.get("curves"), dict) else {}
        exp["config"] = {**runner.LEGACY_FLAGS, **exp["config"]}
        experiments.append((path, exp))
    return one_per_run(experiments)


def run_identity(config):
    """What makes a run the run it is: its configuration, arm and seed (how it ran left out)."""
    return base_configuration(config), train.arm_of(config), config.get("seed")


def recorded_at(path, exp):
    """When a run last recorded a result: its provenance's last session end, else the file's time."""
    sessions = exp.get("provenance") if isinstance(exp.get("provenance"), list) else []
    ended = [s.get("ended") or s.get("started") for s in sessions if isinstance(s, dict)]
    try:
        return pd.Timestamp(ended[-1]).timestamp()
    except (IndexError, TypeError, ValueError):  # no session, or a time that is not one
        return os.path.getmtime(path)


def one_per_run(experiments):
    """Keep the newest file of each run (run_identity); warn about every file left out, naming the kept one."""
    by_run = {}
    for path, exp in experiments:
        by_run.setdefault(run_identity(exp["config"]), []).append((path, exp))
    kept = []
    for files in by_run.values():
        files.sort(key=lambda item: recorded_at(*item))
        kept.append(files[-1])
        for path, _ in files[:-1]:
            print(f"warning: {path} records the same run (configuration, arm and seed) as {files[-1][0]}: counted "
                  f"once, as the newer file", file=sys.stderr)
    return sorted(kept, key=lambda item: item[0])


def is_number(value):
    """A finite int or float (not a bool): NaN and infinities are no accuracy."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def training_of(arm):
    """How an arm's blocks trained: TWO_PHASE, FROZEN or JOINT (the part of its name after the init)."""
    return arm.split("-", 1)[1]


def summary_table(experiments):
    """One row per experiment, sorted by dataset then training-set size; index = experiment number."""
    rows = []
    for path, exp in experiments:
        config, results = exp["config"], exp["results"]
        row = {"dataset": config["dataset"], "train_size": results["actual_train_samples"],
               "n_blocks": config["n_blocks"], "L": config["L"], "modulus_type": config["modulus_type"],
               "learn": config.get("learn", "taps"), "init": config.get("init", "wavelet"), "arm": train.arm_of(config),
               "select": config["select"]}
        row.update({key: results[key] for key in COLUMNS if key in results})
        row.update(optimism_columns(exp["curves"].get(FINAL_PHASE[training_of(row["arm"])])))
        rows.append({**row, "seed": config.get("seed"), "commit": commit_of(exp), "wall_minutes": wall_minutes(exp),
                     "base": base_configuration(config),
                     "protocol": protocol_label(config, results["actual_train_samples"]), "path": path})
    table = pd.DataFrame(rows, columns=COLUMNS + ["seed", "commit", "wall_minutes", "base", "protocol", "path"]).sort_values(
        ["dataset", "train_size", "path"])
    table.index = pd.RangeIndex(1, len(table) + 1, name="exp")
    return table


def base_configuration(config):
    """What a run measured, without its seed, how it ran, or its arm: runs that differ only in those pair up.

    train.run_settings: a flag the run's config lacks (newer than the run)
    counts at its default, or, for --select, at the rule such runs used (test).
    """
    return json.dumps({k: v for k, v in train.run_settings(config).items() if k not in ARM_KEYS}, sort_keys=True)


def optimism_columns(rows):
    """The final phase's test accuracy at its last epoch and at its best test epoch (the optimistic choice)."""
    accuracies = [r["test_acc"] for r in rows or [] if isinstance(r, dict) and is_number(r.get("test_acc"))]
    if not accuracies:
        return {}
    return {"last_epoch_acc": accuracies[-1], "best_test_epoch_acc": max(accuracies)}


def wall_minutes(exp):
    """What a run cost: the wall time its sessions recorded per phase (training and evaluation), summed, in
    minutes; NaN when none recorded it."""
    sessions = [s for s in exp.get("provenance") or [] if isinstance(s, dict)] \
        if isinstance(exp.get("provenance"), list) else []
    seconds = [v for s in sessions if isinstance(s.get("wall_seconds"), dict) for v in s["wall_seconds"].values()
               if is_number(v)]
    return sum(seconds) / 60 if seconds else np.nan


def commit_of(exp):
    """The commit that produced a run (its last session's; '+dirty' when the tree had changes), or None."""
    sessions = [s for s in exp.get("provenance") or [] if isinstance(s, dict)] if isinstance(
        exp.get("provenance"), list) else []
    commits = [f"{s.get('commit')}{'+dirty' if s.get('dirty') else ''}" for s in sessions]
    return ",".join(dict.fromkeys(commits)) or None


# ----------------------------------------------------------------------------- statistics over seeds

def group_table(table):
    """Per configuration (base configuration and arm): n runs and the mean and std of each accuracy."""
    keys = ["dataset", "train_size", "n_blocks", "L", "modulus_type", "learn", "init", "arm", "select"]
    grouped = table.groupby(["base"] + keys, sort=False, dropna=False)
    stats = grouped[list(ACCURACIES) + ["last_epoch_acc", "best_test_epoch_acc"]].agg(["mean", "std"])
    stats.columns = [f"{acc}_{stat}" for acc, stat in stats.columns]
    stats.insert(0, "n", grouped.size())
    stats.insert(1, "commits", grouped["commit"].agg(lambda c: len(set(c.fillna("unknown")))))
    stats = stats.reset_index().drop(columns="base").dropna(axis=1, how="all")
    return stats.sort_values(["dataset", "train_size", "arm"]).reset_index(drop=True)


def paired_comparisons(table):
    """Wavelet two-phase finetune_acc minus each control, paired by seed within a base configuration.

    One row per (base configuration, comparison): n pairs, mean and std of the
    differences, the paired t-test's p-value and the 95 % confidence interval
    of the mean difference (Student's t; NaN below 2 pairs).
    """
    rows = []
    for base, ours in table[table.arm == OURS].groupby("base", sort=False):
        same = table[table.base == base]
        for name, (arm, column) in COMPARISONS.items():
            theirs = same[same.arm == arm]
            pairs = ours.merge(theirs, on="seed", suffixes=("", "_other")).dropna(subset=[column + "_other"])
            if len(pairs):
                commits = set(pairs.commit.fillna("unknown")) | set(pairs.commit_other.fillna("unknown"))
                rows.append({"dataset": ours.dataset.iloc[0], "train_size": ours.train_size.iloc[0],
                             "select": ours["select"].iloc[0], "comparison": name,
                             **difference_stats(pairs.finetune_acc - pairs[column + "_other"]),
                             "commits": len(commits)})
    return pd.DataFrame(rows, columns=["dataset", "train_size", "select", "comparison", "n", "mean_diff", "std_diff",
                                       "p_value", "ci_low", "ci_high", "commits"])


def difference_stats(diffs):
    """n, mean, std, paired t-test p-value and 95 % CI of paired differences."""
    from scipy import stats
    d = np.asarray(diffs, dtype=float)
    n, mean = len(d), float(d.mean())
    if n < 2:
        return {"n": n, "mean_diff": mean, "std_diff": np.nan, "p_value": np.nan, "ci_low": np.nan, "ci_high": np.nan}
    std = float(d.std(ddof=1))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / np.sqrt(n)
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if std > 0 else (0.0 if mean else 1.0)
    return {"n": n, "mean_diff": mean, "std_diff": std, "p_value": p, "ci_low": mean - half, "ci_high": mean + half}


# ----------------------------------------------------------------------------- plots

def configuration_label(row):
    return f"{row.dataset} J={row.n_blocks} L={row.L} {row.modulus_type}"


# The data-efficiency plot's lines: (arm, accuracy column, legend text, marker style).
EFFICIENCY_LINES = [("random-joint", "joint_acc", "random init, joint", "d-."),
                    (OURS, "head_acc", "wavelet, frozen (head only)", "o--"),
                    ("wavelet-frozen", "finetune_acc", "wavelet, frozen (head trained on)", "^:"),
                    (OURS, "finetune_acc", "wavelet, fine-tuned", "s-")]


def plot_data_efficiency(plt, table, path):
    """Accuracy vs training images (log x), mean +- std over seeds, per arm, configuration and selection rule."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = table.apply(configuration_label, axis=1) + ", select " + table["select"]
    for label, runs in table.groupby(labels):
        for arm, column, text, style in EFFICIENCY_LINES:
            rows = runs[runs.arm == arm].dropna(subset=[column])
            if len(rows):
                stats = rows.groupby("train_size")[column].agg(["mean", "std", "size"])
                low, high = stats["size"].min(), stats["size"].max()
                ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), fmt=style, capsize=3,
                            label=f"{text} ({label}, n={low if low == high else f'{low}-{high}'})")
    ax.set(xscale="log", xlabel="training images (log scale)", ylabel="test accuracy (%), mean +- std over seeds",
           title="Data efficiency: does starting from wavelets, then learning them, help?")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    save(plt, fig, path)


def plot_advantage(plt, significance, path):
    """Wavelet fine-tuned minus random joint per training-set size: the mean paired difference, with its 95 %
    confidence interval where there are at least MIN_PAIRS_FOR_CI pairs (none drawn below: say so)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = significance[significance.comparison == "wavelet fine-tuned - random joint"]
    for (dataset, select), d in rows.groupby(["dataset", "select"]):
        d = d.sort_values("train_size")
        ax.plot(d.train_size, d.mean_diff, "o-", label=f"{dataset}, select {select}, n={'/'.join(map(str, d.n))}")
        banded = d[d.n >= MIN_PAIRS_FOR_CI]
        if len(banded):
            ax.errorbar(banded.train_size, banded.mean_diff, fmt="none", capsize=4, ecolor=ax.lines[-1].get_color(),
                        yerr=[banded.mean_diff - banded.ci_low, banded.ci_high - banded.mean_diff])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(xscale="log", xlabel="training images (log scale)", ylabel="accuracy points (paired by seed)",
           title=f"Wavelet init (two-phase) minus random init (joint): mean, 95 % CI where n >= {MIN_PAIRS_FOR_CI} "
                 f"pairs (no band below)")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    if len(rows):
        ax.legend(fontsize=8)
    save(plt, fig, path)


def plot_size_vs_gain(plt, table, path):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = [f"exp{i}\n{n:,}" for i, n in zip(table.index, table.train_size)]
    colours = ["tab:green" if g > 0 else "tab:red" for g in table.finetune_gain]
    ax.bar(range(len(table)), table.finetune_gain, color=colours)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(table)), labels, fontsize=8)
    ax.set(xlabel="experiment and training images", ylabel="finetune_gain (accuracy points)",
           title="Fine-tuning gain per training-set size (green > 0, red <= 0)")
    ax.grid(axis="y", alpha=0.3)
    save(plt, fig, path)


def pearson_r(x, y):
    """Pearson's r, or None when it is undefined (fewer than MIN_POINTS_FOR_R points, or a constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < MIN_POINTS_FOR_R or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def plot_delta_vs_gain(plt, table, path):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = ax.scatter(table.filter_delta_relative, table.finetune_gain, c=np.log10(table.train_size),
                        cmap="viridis")
    fig.colorbar(points, ax=ax, label="log10(training images)")
    for i, row in table.iterrows():
        ax.annotate(f"exp{i}", (row.filter_delta_relative, row.finetune_gain), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    r = pearson_r(table.filter_delta_relative, table.finetune_gain)
    r_text = f"Pearson r = {r:.3f}" if r is not None else \
        f"Pearson r undefined ({len(table)} point(s), constant values or fewer than {MIN_POINTS_FOR_R})"
    ax.set(xlabel="filter_delta_relative (||W - W0|| / ||W0||)", ylabel="finetune_gain (accuracy points)",
           title=f"Filter change vs gain: {r_text}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    save(plt, fig, path)
    return r


# The curve plot's lines per phase: (curve key, line style, legend text).
CURVE_LINES = (("val_acc", "--", "held-out val"), ("test_acc", "-", "test"))


def plot_curves(plt, exp, number, path):
    """Accuracy (held-out and test) and training loss per epoch, Phase B continuing Phase A's epoch count."""
    from matplotlib.ticker import MaxNLocator
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    offset = 0
    for phase, marker in (("phase_a", "o"), ("phase_b", "s"), ("joint", "d")):
        rows = [r for r in exp["curves"].get(phase) or [] if isinstance(r, dict)
                and all(is_number(r.get(k)) for k in ("epoch", "train_loss"))]  # unusable rows: left out
        for key, style, text in CURVE_LINES:
            points = [(offset + r["epoch"], r[key]) for r in rows if is_number(r.get(key))]
            if points:
                acc_ax.plot(*zip(*points), marker + style, markersize=3, label=f"{phase} {text}")
        if rows:
            loss_ax.plot([offset + r["epoch"] for r in rows], [r["train_loss"] for r in rows], marker + "-",
                         markersize=3, label=f"{phase} train")
        offset += len(rows)
    acc_ax.set(xlabel="epoch (Phase B continues Phase A)", ylabel="accuracy (%)")
    loss_ax.set(xlabel="epoch (Phase B continues Phase A)", ylabel="training loss (cross-entropy)")
    if not offset:
        acc_ax.text(0.5, 0.5, "no epochs recorded", ha="center", transform=acc_ax.transAxes)
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    config = exp["config"]
    fig.suptitle(f"exp{number}: {config['dataset']}, {exp['results']['actual_train_samples']:,} images, "
                 f"J={config['n_blocks']} L={config['L']} {config['modulus_type']}, epochs selected by "
                 f"{config['select']}", fontsize=10)
    save(plt, fig, path)


def save(plt, fig, path, rect=(0, 0, 1, 1)):
    """Write a figure atomically (an earlier figure of that name stays whole if the write fails); its plots are
    laid out inside ``rect`` (figure fractions: left, bottom, right, top)."""
    fig.tight_layout(rect=rect)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=110, format=os.path.splitext(path)[1][1:]))
    finally:
        if not plt.isinteractive():
            plt.close(fig)


# ----------------------------------------------------------------------------- learnt filters

def model_from_checkpoint(path, trusted=False, flag="--filters"):
    """(the ScatteringNet of a train.py / quick_check.py checkpoint, rebuilt from the config it carries, the
    run's recorded flags, {} when it has none, and the phase it was saved in, None when it does not say);
    ``flag`` starts the error line.

    Checkpoints carry ``model_config``; older ones only their flags under
    ``config``, with the input shape taken from the dataset's facts.
    """
    try:
        ckpt = load_checkpoint(path, trusted=trusted)
    except CheckpointError as e:
        die(f"{flag}: {e}")
    try:
        saved = ckpt.get("model_config") or ckpt["config"]
        config = ModelConfig.from_dict(saved, None if "model_config" in ckpt else data.INFO[saved["dataset"]])
        model = ScatteringNet(config)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        die(f"{flag}: {path} holds no ScatteringNet these scripts can rebuild ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else ''})")
    return model, ckpt.get("config") or {}, ckpt.get("phase")


def morlet_changes(initial, learnt):
    """Per orientation of block 0: each Morlet parameter at the start, after training, and the change.

    initial, learnt: ScatteringNet.morlet_table() of the same run (initial None: the start is unknown)."""
    after = pd.DataFrame(learnt[0]["orientations"]).rename_axis("orientation")
    if initial is None:
        return after
    before = pd.DataFrame(initial[0]["orientations"])
    return pd.concat({"initial": before, "learnt": after, "change": after - before}, axis=1).rename_axis("orientation")


def plot_filters(plt, block, path, channel=0):
    """Real and imaginary parts per orientation: Morlet init, the learnt filter, and the change (learnt - init);
    the low-pass beside them."""
    learnt = block.diagonal_filters()
    bank = wavelet_kernels.filter_bank(block.L, block.kernel_size)
    psi, phi = learnt["psi"][channel], learnt["phi"][channel]
    rows = [("Morlet Re", bank["psi"].real, bank["phi"]), ("Morlet Im", bank["psi"].imag, None),
            ("learnt Re", psi.real, phi), ("learnt Im", psi.imag, None),
            ("change Re", psi.real - bank["psi"].real, phi - bank["phi"]), ("change Im", psi.imag - bank["psi"].imag, None)]
    fig, axes = plt.subplots(len(rows), block.L + 1, figsize=(1.2 * (block.L + 1), 1.3 * len(rows)))
    for (name, row_psi, row_phi), ax_row in zip(rows, axes):
        scale = np.abs(row_psi).max() or 1.0  # each row on its own symmetric scale (the change is small)
        for l, ax in enumerate(ax_row[:-1]):
            ax.imshow(row_psi[l], cmap="RdBu_r", vmin=-scale, vmax=scale)
            ax.set_title(f"l={l}" if name == "Morlet Re" else "", fontsize=7)
        if row_phi is not None:
            ax_row[-1].imshow(row_phi, cmap="gray")
            ax_row[-1].set_title("phi", fontsize=7)
        else:
            ax_row[-1].axis("off")
        ax_row[0].set_ylabel(name, fontsize=7)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"block 0, input channel {channel}: wavelets before (Morlet), after training, and the change",
                 fontsize=9)
    save(plt, fig, path)


def filters_plot_name(checkpoint, results_dir):
    """filters_block0__<the checkpoint's path under results_dir, '/' as '__'>.png: one figure per checkpoint."""
    relative = os.path.relpath(os.path.realpath(checkpoint), os.path.realpath(results_dir))
    if relative.startswith(os.pardir):
        relative = os.path.realpath(checkpoint).lstrip(os.sep)
    return "filters_block0__" + os.path.splitext(relative)[0].replace(os.sep, "__") + ".png"


def report_filters(plt, checkpoint, plots_dir, results_dir, trusted=False):
    model, run_config, _ = model_from_checkpoint(checkpoint, trusted)
    if not len(model.blocks):
        die(f"--filters: {checkpoint} is the CNN alone (--n-blocks 0): it has no wavelets to draw")
    seed = run_config.get("seed")  # the network as the run began: its seed's draws (unknown without one)
    initial = None if seed is None else runner.build_model(model.config, seed, "cpu")
    block = model.blocks[0]
    if block.lowpass_only:
        die(f"--filters: block 0 of {checkpoint} is low-pass only: it has no wavelets to draw")
    movement = model.filter_movement()[0]
    table = pd.DataFrame(movement["orientations"]).set_index("orientation")
    print(f"block 0 of {checkpoint}: how far each wavelet moved from its Morlet init (mean over input channels)")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    if model.config.learn == "morlet":
        print(f"block 0's Morlet parameters (theta, xi in radians and rad/sample; sigma in pixels), "
              f"{'at the start (its seed rebuilt), ' if initial else ''}after training"
              f"{', and the change' if initial else ''}:")
        changes = morlet_changes(initial and initial.morlet_table(), model.morlet_table())
        print(changes.to_string(float_format=lambda v: f"{v:.4f}"))
    path = os.path.join(plots_dir, filters_plot_name(checkpoint, results_dir))
    plot_filters(plt, block, path)
    print(f"saved {path}")


# ----------------------------------------------------------------------------- the literature's table

# Gauthier, Thérien, Alsène-Racicot et al., "Parametric Scattering Networks" (CVPR 2022), CIFAR-10 with
# training sets of 100 / 500 / 1,000 images: J=2, L=8, AutoAugment, mean and std over 10 seeds on the
# 10,000-image test set. Keyed like train.protocol_row: (head, filters at init, learnt or fixed); their
# "tight frame" init is the Morlet bank, their "learnt" the Morlet parameters.
PUBLISHED = {
    ("linear", "Morlet", "learnt"): {100: (37.84, 0.57), 500: (52.68, 0.31), 1000: (57.43, 0.17)},
    ("linear", "Morlet", "fixed"): {100: (36.01, 0.55), 500: (48.12, 0.25), 1000: (53.25, 0.24)},
    ("linear", "random", "learnt"): {100: (34.81, 0.60), 500: (49.60, 0.39), 1000: (55.72, 0.39)},
    ("linear", "random", "fixed"): {100: (29.77, 0.47), 500: (41.85, 0.41), 1000: (46.30, 0.37)},
    ("WRN-16-8", "Morlet", "learnt"): {100: (43.60, 0.87), 500: (63.13, 0.29), 1000: (70.14, 0.26)},
    ("WRN-16-8", "Morlet", "fixed"): {100: (43.16, 0.78), 500: (61.66, 0.32), 1000: (68.16, 0.27)},
    ("WRN-16-8", "random", "learnt"): {100: (41.42, 0.65), 500: (59.84, 0.40), 1000: (67.40, 0.28)},
    ("WRN-16-8", "random", "fixed"): {100: (32.08, 0.46), 500: (46.84, 0.21), 1000: (52.76, 0.33)},
    ("WRN-16-8 alone", "-", "-"): {100: (38.78, 0.72), 500: (62.97, 0.41), 1000: (71.37, 0.31)},
}
LITERATURE_LIMITS = ("one-sample t-test of our seeds against the published mean, taken as exact: the published "
                     "std and seeds are not in it, and our test set (the CIFAR-10 sample's 1,017 images: about "
                     "+-1.5 points of sampling error at 50 %, shared by every seed) is not theirs")


# The protocol's paired questions, beyond the paper: (row minus row), by seed at each size and budget
# (protocol_label; each row at another budget is also paired with itself at the protocol's budget).
LEARNT_MORLET, LEARNT_TAPS, LEARNT_DENSE = "learnt Morlet parameters", "learnt taps, per channel", "learnt taps, dense"
# The WRN rows' target (docs/LITERATURE.md): the learnt WRN arm named before any run above every published
# WRN-16-8 row at its size (learnt and fixed scattering, the CNN alone) and above our same-budget CNN alone.
WRN_NAMED, CNN_CONTROL = f"WRN-16-8 | Morlet | {LEARNT_MORLET}", "WRN-16-2 alone | - | -"
WRN_BARS = (("WRN-16-8", "Morlet", "learnt"), ("WRN-16-8", "Morlet", "fixed"), ("WRN-16-8 alone", "-", "-"))
PROTOCOL_COMPARISONS = [
    (f"linear | Morlet | {LEARNT_MORLET}", f"linear | Morlet | {LEARNT_TAPS}"),
    (f"linear | Morlet | {LEARNT_MORLET}", "linear | Morlet | fixed"),
    (f"linear | Morlet | {LEARNT_TAPS}", "linear | Morlet | fixed"),
    (f"linear | Morlet | {LEARNT_MORLET}", f"linear | random | {LEARNT_MORLET}"),
    # added after the 500-image runs (docs/LITERATURE.md): wavelet init against random init for the taps, learning
    # against not from random init, and the dense mixing against per-channel taps
    (f"linear | Morlet | {LEARNT_TAPS}", f"linear | random | {LEARNT_TAPS}"),
    (f"linear | random | {LEARNT_TAPS}", "linear | random | fixed"),
    (f"linear | random | {LEARNT_MORLET}", "linear | random | fixed"),
    (f"linear | Morlet | {LEARNT_DENSE}", f"linear | Morlet | {LEARNT_TAPS}"),
    (WRN_NAMED, "WRN-16-8 | Morlet | fixed"),
    (WRN_NAMED, CNN_CONTROL),
    # added after the WRN runs at 100 and 500 images (not named before them): the WRN head against the linear head,
    # same images and seeds; both folders in one analyze.py call (--results-dir <linear folder> <WRN folder>)
    ("WRN-16-8 | Morlet | fixed", "linear | Morlet | fixed"),
    (WRN_NAMED, f"linear | Morlet | {LEARNT_MORLET}"),
    (WRN_NAMED, f"linear | Morlet | {LEARNT_DENSE}"),
]


BUDGET_MARK = " ("  # what starts a protocol_label's budget


def protocol_label(config, train_size):
    """A run's row in the literature's table: train.protocol_row joined by ' | ', then ' (N epochs)' when its
    epoch budget (--head-epochs + --epochs) is not the protocol's at its size (train.PROTOCOL_EPOCHS): a
    longer or shorter run is a row of its own, paired with the protocol's by seed (literature_pairs)."""
    label = " | ".join(train.protocol_row(config))
    epochs = (config.get("head_epochs") or config["epochs"]) + config["epochs"]
    protocol_epochs = train.PROTOCOL_EPOCHS.get(train_size)
    return label if protocol_epochs in (None, epochs) else f"{label}{BUDGET_MARK}{epochs:,} epochs)"


def without_budget(protocol):
    """A protocol_label without its budget: the row at the protocol's budget it is paired with."""
    return protocol.split(BUDGET_MARK)[0]


def budget_of(protocol):
    """A protocol_label's budget part (' (3,000 epochs)'), '' at the protocol's budget."""
    return protocol[len(without_budget(protocol)):]


def published_key(protocol):
    """The PUBLISHED row a run's protocol_label compares with (at any budget), or None."""
    head, init, trains = without_budget(protocol).split(" | ")
    key = (head, init, "fixed" if trains == "fixed" else "learnt" if trains != "-" else "-")
    return key if key in PUBLISHED else None


# The linear rows' target: the best learnt linear arm, chosen on held-out data (--held-out), at least this many
# points above the published learnt + linear row at each size (docs/LITERATURE.md, "Targets").
LEAD_MARGIN = 2.0
HELD_OUT_BATCH = 256


def held_out_accuracies(experiments, table, data_dir=None, trusted=False):
    """{results path: accuracy} of each run's final checkpoint on the training-pool images its training set left
    out (data.split_pool's complement: for one seed and size, the same images in every arm, seen by none), for
    the runs the literature's table may use; NaN where the checkpoint is gone. No test image is involved."""
    usable, pools, accuracies = set(protocol_runs(table).path), {}, {}
    for path, exp in experiments:
        if path not in usable:
            continue
        config = exp["config"]
        checkpoint = os.path.join(os.path.dirname(path), FINAL_PHASE[training_of(train.arm_of(config))], "best.pth")
        if not os.path.isfile(checkpoint):
            print(f"warning: {checkpoint} is missing: no held-out accuracy for {path}", file=sys.stderr)
            accuracies[path] = np.nan
            continue
        seed = config.get("seed") or 0  # the generated dataset depends on it (the real ones do not)
        key = (config["dataset"], data_dir or config.get("data_dir"), config.get("image_size"), seed)
        if key not in pools:
            pools[key] = dataset_split(config, data_dir, "train", "--held-out", seed)
        pool, info = pools[key]
        labels = data.dataset_labels(pool)
        try:
            subset, _ = data.split_pool(labels, data.parse_size(config.get("train_size")), seed,
                                        config.get("select") == "val", data.parse_size(config.get("val_size"), "--val-size"))
        except data.DatasetError as e:
            die(f"--held-out: {path}: {data.error_line(e)}")
        left_out = torch.ones(len(labels), dtype=torch.bool)
        left_out[subset] = False
        chosen = torch.nonzero(left_out).flatten().tolist()
        model = model_from_checkpoint(checkpoint, trusted, "--held-out")[0].eval()
        accuracies[path] = accuracy(model, normalised(pool, chosen, info), labels[chosen])
    return accuracies


@torch.no_grad()
def accuracy(model, images, labels):
    """Top-1 accuracy (%) of ``model`` on (N, C, H, W) ``images``, in batches of HELD_OUT_BATCH."""
    correct = sum(int((model(x).argmax(1) == y).sum())
                  for x, y in zip(images.split(HELD_OUT_BATCH), labels.split(HELD_OUT_BATCH)))
    return 100.0 * correct / len(labels)


def best_learnt_linear(lit):
    """Per size, the learnt linear row with the highest mean held-out accuracy (the choice the linear target
    is judged on), its test accuracy and the target: the published learnt + linear mean + LEAD_MARGIN."""
    learnt = lit[lit.protocol.str.startswith("linear | ") & ~lit.protocol.str.endswith("| fixed")
                 & (lit.protocol.map(budget_of) == "") & lit.held_out.notna()]
    rows = []
    for size, group in learnt.groupby("train_size"):
        best = group.loc[group.held_out.idxmax()]
        published = PUBLISHED[("linear", "Morlet", "learnt")].get(size)
        target = published[0] + LEAD_MARGIN if published else np.nan
        rows.append({"train_size": size, "chosen": best.protocol, "n": best.n, "held_out": best.held_out,
                     "test_mean": best["mean"], "test_std": best["std"], "target": target,
                     "met": bool(best["mean"] >= target) if published else None})
    return pd.DataFrame(rows) if rows else None


def wrn_target(lit):
    """Per size and budget with runs of WRN_NAMED: its test accuracy over seeds against the highest published
    WRN_BARS row and our CNN_CONTROL's mean at the same budget; met when above both (None while the control has
    no run there). budget: 'protocol' (train.PROTOCOL_EPOCHS) or the run's epochs."""
    rows = []
    for r in lit[lit.protocol.map(without_budget) == WRN_NAMED].itertuples():
        bar = max((k for k in WRN_BARS if r.train_size in PUBLISHED[k]), key=lambda k: PUBLISHED[k][r.train_size][0],
                  default=None)
        if bar is None:
            continue
        budget = budget_of(r.protocol)
        control = lit[(lit.protocol == CNN_CONTROL + budget) & (lit.train_size == r.train_size)]
        control_mean = control["mean"].iloc[0] if len(control) else np.nan
        rows.append({"train_size": r.train_size, "budget": budget.strip(" ()") or "protocol", "n": r.n,
                     "ours_mean": r.mean, "ours_std": r.std, "published_bar": PUBLISHED[bar][r.train_size][0],
                     "bar_row": " | ".join(bar), "control_mean": control_mean,
                     "control_n": control["n"].iloc[0] if len(control) else 0,
                     "met": bool(r.mean > PUBLISHED[bar][r.train_size][0] and r.mean > control_mean)
                     if len(control) else None})
    return pd.DataFrame(rows) if rows else None


def protocol_runs(table):
    """The runs the literature's table may use (selected on held-out data or at the last epoch, never on
    test), with ``acc``: each one's final-phase test accuracy (joint_acc, else finetune_acc)."""
    runs = table[table["select"] != "test"].copy()
    runs["acc"] = runs.joint_acc.fillna(runs.finetune_acc)
    return runs


def literature_table(table):
    """Per protocol row and training-set size (runs selected on held-out data or at the last epoch): our
    final-phase test accuracy over seeds, the published mean +- std beside it, and the one-sample test."""
    runs, rows = protocol_runs(table), []
    for (base, protocol, size), group in runs.groupby(["base", "protocol", "train_size"], sort=False):
        key = published_key(protocol)
        published = PUBLISHED[key].get(size) if key else None
        row = {"protocol": protocol, "train_size": size, "select": group["select"].iloc[0], "n": len(group),
               "mean": group.acc.mean(), "std": group.acc.std(), "published_mean": np.nan, "published_std": np.nan,
               "difference": np.nan, "p_value": np.nan}
        if "held_out" in group:  # --held-out: mean over the same seeds, on images no arm trained on
            row["held_out"] = group.held_out.mean()
        row["minutes"] = group.wall_minutes.mean()  # a run's wall time, mean over seeds
        if published:
            test = difference_stats(group.acc - published[0])
            row.update(published_mean=published[0], published_std=published[1], difference=test["mean_diff"],
                       p_value=test["p_value"])
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["protocol", "train_size"]).reset_index(drop=True) if rows else None


def paper_layout(lit):
    """The table as the paper lays it out: a row per protocol row (the paper's order, ours beside each of its
    rows), a column per training-set size, each cell 'ours mean +- std (n) | published mean +- std'. A published
    row of a head we ran (linear, or the WRN head and the CNN alone) with no run of ours is there too, with '-'
    for ours (the WRN-16-8 alone: the reference the WRN target is judged against)."""
    order = {key: i for i, key in enumerate(PUBLISHED)}
    rank = lit.protocol.map(lambda p: order.get(published_key(p), len(order)))
    cells = lit.assign(rank=rank, cell=[
        f"{r.mean:.2f}{f' ± {r.std:.2f}' if r.n > 1 else ''} ({r.n})" + (
            f" | {r.published_mean:.2f} ± {r.published_std:.2f}" if pd.notna(r.published_mean) else "")
        for r in lit.itertuples()])
    for key in published_only(lit):
        cells = pd.concat([cells, pd.DataFrame([
            {"rank": order[key], "protocol": f"{' | '.join(key)} (not run here)", "train_size": size,
             "cell": f"- | {mean:.2f} ± {std:.2f}"} for size, (mean, std) in PUBLISHED[key].items()
            if size in set(lit.train_size)])])
    layout = cells.pivot_table(index=["rank", "protocol"], columns="train_size", values="cell", aggfunc="first")
    layout = layout.droplevel("rank").fillna("-")
    layout.columns = [f"{size} images" for size in layout.columns]
    return layout


def published_only(lit):
    """The PUBLISHED rows no protocol row of ``lit`` compares with, of the heads ``lit`` has runs of."""
    linear = {p.startswith("linear | ") for p in lit.protocol}
    matched = {published_key(p) for p in lit.protocol}
    return [key for key in PUBLISHED if key not in matched and (key[0] == "linear") in linear]


def plot_literature(plt, lit, path):
    """Accuracy vs training images, a panel per head (linear; WRN-16-8 and the CNN alone): ours mean +- std over
    seeds (solid, filled) and each published row it compares with (dashed, open), in the same colour."""
    heads = {"linear": [p for p in lit.protocol.unique() if p.startswith("linear | ")]}
    heads["WRN head or CNN alone"] = [p for p in lit.protocol.unique() if p not in heads["linear"]]
    panels = {title: rows for title, rows in heads.items() if rows}
    lines = max(2 * len(rows) + 1 for rows in panels.values())  # legend lines: ours, published, a reference
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2 + 0.13 * lines), squeeze=False)
    for ax, (title, protocols) in zip(axes[0], panels.items()):
        drawn = set()
        for protocol in protocols:
            ours = lit[lit.protocol == protocol].sort_values("train_size")
            line = ax.errorbar(ours.train_size, ours["mean"], yerr=ours["std"].fillna(0), fmt="o-", capsize=3,
                               label=f"ours: {protocol}")[0]
            key = published_key(protocol)
            if key and key not in drawn:  # a published row once, in the colour of our first row beside it
                drawn.add(key)
                sizes = sorted(PUBLISHED[key])
                means, stds = zip(*(PUBLISHED[key][n] for n in sizes))
                ax.errorbar(sizes, means, yerr=stds, fmt="o--", mfc="none", capsize=3, color=line.get_color(),
                            label=f"published: {' | '.join(key)}")
        for key in published_only(lit[lit.protocol.isin(protocols)]):  # a reference with no run here: grey
            sizes = sorted(PUBLISHED[key])
            means, stds = zip(*(PUBLISHED[key][n] for n in sizes))
            ax.errorbar(sizes, means, yerr=stds, fmt="s:", mfc="none", capsize=3, color="0.5",
                        label=f"published (not run here): {' | '.join(key)}")
        ax.set(xscale="log", xlabel="training images (log scale)", ylabel="test accuracy (%)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # under the panel, off the data
    fig.suptitle("The small-data CIFAR-10 table: ours (mean ± std over seeds) beside Gauthier et al., CVPR 2022",
                 fontsize=9)
    save(plt, fig, path)


def literature_pairs(table):
    """PROTOCOL_COMPARISONS paired by seed at each training-set size and budget (same dataset and selection rule),
    then each row at another budget minus the same row at the protocol's budget."""
    runs, rows = protocol_runs(table), []
    budgets = sorted({budget_of(p) for p in runs.protocol}, key=lambda b: (b != "", b))
    other_budgets = [(p, without_budget(p)) for p in sorted(runs.protocol.unique()) if budget_of(p)]
    for first, second in [(f + b, s + b) for b in budgets for f, s in PROTOCOL_COMPARISONS] + other_budgets:
        ours, theirs = runs[runs.protocol == first], runs[runs.protocol == second]
        pairs = ours.merge(theirs, on=["dataset", "select", "train_size", "seed"], suffixes=("", "_other"))
        for size, group in pairs.groupby("train_size"):
            rows.append({"comparison": f"{first}  -  {second}", "train_size": size,
                         **difference_stats(group.acc - group.acc_other)})
    return pd.DataFrame(rows) if rows else None


def report_literature(plt, table, plots_dir):
    """Print the small-data table, the held-out choice of the best learnt linear arm (--held-out), the WRN
    target and the protocol's paired questions; returns the files written (literature.csv, _layout.csv,
    _best.csv, _wrn_target.csv, _pairs.csv, plot_literature.png)."""
    lit = literature_table(table)
    print("\nthe small-data table (ours: mean +- std over seeds of the final phase's test accuracy; held_out: on the "
          "training-pool images its training set left out; minutes: a run's wall time, mean over seeds; published: "
          "Gauthier et al., CVPR 2022, Table 1):")
    if lit is None:
        print("no run selected on held-out data or at its last epoch")
        return []
    print(lit.to_string(float_format=lambda v: f"{v:.2f}", na_rep="-"))
    print(f"p_value: {LITERATURE_LIMITS}")
    layout = paper_layout(lit)
    print("\nin the paper's layout (ours: mean ± std over seeds (n) | published: mean ± std over 10 seeds):")
    print(layout.to_string())
    tables = {"literature.csv": lit, "literature_layout.csv": layout.reset_index()}
    best = best_learnt_linear(lit) if "held_out" in lit else None
    if "held_out" not in lit:
        print("the best learnt linear arm is chosen on held-out data: add --held-out")
    elif best is None:
        print("no learnt linear run has its final checkpoint here: no held-out choice")
    else:
        print(f"\nthe best learnt linear arm per size, chosen on held-out accuracy (the training-pool images no arm "
              f"trained on), against the target: the published learnt + linear mean + {LEAD_MARGIN:g} points:")
        print(best.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-"))
        tables["literature_best.csv"] = best
    wrn = wrn_target(lit)
    if wrn is not None:
        print(f"\nthe WRN target per size and budget: {WRN_NAMED} (named before the runs) above every published "
              f"WRN-16-8 row (bar_row: the highest) and above our same-budget {CNN_CONTROL} (control_mean):")
        print(wrn.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-"))
        tables["literature_wrn_target.csv"] = wrn
    pairs = literature_pairs(table)
    if pairs is not None:
        print("\npaired by seed (accuracy points; p: paired t-test; CI: 95 %; both rows on the same test images):")
        print(pairs.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-"))
        tables["literature_pairs.csv"] = pairs
    for name, frame in tables.items():
        atomic_write(os.path.join(plots_dir, name), lambda f, frame=frame: f.write(frame.to_csv(index=False).encode()))
    plot_literature(plt, lit, os.path.join(plots_dir, "plot_literature.png"))
    return [os.path.join(plots_dir, name) for name in [*tables, "plot_literature.png"]]


# ----------------------------------------------------------------------------- deformation stability

# --stability's deformations and their strengths, from none to strong. A scattering transform is
# Lipschitz-stable to small deformations and nearly invariant to translations below its scale 2^J
# (Mallat, "Group Invariant Scattering", CPAM 2012); a learnt front-end may lose that. translation:
# a circular shift along both axes (pixels); rotation (degrees) and scaling (zoom factor) about the
# centre, bilinear with reflected borders; deformation: a smooth random warp, its largest displacement
# in pixels. The first strength of each is the identity.
STABILITY_STRENGTHS = {"translation": (0, 1, 2, 4, 8), "rotation": (0, 5, 10, 20, 30),
                       "scaling": (1.0, 1.05, 1.1, 1.2, 1.3), "deformation": (0.0, 0.5, 1.0, 2.0, 3.0)}
# The warp's displacement field: white noise smoothed by a Gaussian of this width (pixels), then scaled.
WARP_SMOOTHNESS = 4.0
STABILITY_IMAGES = 256
# The test images --stability measures are drawn with this seed (the same for every checkpoint).
STABILITY_SEED = 0
STABILITY_BATCH = 128


def deform(images, kind, strength, generator=None):
    """``images`` (B, C, H, W) under one deformation of STABILITY_STRENGTHS; the identity strength returns them."""
    if strength == STABILITY_STRENGTHS[kind][0]:
        return images
    if kind == "translation":
        return torch.roll(images, (int(strength), int(strength)), dims=(-2, -1))
    B, _, H, W = images.shape
    if kind == "deformation":
        return warp(images, smooth_displacement(B, H, W, strength, generator))
    angle, zoom = (math.radians(strength), 1.0) if kind == "rotation" else (0.0, float(strength))
    c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
    affine = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype).expand(B, 2, 3)
    grid = torch.nn.functional.affine_grid(affine, list(images.shape), align_corners=False)  # (B, H, W, 2)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection",
                                           align_corners=False)


def smooth_displacement(B, H, W, largest, generator=None):
    """(B, 2, H, W) random displacements in pixels, Gaussian-smoothed (WARP_SMOOTHNESS), each image's largest = ``largest``."""
    noise = torch.randn(B * 2, 1, H, W, generator=generator)
    radius = int(3 * WARP_SMOOTHNESS)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-t ** 2 / (2 * WARP_SMOOTHNESS ** 2))
    g = g / g.sum()
    padded = torch.nn.functional.pad(noise, (radius,) * 4, mode="circular")
    smooth = torch.nn.functional.conv2d(torch.nn.functional.conv2d(padded, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))
    field = smooth.view(B, 2, H, W)  # (B*2, 1, H, W) -> (B, 2, H, W)
    size = field.pow(2).sum(1, keepdim=True).sqrt().amax((-2, -1), keepdim=True)  # (B, 1, 1, 1)
    return field * (largest / size)


def warp(images, displacement):
    """images (B, C, H, W) sampled at u + displacement(u) (pixels; channel 0 along the width), bilinear, reflected."""
    B, _, H, W = images.shape
    identity = torch.nn.functional.affine_grid(torch.eye(2, 3).expand(B, 2, 3), [B, 1, H, W], align_corners=False)
    scale = torch.tensor([2.0 / W, 2.0 / H])  # pixels -> grid_sample's [-1, 1] units
    grid = identity + displacement.permute(0, 2, 3, 1) * scale  # (B, 2, H, W) -> (B, H, W, 2)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@torch.no_grad()
def relative_change(features, images, moved):
    """Per image ||Phi(moved) - Phi(images)|| / ||Phi(images)||, Phi = ``features``, as a NumPy array."""
    out = []
    for x, y in zip(images.split(STABILITY_BATCH), moved.split(STABILITY_BATCH)):
        a, b = features(x).flatten(1), features(y).flatten(1)
        out.append(((b - a).norm(dim=1) / a.norm(dim=1)).numpy())
    return np.concatenate(out)


def stability_rows(model, images, seed=STABILITY_SEED):
    """[{kind, strength, mean, std}] of relative_change over STABILITY_STRENGTHS, and the 'unrelated' baseline:
    each image against another test image (a random pairing)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for kind, strengths in STABILITY_STRENGTHS.items():
        for strength in strengths:
            change = relative_change(model.features, images, deform(images, kind, strength, generator))
            rows.append({"kind": kind, "strength": strength, "mean": float(change.mean()), "std": float(change.std())})
    others = images[torch.randperm(len(images), generator=generator)]
    change = relative_change(model.features, images, others)
    rows.append({"kind": "unrelated", "strength": None, "mean": float(change.mean()), "std": float(change.std())})
    return rows


def stability_images(config, data_dir, count):
    """``count`` test images of a checkpoint's dataset, normalised as training saw them (STABILITY_SEED's draw)."""
    test, info = dataset_split(config, data_dir, "test", "--stability")
    n = len(data.dataset_labels(test))
    return normalised(test, torch.randperm(n, generator=torch.Generator().manual_seed(STABILITY_SEED))[:count].tolist(),
                      info)


def dataset_split(config, data_dir, split, flag, seed=0):
    """(the 'train' or 'test' split of a run's dataset, its facts); one error line naming ``flag`` if unreadable.
    ``seed`` draws the generated dataset ('synthetic') as a run of that seed did."""
    try:
        train_set, test, info = data.load_dataset(config["dataset"], data_dir or config.get("data_dir") or "./data",
                                                  seed, config.get("image_size"))
    except data.DatasetError as e:
        die(f"{flag}: {data.error_line(e)}")
    return (train_set if split == "train" else test), info


def normalised(dataset, indices, info):
    """The images at ``indices`` of an in-memory (uint8 images, labels) pair or an ImageFolder, (N, C, H, W),
    normalised as training saw them (no augmentation)."""
    pixels = dataset[0][indices] if isinstance(dataset, tuple) else torch.stack([dataset[i][0] for i in indices])
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (info.mean, info.std))
    return (pixels.float() / 255 - mean) / std if pixels.dtype == torch.uint8 else pixels


def stability_model(config, phase):
    """What a checkpoint's scattering is, as the literature table names its rows (protocol_label: 'linear |
    Morlet | fixed'); a Phase A checkpoint holds the blocks as they started (its head alone trained): fixed."""
    head, init, _ = train.protocol_row(config)
    label = protocol_label(config, config.get("train_size"))
    return f"{head} | {init} | fixed{budget_of(label)}" if phase == "phase_a" else label


def report_stability(plt, checkpoints, plots_dir, count, data_dir=None, trusted=False):
    if count < 2:
        die(f"--stability-images must be >= 2 (the baseline pairs unrelated images), got {count}")
    rows, images = [], {}
    for checkpoint in checkpoints:
        model, config, phase = model_from_checkpoint(checkpoint, trusted, "--stability")
        if not len(model.blocks):
            die(f"--stability: {checkpoint} is the CNN alone (--n-blocks 0): it has no scattering to measure")
        key = (config.get("dataset"), data_dir or config.get("data_dir"), config.get("image_size"))
        if key not in images:
            images[key] = stability_images(config, data_dir, count)
        about = {"checkpoint": checkpoint, "model": stability_model(config, phase),
                 "train_size": config.get("train_size"), "seed": config.get("seed")}
        measured = stability_rows(model, images[key])
        unrelated = measured[-1]["mean"]
        rows += [{**about, **row, "of_unrelated": row["mean"] / unrelated} for row in measured]
    table = pd.DataFrame(rows)
    summary = stability_summary(table)
    print("relative change of the scattering coefficients, ||Phi(x~) - Phi(x)|| / ||Phi(x)||, mean over "
          f"{count} test images (unrelated: x~ another test image; of_unrelated: the change over the unrelated one)")
    print(table.drop(columns="checkpoint").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\nper model and training-set size, over its checkpoints (n; std: over checkpoints, e.g. seeds)")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for name, frame in (("stability.csv", table), ("stability_summary.csv", summary)):
        atomic_write(os.path.join(plots_dir, name), lambda f, frame=frame: f.write(frame.to_csv(index=False).encode()))
    plot_stability(plt, summary, os.path.join(plots_dir, "plot_stability.png"))


def stability_summary(table):
    """Per (model, train_size, kind, strength): n checkpoints, the mean and std over them of the mean change and
    of the change over the unrelated-image baseline (std NaN for one checkpoint)."""
    keys = ["model", "train_size", "kind", "strength"]
    grouped = table.groupby(keys, sort=False, dropna=False)
    summary = grouped[["mean", "of_unrelated"]].agg(["mean", "std"])
    summary.columns = ["change", "change_std", "of_unrelated", "of_unrelated_std"]
    summary.insert(0, "n", grouped.size())
    return summary.reset_index()


def plot_stability(plt, summary, path):
    """Two rows of panels, one per deformation: the relative change, and the same over the change between
    unrelated images (comparable across models whose coefficients spread differently); a curve per model and
    training-set size, error bars: std over its checkpoints."""
    kinds = list(STABILITY_STRENGTHS)
    curves = list(summary.groupby(["model", "train_size"], sort=False, dropna=False))
    legend_inches, height = 0.15 + 0.2 * len(curves), 6.0 + 0.2 * len(curves)  # a legend line per curve, below
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.4 * len(kinds), height), sharey="row")
    units = {"translation": "shift (pixels)", "rotation": "angle (degrees)", "scaling": "zoom factor",
             "deformation": "largest displacement (pixels)"}
    for (model, size), rows in curves:
        n = int(rows["n"].iloc[0])
        label = f"{model}, train size {size} ({n} checkpoint{'s' if n > 1 else ''})"
        for row_axes, column in zip(axes, ("change", "of_unrelated")):
            for ax, kind in zip(row_axes, kinds):
                curve = rows[rows.kind == kind]
                line = ax.errorbar(curve.strength, curve[column], yerr=curve[column + "_std"].fillna(0), marker="o",
                                   capsize=2, label=label if ax is axes[0][0] else None)[0]
                if column == "change":
                    ax.axhline(float(rows[rows.kind == "unrelated"]["change"].iloc[0]), color=line.get_color(),
                               ls="--", lw=0.8)
    for ax, kind in zip(axes[0], kinds):
        ax.set(title=kind)
    for ax, kind in zip(axes[1], kinds):
        ax.set(xlabel=units[kind])
    axes[0][0].set_ylabel("||Phi(x~) - Phi(x)|| / ||Phi(x)||\n(dashed: unrelated images)")
    axes[1][0].set_ylabel("the same, over the change\nbetween unrelated images")
    fig.legend(loc="lower center", fontsize=7, ncol=1)
    save(plt, fig, path, rect=(0, legend_inches / height, 1, 1))


# ----------------------------------------------------------------------------- main

def pyplot(interactive):
    import matplotlib

    if not interactive:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def writable_plots_dir(args):
    """--plots-dir (default <the first --results-dir>/plots), created; one line and exit 2 when it cannot be written."""
    plots_dir = args.plots_dir or os.path.join(args.results_dir[0], "plots")
    if os.path.exists(plots_dir) and not os.path.isdir(plots_dir):
        die(f"{plots_dir} is a file: the plots go into a folder of that name (move the file away)")
    try:
        os.makedirs(plots_dir, exist_ok=True)
    except OSError as e:
        die(f"cannot create {plots_dir} ({e.strerror or e})")
    if not os.access(plots_dir, os.W_OK | os.X_OK):
        die(f"{plots_dir} is not writable")
    return plots_dir


def main(args):
    for folder in args.results_dir:
        if not os.path.isdir(folder):
            die(f"--results-dir {folder} is not a folder")
    if args.held_out and not args.literature:
        die("--held-out is for --literature (it chooses the best learnt linear arm of that table)")
    let_writes_fail()
    plt = pyplot(args.interactive)
    try:
        if args.filters:
            report_filters(plt, args.filters, writable_plots_dir(args), args.results_dir[0], args.trust_checkpoint)
        elif args.stability:
            report_stability(plt, args.stability, writable_plots_dir(args), args.stability_images,
                             args.data_dir, args.trust_checkpoint)
        else:
            analyze_results(plt, args)
    except WriteError as e:  # a full disk: the tables and figures written before stay whole
        die(e)
    if args.interactive:
        plt.show()


def format_table(table):
    """The summary as text: accuracies to 0.01 points, filter deltas to 4 decimals, counts with separators."""
    formats = {"head_acc": "{:.2f}", "finetune_acc": "{:.2f}", "finetune_gain": "{:+.2f}", "joint_acc": "{:.2f}",
               "last_epoch_acc": "{:.2f}", "best_test_epoch_acc": "{:.2f}",
               "filter_delta_l2": "{:.4f}", "filter_delta_relative": "{:.4f}", "train_size": "{:,}",
               "n_params_total": "{:,}", "n_params_trainable": "{:,}"}
    return table.drop(columns="path").to_string(na_rep="-", formatters={k: f.format for k, f in formats.items()})


def analyze_results(plt, args):
    experiments = load_experiments(args.results_dir)
    if not experiments:
        folders = " or ".join(args.results_dir)
        die(f"no usable results_*.json under {folders} (run train.py --save-dir {args.results_dir[0]}/... first)")
    table = summary_table(experiments)
    plots_dir = writable_plots_dir(args)
    if args.held_out:
        table["held_out"] = table.path.map(held_out_accuracies(experiments, table, args.data_dir, args.trust_checkpoint))
    groups, significance = group_table(table), paired_comparisons(table)
    print(format_table(table.drop(columns=["seed", "base", "commit", "wall_minutes", "protocol", "held_out"],
                                  errors="ignore")))
    print("\nper configuration and selection rule (mean and std over seeds, n runs; last_epoch / best_test_epoch: the "
          "same runs' final-phase test accuracy at the last epoch and at the best test epoch, the optimistic choice):")
    print(groups.to_string(float_format=lambda v: f"{v:.2f}", na_rep="-"))
    print("\npaired by seed (accuracy points; p: paired t-test; CI: 95 %):")
    print(significance.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-") if len(significance)
          else "no wavelet two-phase run has a control with the same seed and configuration")
    mixed = len(groups[groups.commits > 1]) + len(significance[significance.commits > 1])
    if mixed:
        print(f"warning: {mixed} row(s) above combine runs of different code versions (column commits; the "
              f"commit of each run is in runs.csv)", file=sys.stderr)
    names = ("summary.csv", "runs.csv", "significance.csv", "plot_size_vs_gain.png", "plot_delta_vs_gain.png",
             "plot_data_efficiency.png", "plot_advantage.png")
    saved = [os.path.join(plots_dir, name) for name in names]
    for path, frame, index in ((saved[0], groups, False), (saved[1], table.drop(columns="base"), True),
                               (saved[2], significance, False)):
        atomic_write(path, lambda f: f.write(frame.to_csv(index=index).encode()))
    fine_tuned = table[table.arm.map(training_of) == TWO_PHASE]  # the gain plots are about learning the filters
    plot_size_vs_gain(plt, fine_tuned, saved[3])
    r = plot_delta_vs_gain(plt, fine_tuned, saved[4])
    plot_data_efficiency(plt, table, saved[5])
    plot_advantage(plt, significance, saved[6])
    if args.curves:
        by_path = dict(experiments)
        for number, path in table.path.items():
            saved.append(os.path.join(plots_dir, "curves", f"curves_exp{number}.png"))
            plot_curves(plt, by_path[path], number, saved[-1])
    if args.literature:
        saved += report_literature(plt, table, plots_dir)
    print(f"Pearson r (filter_delta_relative vs finetune_gain): {'undefined' if r is None else f'{r:.3f}'}")
    print("saved " + "\n      ".join(saved))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
