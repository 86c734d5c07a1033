"""sweep.py: the grid, the cells' states, and a real sweep interrupted, failing and carried on."""
import glob
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import data
import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "synthetic", "--n-blocks", "1", "--L", "2", "--global-batch-size", "50", "--print-freq", "0",
        "--device", "cpu", "--seed", "0"]


def test_axes_shared_flags_and_random_init_goes_joint():
    axes, shared = sweep.parse_grid(["--train-size", "0.01,0.05", "--epochs", "3", "--init", "wavelet,random",
                                     "--amp"])
    assert axes == {"--train-size": ["0.01", "0.05"], "--init": ["wavelet", "random"]}
    assert shared == ["--epochs", "3", "--amp"]
    grid = sweep.cells(axes, shared, None)
    assert [name for name, _, _ in grid] == ["arm=wavelet-two-phase__train-size=0.01", "arm=wavelet-two-phase__train-size=0.05",
                                          "arm=random-joint__train-size=0.01", "arm=random-joint__train-size=0.05"]
    assert grid[2][1:] == (["--init", "random", "--joint", "--epochs", "3", "--amp", "--train-size", "0.01"], "random-joint")
    assert "--joint" not in grid[0][1]


def test_arms_and_explicit_joint_axis():
    _, argv, _ = sweep.cells({}, ["--init", "random"], None)[0]
    assert argv == ["--init", "random", "--joint"]  # random init's protocol when the grid says nothing
    grid = sweep.cells({"--joint": ["x"]}, [], ["wavelet-frozen"])
    assert grid[0][1] == ["--init", "wavelet", "--freeze-extractor", "--joint", "x"]


@pytest.mark.parametrize("text,slots", [("0,1", ["0", "1"]), ("0-3:2", ["0", "0", "1", "1", "2", "2", "3", "3"]),
                                        ("2", ["2"])])
def test_gpu_slots(text, slots):
    assert sweep.parse_gpus(text) == slots


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "a-b"], "error: --gpus: expected a list like 0,1,2,3 or a range like 0-3:2, got 'a-b'"),
    (["--arm", "magic"], "error: --arm: unknown arm(s) ['magic']; choose from ['wavelet-two-phase', 'wavelet-frozen', "
                         "'wavelet-joint', 'random-joint', 'cnn-joint']"),
    (["--no-such-flag", "1"], "error: sweep.py: '--no-such-flag' is not a train.py flag a sweep can set (see python "
                              "train.py --help)"),
    (["--save-dir", "x"], "error: sweep.py: '--save-dir' is not a train.py flag a sweep can set (see python train.py "
                          "--help)"),
])
def test_bad_sweeps_are_one_line(argv, message, tmp_path, capsys):
    args, extra = sweep.get_args_parser().parse_known_args(["--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit) as e:
        sweep.main(args, extra)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == message


def run_sweep(out, *flags):
    return subprocess.run([sys.executable, "sweep.py", "--out", str(out), *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_a_sweep_interrupted_and_failing_carries_on_to_completion(tmp_path):
    flags = [*TINY, "--epochs", "2", "--train-size", "300,400,99999"]  # 99999 > 4000 images: that cell fails
    proc = subprocess.Popen([sys.executable, "sweep.py", "--out", str(tmp_path), *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sweep.default_sigint)  # as from a terminal, also under `cmd &`
    first = tmp_path / "train-size=300__seed=0"
    while not (first / "phase_a" / "last.pth").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted (Ctrl-C)" in err
    assert sweep.state_of(str(first)) == "interrupted"
    dry = run_sweep(tmp_path, *flags, "--dry-run")
    assert dry.stdout.splitlines() == ["interrupted  train-size=300__seed=0", "new          train-size=400__seed=0",
                                       "new          train-size=99999__seed=0", "0 of 3 cells done"]
    resumed = run_sweep(tmp_path, *flags)
    assert resumed.returncode == 1
    assert "[sweep] done 2 / running 0 / failed 1 / left 0" in resumed.stdout
    failing = tmp_path / "train-size=99999__seed=0"
    assert resumed.stderr.strip() == f"[sweep] failed: train-size=99999__seed=0 (exit code 2); log: " \
                                     f"{failing / 'train.log'}"
    assert "--train-size count must be between 1 and the dataset size 4000" in (failing / "train.log").read_text()
    (results,) = glob.glob(str(first / "results_*.json"))
    saved = json.load(open(results))
    assert len(saved["curves"]["phase_a"]) == len(saved["curves"]["phase_b"]) == 2 and "finetune_acc" in saved["results"]
    again = run_sweep(tmp_path, *flags)  # the finished cells are skipped
    assert "[sweep] 3 cells, 2 already done, 1 to run" in again.stdout


def test_print_commands_for_a_scheduler(tmp_path):
    proc = run_sweep(tmp_path, "--arm", "wavelet-two-phase,random-joint", "--seed", "0,1", "--dataset", "synthetic",
                     "--print-commands")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 4
    assert lines[3].endswith(f"train.py --init random --joint --dataset synthetic --seed 1 --save-dir "
                             f"{tmp_path}/arm=random-joint__seed=1")
    spaced = run_sweep(tmp_path / "my runs", "--seed", "0", "--dataset", "synthetic", "--data-dir", "/tmp/my data",
                       "--print-commands")
    argv = shlex.split(spaced.stdout)  # runnable as printed: the shell splits it back into the same words
    assert argv[-4:] == ["--data-dir", "/tmp/my data", "--save-dir", f"{tmp_path}/my runs/seed=0"]


def test_extending_a_grid_reruns_nothing_whatever_the_earlier_command_looked_like(tmp_path):
    tiny = TINY[:TINY.index("--seed")]
    flags = ["--arm", "wavelet-two-phase,random-joint", *tiny, "--train-size", "200", "--epochs", "1",
             "--head-epochs", "1", "--jobs", "2", "--threads", "1"]
    first = run_sweep(tmp_path, *flags, "--seed", "0")
    assert first.returncode == 0, first.stderr
    # a folder reached under another name (as before cells were named by --seed) is still found by its settings
    os.rename(tmp_path / "arm=random-joint__train-size=200__seed=0", tmp_path / "arm=random-joint")
    extended = run_sweep(tmp_path, *flags, "--seed", "0,1")
    assert extended.returncode == 0, extended.stderr
    assert "[sweep] 4 cells, 2 already done, 2 to run" in extended.stdout
    assert sorted(os.listdir(tmp_path)) == ["arm=random-joint", "arm=random-joint__train-size=200__seed=1",
                                            "arm=wavelet-two-phase__train-size=200__seed=0",
                                            "arm=wavelet-two-phase__train-size=200__seed=1"]
    assert all(len(glob.glob(str(tmp_path / d / "results_*.json"))) == 1 for d in os.listdir(tmp_path))
    dry = run_sweep(tmp_path, *flags, "--seed", "0,1", "--dry-run")
    assert f"done         arm=random-joint__train-size=200__seed=0 (its run is in {tmp_path}/arm=random-joint" \
        in dry.stdout and "4 of 4 cells done" in dry.stdout


def test_a_changed_shared_flag_is_never_counted_as_done(tmp_path, capsys):
    flags = [*TINY, "--train-size", "200", "--epochs", "1", "--head-epochs", "1"]
    assert run_sweep(tmp_path, *flags).returncode == 0
    args, extra = sweep.get_args_parser().parse_known_args(["--out", str(tmp_path), *flags[:-1], "2"])
    with pytest.raises(SystemExit) as e:
        sweep.main(args, extra)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: --out {tmp_path}: {tmp_path}/train-size=200__seed=0 holds a run of other settings (--head-epochs 1 "
        f"(now 2)): a changed shared flag is a new grid; choose another --out")


BAD_GRIDS = [
    (["--seed", "0,0"], "error: sweep.py: cell seed=0 is in the grid twice (a value repeated on an axis)"),
    (["--seed", "0,00"], "error: sweep.py: cells seed=0 and seed=00 are the same run"),
    (["--seed", "0,x"], "error: sweep.py: cell seed=x: argument --seed: invalid int value: 'x'"),
    (["--seed", ",0"], "error: sweep.py: cell seed=,0: argument --seed: invalid int value: ',0'"),
    (["--seed", "0,-1"], "error: sweep.py: cell seed=-1: --seed must be >= 0, got -1"),
    (["--kernel-size", "7,1"], "error: sweep.py: cell kernel-size=1: kernel size K must be an odd integer >= 3 (the grid "
                               "is centred on 0; a 1 x 1 wavelet is zero once its mean is removed), got 1"),
    (["--arm", "wavelet-two-phase,random-joint", "--init", "random"],
     "error: sweep.py: cell arm=wavelet-two-phase: its flags (--init wavelet --dataset synthetic --init random) make a "
     "random-two-phase run; leave --init, --joint and --freeze-extractor to --arm"),
    (["--init", "wavelet,random", "--joint"],
     "error: sweep.py: cell arm=wavelet-two-phase: its flags (--init wavelet --dataset synthetic --joint) make a "
     "wavelet-joint run; leave --init, --joint and --freeze-extractor to --arm"),
]


@pytest.mark.parametrize("argv,message", BAD_GRIDS)
def test_every_cell_is_checked_before_any_runs(argv, message, tmp_path, capsys):
    args, extra = sweep.get_args_parser().parse_known_args(["--out", str(tmp_path / "out"), "--dataset", "synthetic",
                                                            *argv])
    with pytest.raises(SystemExit) as e:
        sweep.main(args, extra)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == message
    assert not (tmp_path / "out").exists()


def test_unwritable_out_and_a_second_sweep_are_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for out, message in [(tmp_path / "afile" / "sub", f"--out {tmp_path}/afile/sub cannot be created (Not a directory)"),
                         (tmp_path, f"--out {tmp_path} is in use by another sweep (pid {os.getpid()}); wait for it to "
                                    f"finish or choose another --out")]:
        (tmp_path / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a live sweep holds tmp_path
        args, extra = sweep.get_args_parser().parse_known_args(["--out", str(out), *TINY])
        with pytest.raises(SystemExit) as e:
            sweep.main(args, extra)
        assert e.value.code == 2 and capsys.readouterr().err.strip() == f"error: {message}"


@pytest.mark.parametrize("results", [None, 5, "done"])
def test_a_results_json_without_results_is_not_done(results, tmp_path, capsys):
    (tmp_path / "results_20260101-000000.json").write_text(json.dumps({"config": {}, "results": results}))
    assert sweep.state_of(str(tmp_path)) == "new"
    assert capsys.readouterr().err.strip() == (f"warning: {tmp_path}/results_20260101-000000.json holds no readable "
                                               f"results; its cell is not counted as done")


def test_a_cell_whose_folder_cannot_be_made_fails_alone(tmp_path):
    (tmp_path / "train-size=200__seed=0").write_text("a file where the cell's folder goes")
    proc = run_sweep(tmp_path, *TINY, "--train-size", "200,300", "--epochs", "1", "--head-epochs", "1")
    assert proc.returncode == 1 and "[sweep] done 1 / running 0 / failed 1 / left 0" in proc.stdout
    assert proc.stderr.strip() == (f"[sweep] failed: train-size=200__seed=0 (File exists writing "
                                   f"{tmp_path}/train-size=200__seed=0)")


def test_sigterm_stops_the_running_cells_too(tmp_path):
    proc = subprocess.Popen([sys.executable, "sweep.py", "--out", str(tmp_path), *TINY, "--epochs", "50"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    cell = tmp_path / "seed=0"
    while not (cell / "phase_a" / "last.pth").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "[sweep] stopped (SIGTERM): the running cells saved their last epoch" in err
    assert sweep.state_of(str(cell)) == "interrupted"
    assert not (cell / ".lock").exists() and not (tmp_path / ".lock").exists()  # nothing left running or holding it


def test_a_grid_through_submitit_survives_a_killed_job_and_matches_the_local_executor(tmp_path):
    grid = [*TINY[:TINY.index("--seed")], "--train-size", "100,200", "--seed", "0", "--epochs", "1",
            "--head-epochs", "1", "--threads", "1"]
    out = tmp_path / "submitit"
    proc = subprocess.Popen([sys.executable, "sweep.py", "--out", str(out), "--executor", "submitit-local", *grid],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = out / "train-size=100__seed=0"
    while not (victim / "phase_a" / "last.pth").exists() and proc.poll() is None:
        time.sleep(0.01)
    record = json.load(open(victim / "job.json"))
    os.kill(int(open(victim / ".lock").read().split()[0]), signal.SIGKILL)  # train.py, then its job: as SLURM kills
    os.kill(int(record["job_id"]), signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "[sweep] done 1 / failed 1" in stdout
    assert stderr.strip() == f"[sweep] failed: train-size=100__seed=0 (job state interrupted); log: {victim}/train.log"
    again = run_sweep(out, "--executor", "submitit-local", *grid)  # the same command: resumes the killed cell only
    assert again.returncode == 0, again.stderr
    assert "2 cells, 1 already done, 1 to run" in again.stdout and "[sweep] done 1 / failed 0" in again.stdout
    local = run_sweep(tmp_path / "local", "--jobs", "2", *grid)
    assert local.returncode == 0, local.stderr
    tables = []
    for folder in (out, tmp_path / "local"):
        assert run_script_analyze(folder).returncode == 0
        table = pd.read_csv(folder / "plots" / "runs.csv")
        tables.append(table[["train_size", "seed", "head_acc", "finetune_acc"]].sort_values(["train_size", "seed"]))
    pd.testing.assert_frame_equal(tables[0].reset_index(drop=True), tables[1].reset_index(drop=True))


def run_script_analyze(folder):
    return subprocess.run([sys.executable, "analyze.py", "--results-dir", str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_submitit_executor_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    args, extra = sweep.get_args_parser().parse_known_args(["--out", str(tmp_path / "out"), "--executor", "slurm",
                                                            *TINY])
    with pytest.raises(SystemExit) as e:
        sweep.main(args, extra)
    assert e.value.code == 2 and capsys.readouterr().err.strip() == (
        "error: --executor slurm needs the submitit package: pip install -r requirements-optional.txt")
    assert not (tmp_path / "out").exists()


def test_a_cell_of_two_tasks_trains_as_two_ddp_ranks(tmp_path):
    proc = run_sweep(tmp_path, "--executor", "submitit-local", "--tasks-per-node", "2", *TINY, "--train-size", "200",
                     "--epochs", "1", "--head-epochs", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    (path,) = glob.glob(str(tmp_path / "train-size=200__seed=0" / "results_*.json"))
    saved = json.load(open(path))
    assert saved["provenance"][-1]["world_size"] == 2 and saved["results"]["replicas_in_sync"] is True


def test_the_literature_preset_is_every_protocol_arm_size_and_seed(tmp_path, capsys):
    args, extra = sweep.get_args_parser().parse_known_args(["--out", str(tmp_path / "lit"), "--preset", "literature",
                                                            "--dataset", "synthetic", "--dry-run"])
    assert sweep.main(args, extra) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 12 * 3 * 3 + 1 and lines[-1] == "0 of 108 cells done"
    grid = sweep.protocol_cells({}, ["--dataset", "synthetic"], ["wrn-wavelet-morlet", "cnn-alone-wrn-16-2"])
    name, argv, _ = grid[0]
    assert name == "wrn-wavelet-morlet__train-size=100__seed=0"
    config = sweep.checked_config(name, argv, None)
    assert (config["train_size"], config["head_epochs"] + config["epochs"], config["eval_every"]) == ("100", 800, 40)
    assert (config["select"], config["augment"], config["joint"], config["learn"]) == ("last", "autoaugment", True,
                                                                                      "morlet")
    alone = sweep.checked_config(*grid[-1][:2], None)
    assert (alone["n_blocks"], alone["head_width"], alone["optimizer"]) == (0, 2, "sgd")
    one_seed = sweep.protocol_cells({}, ["--dataset", "synthetic", "--seed", "2"], ["linear-wavelet-fixed"])
    assert [name for name, _, _ in one_seed] == [f"linear-wavelet-fixed__train-size={n}__seed=2" for n in (100, 500, 1000)]
    assert all(argv.count("--seed") == 1 and argv[-1] == "2" for _, argv, _ in one_seed)
    for argv, message in ((["--epochs", "5"], "--preset literature sets --epochs itself (only --seed may narrow it)"),
                          (["--arm", "wavelet-two-phase"], "--arm: unknown protocol arm(s) ['wavelet-two-phase']; "
                                                           "choose from " + str(list(sweep.train.PROTOCOL_ARMS)))):
        args, extra = sweep.get_args_parser().parse_known_args(["--out", str(tmp_path / "x"), "--preset", "literature",
                                                                "--dataset", "synthetic", *argv])
        with pytest.raises(SystemExit):
            sweep.main(args, extra)
        assert capsys.readouterr().err.strip() == "error: " + message


def test_a_tiny_literature_sweep_and_its_table_beside_the_published_numbers(tmp_path, monkeypatch, capsys):
    import analyze
    from scipy import stats
    monkeypatch.setattr(sweep.train, "PROTOCOL_EPOCHS", {100: 2})
    out = tmp_path / "lit"
    args, extra = sweep.get_args_parser().parse_known_args([
        "--out", str(out), "--preset", "literature", "--arm", "linear-wavelet-fixed,linear-wavelet-morlet",
        "--seed", "0,1", "--jobs", "2", "--dataset", "synthetic", "--n-blocks", "1", "--L", "2",
        "--global-batch-size", "50", "--print-freq", "0", "--device", "cpu"])
    assert sweep.main(args, extra) == 0
    analyze.main(analyze.get_args_parser().parse_args(["--results-dir", str(out), "--literature"]))
    assert "Gauthier et al., CVPR 2022" in capsys.readouterr().out
    table = pd.read_csv(out / "plots" / "literature.csv")
    assert list(table.protocol) == ["linear | Morlet | fixed", "linear | Morlet | learnt Morlet parameters"]
    runs = pd.read_csv(out / "plots" / "runs.csv")
    for row, published in zip(table.itertuples(), (36.01, 37.84)):
        ours = runs[runs.protocol == row.protocol].joint_acc
        assert row.n == 2 and row.train_size == 100 and row.published_mean == published
        assert row.difference == pytest.approx(ours.mean() - published)
        assert row.p_value == pytest.approx(stats.ttest_1samp(ours, published).pvalue)
        minutes = runs[runs.protocol == row.protocol].wall_minutes
        assert (minutes > 0).all() and row.minutes == pytest.approx(minutes.mean())  # what a cell cost
    assert (out / "plots" / "plot_literature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layout = pd.read_csv(out / "plots" / "literature_layout.csv").set_index("protocol")["100 images"]
    assert list(layout.index[:2]) == list(table.protocol[::-1])  # the paper's order: its learnt row first
    not_run = {"linear | random | learnt (not run here)": "- | 34.81 ± 0.60",  # the published rows of the head
               "linear | random | fixed (not run here)": "- | 29.77 ± 0.47"}
    assert layout[2:].to_dict() == not_run
    for row in table.itertuples():
        assert layout[row.protocol] == f"{row.mean:.2f} ± {row.std:.2f} (2) | {row.published_mean:.2f} ± " \
                                       f"{row.published_std:.2f}"
    (pair,) = pd.read_csv(out / "plots" / "literature_pairs.csv").itertuples()
    morlet, fixed = (runs[runs.protocol == p].sort_values("seed").joint_acc.to_numpy() for p in table.protocol[::-1])
    assert pair.comparison.startswith("linear | Morlet | learnt Morlet parameters  -  linear | Morlet | fixed")
    assert pair.n == 2 and pair.mean_diff == pytest.approx((morlet - fixed).mean())

    # --held-out: each final checkpoint on the training-pool images its 100 left out; the learnt arm chosen on them
    analyze.main(analyze.get_args_parser().parse_args(["--results-dir", str(out), "--literature", "--held-out"]))
    runs = pd.read_csv(out / "plots" / "runs.csv")
    pool, _, info = data.load_dataset("synthetic", None, seed=1)  # the generated images depend on the run's seed
    cell = out / "linear-wavelet-morlet__train-size=100__seed=1"
    left_out = np.setdiff1d(np.arange(len(pool[1])), data.stratified_subset(pool[1], 100, 1).numpy())
    model = analyze.model_from_checkpoint(str(cell / "joint" / "best.pth"))[0].eval()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (info.mean, info.std))
    with torch.no_grad():
        predicted = model((pool[0][left_out].float() / 255 - mean) / std).argmax(1)
    by_hand = 100 * float((predicted == pool[1][left_out]).double().mean())
    (recorded,) = runs[runs.path.str.contains(str(cell.name))].held_out
    assert len(left_out) == len(pool[1]) - 100 and recorded == pytest.approx(by_hand)
    (best,) = pd.read_csv(out / "plots" / "literature_best.csv").itertuples()
    learnt = runs[runs.protocol == "linear | Morlet | learnt Morlet parameters"]
    assert (best.train_size, best.chosen, best.n) == (100, "linear | Morlet | learnt Morlet parameters", 2)
    assert best.held_out == pytest.approx(learnt.held_out.mean()) and best.target == pytest.approx(37.84 + 2)
    assert best.test_mean == pytest.approx(learnt.joint_acc.mean()) and best.met == (best.test_mean >= best.target)
    for seed in (0, 1):  # the learnt arm's checkpoints gone (a copy of the results without them): no choice made
        os.remove(out / f"linear-wavelet-morlet__train-size=100__seed={seed}" / "joint" / "best.pth")
    capsys.readouterr()
    analyze.main(analyze.get_args_parser().parse_args(["--results-dir", str(out), "--literature", "--held-out"]))
    captured = capsys.readouterr()
    assert "no learnt linear run has its final checkpoint here: no held-out choice" in captured.out
    assert captured.err.count("best.pth is missing: no held-out accuracy for ") == 2
