"""train.py end to end on the synthetic dataset (a few seconds per run).

One run is a subprocess (the smoke test every other test compares with), and
so are the kill-and-resume and torchrun cases; the rest run in-process.
"""
import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import analyze
import data
import runner
import train
from engine import evaluate
from scattering_net import ModelConfig, ScatteringNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dataset", "synthetic", "--train-size", "600", "--n-blocks", "1", "--L", "4", "--epochs", "3",
         "--global-batch-size", "50", "--seed", "0", "--print-freq", "0", "--threads", "1", "--lr-extractor", "1e-3",
         "--device", "cpu"]
SMALL_WITHOUT_SEED = SMALL[:SMALL.index("--seed")] + SMALL[SMALL.index("--seed") + 2:]
RESULT_KEYS = {"head_acc", "head_err", "baseline_acc", "finetune_acc", "finetune_gain", "filter_delta_l2",
               "filter_delta_relative", "n_params_total", "n_params_extractor", "n_params_classifier",
               "n_params_trainable", "actual_train_samples", "test_samples"}
CURVE_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "test_loss", "test_acc",
              "test_top5", "lr", "seconds"}
PROVENANCE_KEYS = {"commit", "dirty", "python", "torch", "torchvision", "numpy", "device", "device_names",
                   "device_count", "world_size", "host", "command", "started", "ended", "wall_seconds"}
DATA = os.path.join(ROOT, "tests", "data")


def run_train(*args, torchrun=None, **kwargs):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    return subprocess.run(launcher + ["train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          **kwargs)


def train_in_process(*args):
    """train.py's main in this process; returns the results dict (SystemExit on bad input, as the script)."""
    return train.main(train.get_args_parser().parse_args(list(args)))


def exit_2_message(capsys, *args):
    """Run train.py in-process with bad input: the one stderr line (and check the exit code is 2)."""
    with pytest.raises(SystemExit) as e:
        train_in_process(*args)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def results_json(save_dir):
    paths = glob.glob(os.path.join(save_dir, "results_*.json"))
    assert len(paths) == 1, paths
    return json.load(open(paths[0]))


def small_model():
    return ScatteringNet(ModelConfig(n_blocks=1, L=4))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("run"))
    proc = run_train(*SMALL, "--save-dir", save_dir)
    assert proc.returncode == 0, proc.stderr
    return save_dir, proc.stdout


def test_json_has_the_spec_schema(finished_run):
    save_dir, stdout = finished_run
    saved = results_json(save_dir)
    assert set(saved) == {"config", "results", "curves", "provenance"}
    assert set(saved["curves"]) == {"phase_a", "phase_b"}
    results = saved["results"]
    assert RESULT_KEYS <= set(results)
    assert results["finetune_gain"] == pytest.approx(results["finetune_acc"] - results["head_acc"])
    assert results["head_err"] == pytest.approx(100 - results["head_acc"]) and results["baseline_acc"] == results["head_acc"]
    assert results["actual_train_samples"] == 600 and results["test_samples"] == 1000
    assert results["val_samples"] == 400 and results["selection"] == saved["config"]["select"] == "val"
    model = small_model()
    assert results["n_params_total"] == sum(p.numel() for p in model.parameters())
    assert results["n_params_trainable"] == results["n_params_classifier"] == sum(p.numel() for p in model.head_parameters())
    for phase in ("phase_a", "phase_b"):
        assert len(saved["curves"][phase]) == 3 and all(CURVE_KEYS <= set(row) for row in saved["curves"][phase])
    for name, phase in (("head", "phase_a"), ("finetune", "phase_b")):
        selected = max(saved["curves"][phase], key=lambda r: r["val_acc"])  # the first best held-out epoch
        assert results[f"{phase}_best_epoch"] == selected["epoch"]
        assert (results[f"{name}_acc"], results[f"{name}_top5"], results[f"{name}_val_acc"]) == \
            (selected["test_acc"], selected["test_top5"], selected["val_acc"])
    assert saved["config"]["dataset"] == "synthetic" and saved["config"]["lr_head"] == 1e-3
    assert "block 0: 3 -> 15 channels, 32x32 -> 16x16" in stdout


def test_checkpoints_load_as_in_the_spec(finished_run):
    save_dir, _ = finished_run
    for phase in ("phase_a", "phase_b"):
        ckpt = torch.load(os.path.join(save_dir, phase, "best.pth"), weights_only=True)  # plain types only
        model = ScatteringNet(ModelConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["state_dict"])
        assert model.config == ModelConfig(n_blocks=1, L=4)
        assert ckpt["best_val_acc"] > 10 and 1 <= ckpt["epoch"] <= 3 and ckpt["config"]["n_blocks"] == 1
        last = torch.load(os.path.join(save_dir, phase, "last.pth"), weights_only=True)
        assert last["finished"] and {"optimizer", "scheduler", "rng", "early_stopping"} <= set(last)


def test_phase_a_keeps_the_filters_and_phase_b_moves_them(finished_run):
    save_dir, _ = finished_run
    init = small_model().state_dict()
    a = torch.load(os.path.join(save_dir, "phase_a", "best.pth"))["state_dict"]
    b = torch.load(os.path.join(save_dir, "phase_b", "best.pth"))["state_dict"]
    blocks = [k for k in init if k.startswith("blocks.")]
    assert all(torch.equal(a[k], init[k]) for k in blocks)
    assert not torch.equal(b["blocks.0.psi_real.weight"], init["blocks.0.psi_real.weight"])
    results = results_json(save_dir)["results"]
    assert results["filter_delta_l2"] > 0 and results["filter_delta_relative"] > 0
    movement = results["filter_movement"][0]
    assert movement["block"] == 0 and len(movement["orientations"]) == 4 and movement["relative_l2"] > 0


def test_json_filter_movement_is_what_analyze_prints(finished_run, capsys):
    save_dir, _ = finished_run
    movement = results_json(save_dir)["results"]["filter_movement"][0]["orientations"]
    analyze.main(analyze.get_args_parser().parse_args(
        ["--results-dir", save_dir, "--filters", os.path.join(save_dir, "phase_b", "best.pth")]))
    printed = capsys.readouterr().out.splitlines()[3:3 + len(movement)]  # title, columns, index name, rows
    for row, line in zip(movement, printed):
        values = [float(v) for v in line.split()]
        assert values[0] == row["orientation"]
        assert values[1:] == pytest.approx([row[k] for k in ("relative_l2", "peak_frequency", "peak_angle_deg",
                                                             "init_frequency", "init_angle_deg")], abs=5e-5)
    assert movement[0]["init_frequency"] == pytest.approx(2.4297, abs=5e-5)  # one fft_size (256) everywhere


def test_same_seed_same_curves(finished_run, tmp_path):
    save_dir, _ = finished_run
    train_in_process(*SMALL, "--save-dir", str(tmp_path))
    assert without_timing(results_json(save_dir)["curves"]) == without_timing(results_json(str(tmp_path))["curves"])


def kill_when(args, marker):
    """Start train.py with args and SIGKILL it as soon as ``marker`` (a checkpoint) exists."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def without_timing(curves):
    return {phase: [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in rows]
            for phase, rows in curves.items()}


def test_resume_after_a_kill_mid_phase_b(finished_run, tmp_path):
    save_dir, _ = finished_run
    args = [*SMALL, "--save-dir", str(tmp_path)]
    kill_when(args, tmp_path / "phase_b" / "last.pth")
    interrupted = results_json(str(tmp_path))
    assert len(interrupted["curves"]["phase_a"]) == 3 and len(interrupted["curves"]["phase_b"]) < 3
    resumed = run_train(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    after, uninterrupted = results_json(str(tmp_path)), results_json(save_dir)
    assert len(after["curves"]["phase_b"]) == 3
    for key in RESULT_KEYS:
        assert after["results"][key] == pytest.approx(uninterrupted["results"][key], rel=1e-6), key


def test_resume_of_a_joint_run_started_without_a_seed_ends_where_it_would_have(tmp_path):
    args = SMALL_WITHOUT_SEED + ["--joint", "--l2-sp", "0.1", "--head-epochs", "1"]
    kill_when([*args, "--save-dir", str(tmp_path / "killed")], tmp_path / "killed" / "joint" / "last.pth")
    resumed = run_train(*args, "--save-dir", str(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    after = results_json(str(tmp_path / "killed"))
    seed = after["results"]["seed"]
    assert f"seed {seed}" in resumed.stdout and after["config"]["seed"] == seed
    epochs = len(after["curves"]["joint"])
    killed_after = epochs - resumed.stdout.count("joint epoch ")  # the resumed session prints the epochs it ran
    assert 1 <= killed_after < epochs
    assert f"joint: resuming after epoch {killed_after} of {epochs} (" in resumed.stdout
    train_in_process(*args, "--seed", str(seed), "--save-dir", str(tmp_path / "whole"))
    whole = results_json(str(tmp_path / "whole"))
    assert without_timing(after["curves"]) == without_timing(whole["curves"])
    assert after["results"]["joint_acc"] == whole["results"]["joint_acc"]


def test_resume_before_the_first_evaluated_epoch_ends_where_it_would_have(tmp_path):
    args = [*SMALL, "--joint", "--eval-every", "3", "--select", "last", "--head-epochs", "2"]
    killed = tmp_path / "killed"
    kill_when([*args, "--save-dir", str(killed)], killed / "joint" / "last.pth")
    assert not (killed / "joint" / "best.pth").exists()  # killed before epoch 3, the first evaluated one
    resumed = run_train(*args, "--save-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    train_in_process(*args, "--save-dir", str(tmp_path / "whole"))
    after, whole = results_json(str(killed)), results_json(str(tmp_path / "whole"))
    assert without_timing(after["curves"]) == without_timing(whole["curves"])
    assert after["results"]["joint_acc"] == whole["results"]["joint_acc"]


def test_phase_b_from_another_runs_phase_a_ends_where_the_whole_run_did(finished_run, tmp_path):
    source, _ = finished_run
    before = fingerprint(source)
    branched = train_in_process(*SMALL, "--save-dir", str(tmp_path), "--from-phase-a", source)
    whole, saved = results_json(source), results_json(str(tmp_path))
    assert without_timing(saved["curves"]) == without_timing(whole["curves"])
    for key in RESULT_KEYS:
        assert branched[key] == pytest.approx(whole["results"][key], rel=1e-6), key
    assert saved["config"]["from_phase_a"] == source and fingerprint(source) == before  # the source is only read
    assert sorted(os.listdir(tmp_path / "phase_a")) == ["best.pth", "last.pth"]


def test_a_phase_b_variant_shares_the_phase_a_and_records_where_it_came_from(finished_run, tmp_path):
    source, _ = finished_run
    without_seed = SMALL_WITHOUT_SEED  # taken from the source's run
    results = train_in_process(*without_seed, "--save-dir", str(tmp_path), "--from-phase-a", source,
                               "--freeze-extractor", "--warmup-epochs", "0", "--lr-head-finetune", "1e-3")
    whole, saved = results_json(source), results_json(str(tmp_path))
    assert saved["config"]["seed"] == whole["config"]["seed"] == 0
    assert without_timing(saved["curves"])["phase_a"] == without_timing(whole["curves"])["phase_a"]
    assert results["head_acc"] == whole["results"]["head_acc"] and results["extractor_frozen"] is True
    assert results["filter_delta_l2"] == 0.0 and saved["config"]["lr_head_finetune"] == 1e-3
    again = run_train(*without_seed, "--save-dir", str(tmp_path), "--from-phase-a", source, "--freeze-extractor",
                      "--warmup-epochs", "0", "--lr-head-finetune", "1e-3")
    assert again.returncode == 2 and "already exists: pass --resume" in again.stderr


def test_from_phase_a_under_torchrun(finished_run, tmp_path):
    source, _ = finished_run
    proc = run_train(*SMALL, "--save-dir", str(tmp_path), "--from-phase-a", source, torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = results_json(str(tmp_path))
    assert saved["results"]["replicas_in_sync"] is True and len(saved["curves"]["phase_b"]) == 3
    assert without_timing(saved["curves"])["phase_a"] == without_timing(results_json(source)["curves"])["phase_a"]


def unfinished_phase_a(finished_run, folder):
    """A copy of the finished run whose Phase A stopped after epoch 2 of 3."""
    import shutil
    shutil.copytree(finished_run[0], folder)
    shutil.rmtree(folder / "phase_b")
    last = torch.load(folder / "phase_a" / "last.pth", weights_only=True)
    torch.save({**last, "finished": False, "epoch": 2}, folder / "phase_a" / "last.pth")
    return folder


def held_by_this_process(folder):
    """The folder as a run in progress leaves it: its .lock names a live process (this one)."""
    (folder / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return folder


@pytest.mark.parametrize("make_source,flags,message", [
    (lambda run, folder: run[0], ["--lr-head", "0.01"],
     "error: --from-phase-a: these flags differ from the run in {source}: --lr-head 0.001 (now 0.01)"),
    (lambda run, folder: run[0], ["--seed", "1", "--n-blocks", "2"],
     "error: --from-phase-a: these flags differ from the run in {source}: --n-blocks 1 (now 2), --seed 0 (now 1)"),
    (lambda run, folder: run[0], ["--joint"],
     "error: --from-phase-a and --joint exclude each other: a joint run has no Phase A"),
    (lambda run, folder: folder, [],
     "error: --from-phase-a: no Phase A in {source} (looked for {source}/phase_a/last.pth)"),
    (unfinished_phase_a, [],
     "error: --from-phase-a: the Phase A in {source} stopped after epoch 2 of 3: finish it first (its command with "
     "--resume)"),
    (lambda run, folder: held_by_this_process(unfinished_phase_a(run, folder)), [],
     "error: --from-phase-a: the Phase A in {source} is still running (pid {pid}), at epoch 2 of 3: wait for it to "
     "finish"),
])
def test_from_phase_a_refuses_what_it_cannot_continue(finished_run, tmp_path, capsys, make_source, flags, message):
    source = str(make_source(finished_run, tmp_path / "source"))
    save_dir = tmp_path / "new"
    args = SMALL_WITHOUT_SEED if "--seed" in flags else SMALL
    assert exit_2_message(capsys, *args, *flags, "--save-dir", str(save_dir), "--from-phase-a", source) == \
        [message.format(source=source, pid=os.getpid())]
    assert not save_dir.exists() or not any(save_dir.iterdir())  # no checkpoint written


@pytest.mark.parametrize("flags,best", [([], "phase_b"), (["--joint", "--l2-sp", "0.1"], "joint")])
def test_two_process_ddp_on_cpu(tmp_path, flags, best):
    proc = run_train(*SMALL, *flags, "--save-dir", str(tmp_path), torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.startswith("done: ") for line in proc.stdout.splitlines()) == 1  # only rank 0 prints
    saved = results_json(str(tmp_path))
    assert saved["results"]["replicas_in_sync"] is True
    model = small_model()
    model.load_state_dict(torch.load(tmp_path / best / "best.pth")["state_dict"])
    (_, _), (x, y), info = data.load_dataset("synthetic", ".", seed=0)
    accuracy = evaluate(model, data.TensorLoader(x, y, info, 250, "cpu", train=False), "cpu")["acc"]
    key = "joint_acc" if best == "joint" else "finetune_acc"
    assert saved["results"][key] == pytest.approx(accuracy, abs=1e-9)


def fingerprint(folder):
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True) if os.path.isfile(p)}


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "error: --epochs must be >= 1, got 0"),
    (["--global-batch-size", "0"], "error: the batch size 0 must be a positive multiple of the number of processes (1)"),
    (["--train-size", "2.0"], "error: --train-size fraction must be in (0, 1], got 2.0"),
    (["--train-size", "9999"], "error: --train-size count must be between 1 and the dataset size 4000, got 9999"),
    (["--mixing-horizon", "5", "--n-blocks", "2", "--L", "8"],
     "error: mixing_horizon=5 does not divide in_channels=27; valid values: [1, 3, 9, 27] (or any value >= 27 for dense)"),
    (["--n-blocks", "6"], "error: in_spatial=32 is too small for n_blocks=6: the last block would get 1x1 input "
                          "(each block halves the resolution, rounding down)"),
    (["--padding-mode", "reflect", "--n-blocks", "5", "--L", "2"],
     "error: padding_mode='reflect' needs every block's input larger than kernel_size // 2 = 3, but the last block "
     "gets 2x2"),
    (["--kernel-size", "4"], "error: kernel size K must be an odd integer >= 3 (the grid is centred on 0; a 1 x 1 wavelet "
                              "is zero once its mean is removed), got 4"),
    (["--kernel-size", "1"], "error: kernel size K must be an odd integer >= 3 (the grid is centred on 0; a 1 x 1 wavelet "
                              "is zero once its mean is removed), got 1"),
    (["--lr-head", "0"], "error: --lr-head must be > 0 and --lr-extractor >= 0, got 0 and 0.001"),
    (["--learn", "morlet", "--mixing-horizon", "3"],
     "error: learn='morlet' filters each input channel on its own: mixing_horizon must be 1 (or unset), got 3"),
    (["--seed", "-1"], "error: --seed must be >= 0, got -1"),
    pytest.param(["--device", "cuda"], "error: --device cuda: CUDA is not available on this machine",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_bad_flags_exit_2_with_one_line(flags, message, tmp_path, capsys):
    assert exit_2_message(capsys, *SMALL, "--save-dir", str(tmp_path), *flags) == [message]
    assert not os.listdir(tmp_path)


def test_bad_flags_in_a_subprocess_give_no_traceback(tmp_path):
    proc = run_train(*SMALL, "--save-dir", str(tmp_path), "--epochs", "0")
    assert proc.returncode == 2 and proc.stderr == "error: --epochs must be >= 1, got 0\n"


def test_existing_run_is_never_overwritten(finished_run, capsys):
    save_dir, _ = finished_run
    before = fingerprint(save_dir)
    assert exit_2_message(capsys, *SMALL, "--save-dir", save_dir) == [
        f"error: {os.path.join(save_dir, 'phase_a', 'last.pth')} already exists: pass --resume to continue that "
        f"run, or choose another --save-dir (nothing was overwritten)"]
    assert exit_2_message(capsys, *SMALL, "--save-dir", save_dir, "--resume", "--lr-head", "0.01") == [
        "error: --resume: these flags differ from the interrupted run: --lr-head 0.001 (now 0.01)"]
    assert fingerprint(save_dir) == before


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    (line,) = exit_2_message(capsys, *SMALL, "--save-dir", str(tmp_path), "--resume")
    assert line.startswith(f"error: --resume: no checkpoint to continue in {tmp_path}")


IMAGENET_SIX_BLOCKS = ["--dataset", "imagenet", "--n-blocks", "6", "--L", "6", "--epochs", "90", "--lr-head", "0.01",
                 "--lr-extractor", "0.0001", "--global-batch-size", "1024"]


def test_the_six_block_imagenet_command_prints_its_plan_and_says_what_makes_it_fit(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_in_process(*IMAGENET_SIX_BLOCKS, "--device", "cpu", "--data-dir", str(tmp_path / "ImageNet"),
                         "--save-dir", str(tmp_path / "run"))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: the model has 1,656,347,616,916 parameters: 24,681.5 GiB for weights")
    assert "--mixing-horizon, --global-avg-pool and --lowpass-last make it smaller" in err
    assert out.splitlines()[5].strip().startswith("block 5: 50,421 -> 352,947 channels, 7x7 -> 3x3")
    assert not (tmp_path / "run").exists()


def fake_imagenet(root, classes=2, per_class=2):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            os.makedirs(root / split / f"n{c:08d}")
            for i in range(per_class):
                pixels = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"n{c:08d}" / f"{i}.png")
    return root


def test_six_blocks_on_imagenet_images_train_with_the_fitting_flags(tmp_path, capsys):
    data_dir = fake_imagenet(tmp_path / "ImageNet")
    train_in_process("--dataset", "imagenet", "--data-dir", str(data_dir), "--n-blocks", "6", "--L", "2",
                     "--mixing-horizon", "9", "--global-avg-pool", "--lowpass-last", "--epochs", "1",
                     "--global-batch-size", "2", "--workers", "0", "--seed", "0", "--threads", "1",
                     "--device", "cpu", "--print-freq", "0", "--save-dir", str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "block 5: 729 -> 729 channels, 7x7 -> 3x3" in out and "DataLoader" in out
    saved = results_json(str(tmp_path / "run"))
    assert saved["results"]["actual_train_samples"] == 3 and saved["results"]["test_samples"] == 4
    assert saved["results"]["val_samples"] == 1  # held out of the ImageFolder train/ for --select val


# ----------------------------------------------------------------------------- research controls

def test_random_init_is_default_pytorch_init_of_every_block_weight():
    wavelet = ScatteringNet(ModelConfig(n_blocks=1, L=4, modulus_type="phase_relu"))
    torch.manual_seed(0)
    random = ScatteringNet(ModelConfig(n_blocks=1, L=4, modulus_type="phase_relu", init="random"))
    for (name, w), r in zip(wavelet.blocks.named_parameters(), random.blocks.parameters()):
        assert w.shape == r.shape and not torch.equal(w, r), name
        bound = 1 / (r[0].numel()) ** 0.5  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert r.abs().max() <= bound and r.abs().max() > 0.9 * bound, name
    assert train.get_args_parser().parse_args(["--random-init"]).init == "random"


def test_joint_random_init_records_joint_keys(tmp_path):
    results = train_in_process(*SMALL, "--random-init", "--joint", "--head-epochs", "1", "--epochs", "2",
                               "--save-dir", str(tmp_path))
    saved = results_json(str(tmp_path))
    assert set(saved["curves"]) == {"joint"} and len(saved["curves"]["joint"]) == 3  # head-epochs + epochs
    assert {"joint_acc", "joint_err", "joint_top5", "filter_delta_relative"} <= set(results)
    assert not {"head_acc", "finetune_acc"} & set(results)
    selected = max(saved["curves"]["joint"], key=lambda r: r["val_acc"])
    assert results["joint_acc"] == selected["test_acc"] > 10 and results["joint_val_acc"] == selected["val_acc"]
    assert results["joint_err"] == pytest.approx(100 - results["joint_acc"])
    assert saved["config"]["init"] == "random" and saved["config"]["joint"] is True
    assert torch.load(tmp_path / "joint" / "best.pth")["model_config"]["init"] == "random"


def test_head_epochs_and_upstream_spellings():
    args = train.get_args_parser().parse_args(["--lr-epochs", "4", "--l2-penalty", "0.5"])
    assert args.head_epochs == 4 and args.l2_sp == 0.5


def test_frozen_continuation_keeps_the_filters_and_says_so(tmp_path):
    results = train_in_process(*SMALL, "--freeze-extractor", "--head-epochs", "2", "--save-dir", str(tmp_path))
    saved = results_json(str(tmp_path))
    assert len(saved["curves"]["phase_a"]) == 2 and len(saved["curves"]["phase_b"]) == 3
    assert results["extractor_frozen"] is True and results["filter_delta_l2"] == 0.0
    best = torch.load(tmp_path / "phase_b" / "best.pth")["state_dict"]
    init = small_model().state_dict()
    assert all(torch.equal(best[k], init[k]) for k in init if k.startswith("blocks."))
    assert not torch.equal(best["classifier.weight"], init["classifier.weight"])


def test_l2_sp_holds_the_filters_near_their_start(finished_run, tmp_path):
    save_dir, _ = finished_run
    free = results_json(save_dir)["results"]["filter_delta_relative"]
    held = train_in_process(*SMALL, "--l2-sp", "100", "--save-dir", str(tmp_path))["filter_delta_relative"]
    assert 0 < held < 0.5 * free
    assert results_json(str(tmp_path))["config"]["l2_sp"] == 100


def test_l2_sp_penalty_value():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    penalty = train.l2_sp([w], [torch.tensor([0.0, 0.0])], 0.5)
    assert float(penalty().detach()) == pytest.approx(0.5 * 0.5 * 5.0)
    assert train.l2_sp([w], [w.detach()], 0.0) is None


def test_warmup_then_cosine_per_step():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = runner.warmup_cosine(optimizer, steps_per_epoch=10, epochs=3, warmup_epochs=1)
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)  # rising from ~0
    assert lrs[10] == pytest.approx(1.0) and lrs[20] == pytest.approx(0.5) and lrs[29] < 0.01  # then a cosine


def test_rms_scaled_extractor_learning_rates():
    model = ScatteringNet(ModelConfig(L=4, modulus_type="phase_relu"))
    groups = train.extractor_groups(model, 1e-4, "rms")
    params = list(model.extractor_parameters())
    assert len(groups) == len(params)
    reference = train.morlet_rms(model.config)
    for g, p in zip(groups, params):
        assert g["lr"] == pytest.approx(1e-4 * float(p.detach().pow(2).mean().sqrt()) / reference)
    dense_psi = model.blocks[1].psi_real.weight  # 15 -> 60 outputs, each sees 15 inputs, 1 of them non-zero
    block0_psi = model.blocks[0].psi_real.weight
    ratio = next(g["lr"] for g in groups if g["params"][0] is dense_psi) / next(
        g["lr"] for g in groups if g["params"][0] is block0_psi)
    assert ratio == pytest.approx((3 / 15) ** 0.5, rel=1e-6)  # 1 in 15 vs 1 in 3 entries non-zero
    assert train.extractor_groups(model, 1e-4, "fixed")[0]["lr"] == 1e-4


def test_morlet_parameters_train_without_weight_decay_and_are_reported(tmp_path):
    model = ScatteringNet(ModelConfig(L=4, modulus_type="phase_relu", learn="morlet"))
    groups = train.extractor_groups(model, 1e-2, "rms")
    assert groups[0]["params"] == model.morlet_parameters() and groups[0]["weight_decay"] == 0.0
    assert groups[0]["lr"] == 1e-2 and len(groups) == 1 + 2  # then each phase collapse by its RMS
    results = train_in_process(*SMALL, "--learn", "morlet", "--lr-extractor", "1e-2", "--save-dir", str(tmp_path))
    morlet = results["morlet_parameters"]
    assert morlet["initial"][0]["orientations"][0] == pytest.approx(
        {"theta": np.pi / 4, "xi": 3 * np.pi / 4, "sigma": 0.8, "slant": 1.0})  # L = 4: slant 4 / L
    moved = [abs(a["theta"] - b["theta"]) for a, b in zip(morlet["initial"][0]["orientations"],
                                                          morlet["learnt"][0]["orientations"])]
    assert max(moved) > 1e-3 and results["filter_delta_relative"] > 0  # the filters moved as Morlet wavelets
    assert results["n_params_extractor"] == 1 + 4 * 4  # the bank alone: no pooling weights


def test_phase_b_continues_the_heads_adamw_moments(finished_run):
    save_dir, _ = finished_run
    model = small_model()
    optimizer = runner.make_optimizer("adamw", train.extractor_groups(model, 1e-4, "rms") +
                                      [train.head_group(model, 1e-4)], 0.0)
    train.carry_head_moments(optimizer, "adamw", model, torch.load(os.path.join(save_dir, "phase_a", "last.pth"))["optimizer"])
    saved = torch.load(os.path.join(save_dir, "phase_a", "last.pth"))["optimizer"]["state"]
    for i, p in enumerate(model.head_parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], saved[i]["exp_avg_sq"])
        assert float(optimizer.state[p]["step"]) == 3 * 12  # 3 epochs of 600 images in batches of 50
    assert not any(optimizer.state[p] for p in model.extractor_parameters())


def test_joint_and_freeze_extractor_exclude_each_other(tmp_path, capsys):
    assert exit_2_message(capsys, *SMALL, "--joint", "--freeze-extractor", "--save-dir", str(tmp_path)) == [
        "error: --joint and --freeze-extractor exclude each other: a joint run trains the blocks from the start"]


def test_top5_is_recorded_beside_top1(finished_run):
    save_dir, _ = finished_run
    saved = results_json(save_dir)
    assert all(r[f"{split}_top5"] >= r[f"{split}_acc"] for phase in saved["curves"].values() for r in phase
               for split in ("val", "test"))
    best = max(saved["curves"]["phase_b"], key=lambda r: r["val_acc"])
    assert saved["results"]["finetune_top5"] == best["test_top5"]


def test_folder_dataset_trains(tmp_path):
    from test_data import make_folder
    make_folder(tmp_path / "images", size=16)
    results = train_in_process("--dataset", "folder", "--data-dir", str(tmp_path / "images"), "--n-blocks", "1",
                               "--L", "2", "--epochs", "1", "--global-batch-size", "4", "--seed", "0",
                               "--print-freq", "0", "--device", "cpu", "--save-dir", str(tmp_path / "run"))
    assert results["actual_train_samples"] == 11 and results["val_samples"] == 1 and results["test_samples"] == 6
    assert torch.load(tmp_path / "run" / "phase_b" / "best.pth")["model_config"]["in_spatial"] == 16


# ----------------------------------------------------------------------------- hostile use

def test_divergence_stops_the_run_keeps_the_last_good_epoch_and_writes_strict_json(tmp_path, capsys, monkeypatch):
    import engine
    real = runner.train_one_epoch

    def diverge_in_epoch_2(*args, **kwargs):
        if args[4] == 2 and (tmp_path / "phase_b").is_dir():  # Phase B, epoch 2
            raise engine.NonFiniteLoss(5)
        return real(*args, **kwargs)
    monkeypatch.setattr(runner, "train_one_epoch", diverge_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        train_in_process(*SMALL, "--warmup-epochs", "1", "--save-dir", str(tmp_path))
    assert e.value.code == runner.EXIT_DIVERGED == 3
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: phase_b diverged: the training loss became NaN or infinite at epoch 2, step 5; "
                           f"{tmp_path / 'phase_b'}/last.pth keeps epoch 1. Try lower learning rates")
    saved = json.loads(open(glob.glob(str(tmp_path / "results_*.json"))[0]).read(),
                       parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert saved["results"]["diverged"] == {"phase": "phase_b", "epoch": 2, "step": 5}
    assert torch.load(tmp_path / "phase_b" / "last.pth")["epoch"] == 1
    assert not (tmp_path / ".lock").exists()


def test_a_huge_learning_rate_is_caught_within_the_first_epoch(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_in_process(*SMALL, "--lr-head", "1e6", "--save-dir", str(tmp_path))
    assert e.value.code == 3
    assert "phase_a diverged" in capsys.readouterr().err
    assert "NaN" not in open(glob.glob(str(tmp_path / "results_*.json"))[0]).read()


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_resume_from_a_damaged_checkpoint_is_one_line(finished_run, tmp_path, capsys, damage):
    import shutil
    shutil.copytree(finished_run[0], tmp_path / "run")
    last = tmp_path / "run" / "phase_b" / "last.pth"
    content = last.read_bytes()
    last.write_bytes({"empty": b"", "truncated": content[:len(content) // 3], "random": os.urandom(5000)}[damage])
    (line,) = exit_2_message(capsys, *SMALL, "--save-dir", str(tmp_path / "run"), "--resume")
    assert line.startswith(f"error: checkpoint {last} ")


def test_a_second_run_into_a_busy_save_dir_is_refused(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(tmp_path / "run")
        (tmp_path / "run" / ".lock").write_text(f"{holder.pid} {__import__('socket').gethostname()}\n")
        assert exit_2_message(capsys, *SMALL, "--save-dir", str(tmp_path / "run")) == [
            f"error: --save-dir {tmp_path / 'run'} is in use by another run (pid {holder.pid}); wait for it to "
            f"finish or choose another --save-dir"]
        assert os.listdir(tmp_path / "run") == [".lock"]
    finally:
        holder.kill()


@pytest.mark.parametrize("setup,flags,message", [
    ("file", [], "error: --save-dir SAVE is a file, not a folder"),
    (None, ["--device", "meta"], "error: --device meta: not a device to train on; choose cpu, cuda, cuda:N or mps"),
    (None, ["--weight-decay", "nan"], "error: --weight-decay must be a finite number >= 0, got nan"),
    (None, ["--lr-head", "nan"], "error: --lr-head must be > 0 and --lr-extractor >= 0, got nan and 0.001"),
    pytest.param(None, ["--device", "mps"], "error: --device mps: MPS (Apple GPU) is not available on this machine",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")),
])
def test_more_bad_input_is_one_line(tmp_path, capsys, setup, flags, message):
    save = tmp_path / "save"
    if setup == "file":
        save.write_text("not a folder")
    assert exit_2_message(capsys, *SMALL, "--save-dir", str(save), *flags) == [message.replace("SAVE", str(save))]


def test_malformed_torchrun_environment_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "abc")
    assert exit_2_message(capsys, *SMALL, "--save-dir", str(tmp_path)) == [
        "error: RANK='0', WORLD_SIZE='abc': torchrun's variables must be integers"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    (line,) = exit_2_message(capsys, *SMALL, "--save-dir", str(tmp_path / "run"))
    assert line.startswith("error: WORLD_SIZE=2 but MASTER_ADDR") and not (tmp_path / "run").exists()


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *SMALL, "--epochs", "50", "--save-dir", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's `&` ignores it
    while not (tmp_path / "phase_a" / "last.pth").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [
        "interrupted (Ctrl-C): the last completed epoch is saved: run the same command with --resume to continue"]
    assert not (tmp_path / ".lock").exists() and torch.load(tmp_path / "phase_a" / "last.pth")["epoch"] >= 1


def test_image_folders_with_different_classes_are_refused(tmp_path, capsys):
    data_dir = fake_imagenet(tmp_path / "ImageNet")
    os.rename(data_dir / "val" / "n00000001", data_dir / "val" / "n00000009")
    assert exit_2_message(capsys, "--dataset", "imagenet", "--data-dir", str(data_dir), "--device", "cpu",
                          "--save-dir", str(tmp_path / "run")) == [
        "error: imagenet: train/ and val/ must have the same classes (labels would shift): only in train/: "
        "['n00000001']; only in val/: ['n00000009']"]


def test_a_corrupt_image_read_by_a_worker_is_named(tmp_path, capsys):
    data_dir = fake_imagenet(tmp_path / "ImageNet")
    (data_dir / "train" / "n00000001" / "1.png").write_bytes(b"\x89PNG broken")
    (line,) = exit_2_message(capsys, "--dataset", "imagenet", "--data-dir", str(data_dir), "--n-blocks", "1", "--L",
                             "2", "--epochs", "1", "--global-batch-size", "4", "--workers", "1", "--seed", "0",
                             "--device", "cpu", "--print-freq", "0", "--save-dir", str(tmp_path / "run"))
    assert line.startswith(f"error: cannot read image {data_dir / 'train' / 'n00000001' / '1.png'} (")


def test_resume_of_a_run_older_than_a_flag_takes_the_flags_default(capsys):
    """A checkpoint written before --max-order existed continues under the default, and only under it."""
    args = train.get_args_parser().parse_args(["--dataset", "synthetic", "--resume"])
    saved = {k: v for k, v in vars(args).items() if k not in ("max_order", "modulus_resolution")}
    what = "--resume: these flags differ from the interrupted run"
    train.check_same_flags(saved, args, what, train.flag_defaults())  # no error
    args.max_order = 2
    with pytest.raises(SystemExit) as e:
        train.check_same_flags(saved, args, what, train.flag_defaults())
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --resume: these flags differ from the interrupted run: "
                                               "--max-order None (now 2)")


# ----------------------------------------------------------------------------- model selection and provenance

def test_select_test_reproduces_a_run_from_before_select(tmp_path):
    """tests/data/pre_select_*.json: written by commit 2eca794 (before --select) with these flags.

    Bit for bit until the CPU's polyphase strided convolution (spatial_scattering.strided_conv) summed
    in another order: since then every accuracy and choice is the same and the losses and filter
    movements agree to float rounding."""
    for name, extra in (("two_phase", ["--epochs", "3"]),
                        ("joint", ["--epochs", "2", "--head-epochs", "1", "--joint", "--init", "random"])):
        old = json.load(open(os.path.join(DATA, f"pre_select_{name}.json")))
        results = train_in_process(*SMALL, "--warmup-epochs", "1", *extra, "--select", "test",
                                   "--save-dir", str(tmp_path / name))
        new = results_json(str(tmp_path / name))
        for phase, rows in old["curves"].items():
            assert [(r["val_acc"], r["val_top5"]) for r in rows] == \
                [(r["test_acc"], r["test_top5"]) for r in new["curves"][phase]]
            assert [v for r in rows for v in (r["val_loss"], r["train_loss"])] == pytest.approx(
                [v for r in new["curves"][phase] for v in (r["test_loss"], r["train_loss"])], rel=1e-5)
        assert_same_results(results, old["results"])


def assert_same_results(results, recorded):
    """Every result but the wall times as recorded: strings exactly, numbers to float rounding (the polyphase
    convolution's order of sums; see the test above). At rel 1e-5 an accuracy or an epoch has to be the same."""
    for key, value in recorded.items():
        if not key.endswith("_seconds"):
            now, then = leaves(results[key]), leaves(value)
            assert [v for v in now if not is_real(v)] == [v for v in then if not is_real(v)], key
            assert [v for v in now if is_real(v)] == pytest.approx([v for v in then if is_real(v)], rel=1e-5), key


def is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def leaves(value):
    """The values of a nested results value, in order, dict keys included."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in (k, *leaves(v))]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in leaves(v)]
    return [value]


def test_no_test_image_is_used_for_any_choice(tmp_path, monkeypatch):
    """Under --select val / last: with the test labels scrambled, every choice (epochs, best.pth, early stop)
    and the held-out curve stay the same; only the reported test accuracies change. --select test: they move."""
    build = data.build_loaders

    def scrambled_test_labels(*args, **kwargs):
        loaders = build(*args, **kwargs)
        loaders.test.labels = torch.roll(loaders.test.labels, 1)
        return loaders
    flags = [*SMALL, "--patience", "1", "--epochs", "4"]
    for select in ("val", "last"):
        honest = train_in_process(*flags, "--select", select, "--save-dir", str(tmp_path / select))
        with monkeypatch.context() as m:
            m.setattr(data, "build_loaders", scrambled_test_labels)
            scrambled = train_in_process(*flags, "--select", select, "--save-dir", str(tmp_path / f"{select}-x"))
        for key in ("phase_a_best_epoch", "phase_b_best_epoch", "phase_a_epochs", "phase_b_epochs", "head_val_acc",
                    "finetune_val_acc", "filter_delta_l2"):
            assert honest[key] == scrambled[key], (select, key)
        assert honest["finetune_acc"] != scrambled["finetune_acc"]
        for phase in ("phase_a", "phase_b"):
            a = torch.load(tmp_path / select / phase / "best.pth")
            b = torch.load(tmp_path / f"{select}-x" / phase / "best.pth")
            assert a["epoch"] == b["epoch"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k])
                                                    for k in a["state_dict"])
    last = results_json(str(tmp_path / "last"))
    assert last["results"]["phase_b_best_epoch"] == last["results"]["phase_b_epochs"] == 4  # no early stop
    assert "val_acc" not in last["curves"]["phase_b"][0] and last["results"]["finetune_val_acc"] is None
    assert last["results"]["finetune_acc"] == last["curves"]["phase_b"][-1]["test_acc"]


def test_val_selection_picks_the_best_held_out_epoch_not_the_best_test_epoch(finished_run):
    saved = results_json(finished_run[0])
    for phase, name in (("phase_a", "head"), ("phase_b", "finetune")):
        rows = saved["curves"][phase]
        epoch = saved["results"][f"{phase}_best_epoch"]
        assert max(r["val_acc"] for r in rows) == next(r["val_acc"] for r in rows if r["epoch"] == epoch)
        assert saved["results"][f"{name}_acc"] == next(r["test_acc"] for r in rows if r["epoch"] == epoch)
        assert torch.load(os.path.join(finished_run[0], phase, "best.pth"))["epoch"] == epoch


def test_provenance_in_the_json_and_every_checkpoint(finished_run):
    save_dir, _ = finished_run
    sessions = results_json(save_dir)["provenance"]
    assert len(sessions) == 1 and set(sessions[0]) == PROVENANCE_KEYS
    session = sessions[0]
    assert session["torch"] == torch.__version__ and session["python"] == sys.version.split()[0]
    assert session["command"].startswith("python train.py --dataset synthetic") and "--save-dir" in session["command"]
    assert len(session["commit"]) == 40 or session["commit"] == "not a git checkout"
    assert set(session["wall_seconds"]) == {"phase_a", "phase_b"} and session["device_count"] == 1
    for phase in ("phase_a", "phase_b"):
        for name in ("best.pth", "last.pth"):
            assert torch.load(os.path.join(save_dir, phase, name))["provenance"][0]["commit"] == session["commit"]


def test_a_resume_adds_a_session_and_warns_when_the_code_changed(finished_run, tmp_path, monkeypatch, capsys):
    import utils
    save_dir = str(tmp_path / "run")
    kill_when([*SMALL, "--save-dir", save_dir], tmp_path / "run" / "phase_b" / "last.pth")
    monkeypatch.setattr(utils, "git_state", lambda folder=utils.REPO: ("f" * 40, False))
    train_in_process(*SMALL, "--save-dir", save_dir, "--resume")
    assert "continues with " + "f" * 40 in capsys.readouterr().err
    sessions = results_json(save_dir)["provenance"]
    assert len(sessions) == 2 and sessions[0]["commit"] != sessions[1]["commit"] == "f" * 40


def legacy_run_folder(source, folder):
    """A copy of a --select test run as the code before --select wrote it: no select / val_size flags, no
    provenance, the test columns named val_* (its checkpoints only: the run as it stood after its Phase A)."""
    os.makedirs(folder / "phase_a")
    old_names = {new: old for old, new in runner.LEGACY_CURVE_KEYS.items()}
    for name in ("best.pth", "last.pth"):
        ckpt = torch.load(source / "phase_a" / name)
        for key in ("select", "val_size"):
            ckpt["config"].pop(key)
        ckpt["config"]["save_dir"] = str(folder)
        ckpt.pop("provenance")
        if "curves_all" in ckpt:
            ckpt["curves_all"] = {phase: [{old_names.get(k, k): v for k, v in row.items()} for row in rows]
                                  for phase, rows in ckpt["curves_all"].items()}
            for key in ("head_val_acc", "selection", "val_samples"):
                ckpt["results"].pop(key)
            ckpt["json_path"] = str(folder / "results_20250101-000000.json")
        torch.save(ckpt, folder / "phase_a" / name)
    return folder


def test_a_run_from_before_select_resumes_as_test_and_ends_as_it_would_have(tmp_path):
    """Its Phase A as the old code left it, then --resume without --select: the run keeps its own rule (test)
    and unclamped warm-up, and ends with the numbers the old code's uninterrupted run recorded."""
    flags = [*SMALL, "--warmup-epochs", "1", "--epochs", "3"]
    train_in_process(*flags, "--select", "test", "--save-dir", str(tmp_path / "new"))
    folder = legacy_run_folder(tmp_path / "new", tmp_path / "old")
    results = train_in_process(*flags, "--resume", "--save-dir", str(folder))
    old = json.load(open(os.path.join(DATA, "pre_select_two_phase.json")))
    assert_same_results(results, old["results"])
    saved = results_json(str(folder))
    assert saved["config"]["select"] == "test" and results["selection"] == "test"
    assert [r["test_acc"] for r in saved["curves"]["phase_a"]] == [r["val_acc"] for r in old["curves"]["phase_a"]]


def test_a_resumed_run_from_before_select_refuses_another_rule(tmp_path, capsys):
    train_in_process(*SMALL, "--epochs", "1", "--select", "test", "--save-dir", str(tmp_path / "new"))
    folder = legacy_run_folder(tmp_path / "new", tmp_path / "old")
    capsys.readouterr()
    assert exit_2_message(capsys, *SMALL, "--epochs", "1", "--resume", "--select", "val", "--save-dir", str(folder)) \
        == ["error: --resume: these flags differ from the interrupted run: --select 'test' (now 'val')"]


def test_a_warm_up_as_long_as_its_phase_is_clamped_with_a_warning(tmp_path, capsys):
    results = train_in_process(*SMALL, "--epochs", "2", "--warmup-epochs", "5", "--save-dir", str(tmp_path))
    assert results["phase_b_warmup_epochs"] == pytest.approx(2 / 3)
    assert "warning: --warmup-epochs 5 is as long as Phase B (2 epochs) or longer: clamped to 0.67 epochs, a third " \
           "of the phase" in capsys.readouterr().err
    results = train_in_process(*SMALL, "--epochs", "3", "--warmup-epochs", "1", "--save-dir", str(tmp_path / "b"))
    assert results["phase_b_warmup_epochs"] == 1


@pytest.mark.parametrize("flags,message", [
    (["--select", "last", "--val-size", "10"], "error: --val-size is for --select val: --select last holds no images out"),
    (["--val-size", "4000"], "error: --val-size 4000 leaves no training images (the pool has 4,000)"),
    (["--train-size", "3900"], "error: --train-size 3900 (3,900 images) and the held-out validation split (400) "
                               "need more than the 4,000 training images: lower one (--val-size)"),
])
def test_selection_flag_errors(flags, message, tmp_path, capsys):
    assert exit_2_message(capsys, *SMALL, *flags, "--save-dir", str(tmp_path)) == [message]


def test_batch_size_spellings_are_one_flag():
    import quick_check
    assert train.get_args_parser().parse_args(["--batch-size", "64"]).global_batch_size == 64
    assert quick_check.get_args_parser().parse_args(["--global-batch-size", "64"]).batch_size == 64


def test_a_moved_run_resumes_and_so_does_its_folder_written_otherwise(finished_run, tmp_path):
    save_dir, _ = finished_run
    kill_when([*SMALL, "--save-dir", str(tmp_path / "here")], tmp_path / "here" / "phase_b" / "last.pth")
    os.rename(tmp_path / "here", tmp_path / "there")
    resumed = run_train(*SMALL, "--save-dir", f"{tmp_path}/there/", "--resume")  # moved, and a trailing slash
    assert resumed.returncode == 0, resumed.stderr
    (path,) = glob.glob(str(tmp_path / "there" / "results_*.json"))  # written where the run is now
    after, uninterrupted = json.load(open(path)), results_json(save_dir)
    assert without_timing(after["curves"]) == without_timing(uninterrupted["curves"])


def limit_file_size(n_bytes):
    """preexec_fn: writes past n_bytes fail in the child, as on a full disk (ulimit -f)."""
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


def test_a_full_disk_is_one_line_and_keeps_what_was_written(finished_run, tmp_path):
    args = [*SMALL, "--save-dir", str(tmp_path)]
    kill_when(args, tmp_path / "phase_b" / "last.pth")
    checkpoints = lambda: {p: h for p, h in fingerprint(tmp_path).items() if p.endswith(".pth")}
    temporary = lambda: glob.glob(str(tmp_path / "**" / ".tmp-*"), recursive=True)  # SIGKILL can leave one
    before, left_by_the_kill = checkpoints(), temporary()
    full = run_train(*args, "--resume", preexec_fn=limit_file_size(64 * 1024))  # checkpoints are larger
    assert full.returncode == 2 and "Traceback" not in full.stderr
    *warnings, line = full.stderr.strip().splitlines()  # (the warm-up clamp's warning before it)
    assert all(w.startswith("warning: ") for w in warnings)
    assert line == (f"error: disk full or write refused writing {tmp_path}/phase_b/best.pth (the write failed); the "
                    f"files written before it are kept")
    assert checkpoints() == before and temporary() == left_by_the_kill
    again = run_train(*args, "--resume")  # space again: the run ends where the uninterrupted one did
    assert again.returncode == 0, again.stderr
    assert without_timing(results_json(str(tmp_path))["curves"]) == without_timing(results_json(finished_run[0])["curves"])


def test_a_flag_error_found_after_loading_leaves_no_folder(tmp_path, capsys):
    assert exit_2_message(capsys, *SMALL, "--train-size", "99999", "--save-dir", str(tmp_path / "run")) == [
        "error: --train-size count must be between 1 and the dataset size 4000, got 99999"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_missing_rank_is_reported_at_once_and_given_up_on_in_time(tmp_path, rank):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = run_train(*SMALL, "--save-dir", str(tmp_path / "run"), "--dist-timeout", "2", env=env)
    where = f"127.0.0.1:{env['MASTER_PORT']}"
    assert proc.returncode == 2
    if rank == 0:  # the rank that waits for the others says so before it waits
        assert proc.stdout.startswith(f"[ddp] waiting up to 2 s for all 2 processes at {where} (--dist-timeout)")
    # every rank reports its own failure (rank 0 may be the missing one); a client rank's c10d logs come first
    line = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and line.startswith(f"error: rank {rank}: the 2 processes did not all meet at {where} within 2 s (")
    assert not (tmp_path / "run").exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_events_hold_the_json_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train_in_process(*SMALL, "--epochs", "2", "--save-dir", str(tmp_path), "--tensorboard")
    events = EventAccumulator(str(tmp_path / runner.TENSORBOARD_DIR), size_guidance={"images": 0})
    events.Reload()
    curves = results_json(str(tmp_path))["curves"]
    for phase, rows in curves.items():
        for key in ("train_loss", "train_acc", "val_acc", "test_acc", "lr"):
            logged = [(e.step, e.value) for e in events.Scalars(f"{phase}/{key}")]
            assert logged == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], (phase, key)
    moved = [e.value for e in events.Scalars("phase_b/filter_movement_block0")]
    frozen = [e.value for e in events.Scalars("phase_a/filter_movement_block0")]
    assert len(moved) == 2 and moved[-1] > 0 and frozen == pytest.approx([0, 0], abs=1e-6)  # frozen in Phase A
    assert [e.step for e in events.Images("phase_b/block0_psi_real")] == [1]
    assert "    seed = 0" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_tensorboard_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    real_find_spec = runner.importlib.util.find_spec
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else
                        real_find_spec(name))
    assert exit_2_message(capsys, *SMALL, "--save-dir", str(tmp_path / "run"), "--tensorboard") == [
        "error: --tensorboard needs the tensorboard package: pip install -r requirements-optional.txt"]
    assert not (tmp_path / "run").exists()


def test_augment_choices_and_the_old_on_off_flag_are_read_alike():
    parse = train.get_args_parser().parse_args
    assert parse(["--no-augment"]).augment == "none" and parse([]).augment == "crop-flip"
    assert parse(["--augment", "autoaugment"]).augment == "autoaugment"
    now = train.run_settings(vars(parse(["--augment", "none"])))
    before = train.run_settings({**vars(parse([])), "augment": False})  # a run recorded with --no-augment
    assert before == now and train.run_settings({**vars(parse([])), "augment": True})["augment"] == "crop-flip"


CNN = ["--head", "cnn", "--head-depth", "10", "--head-width", "1"]


def test_a_cnn_head_trains_in_both_phases_with_sgd(tmp_path):
    results = train_in_process(*SMALL, *CNN, "--optimizer", "sgd", "--lr-head", "0.05", "--save-dir", str(tmp_path))
    model = ScatteringNet(ModelConfig(n_blocks=1, L=4, head="cnn", head_depth=10, head_width=1))
    assert results["n_params_classifier"] == sum(p.numel() for p in model.cnn.parameters())
    assert results["n_params_total"] == model.plan["n_params_total"] and results["finetune_acc"] > 20
    saved = torch.load(os.path.join(tmp_path, "phase_b", "last.pth"))
    assert saved["optimizer"]["param_groups"][-1]["momentum"] == runner.SGD_MOMENTUM
    assert saved["optimizer"]["param_groups"][-1]["nesterov"]
    assert any(k.startswith("cnn.stages.") for k in saved["state_dict"])


def test_the_cnn_alone_trains_jointly_and_is_its_own_arm(tmp_path, capsys):
    results = train_in_process(*SMALL, *CNN, "--n-blocks", "0", "--joint", "--save-dir", str(tmp_path))
    assert results["n_params_extractor"] == 0 and results["joint_acc"] > 20
    config = json.load(open(glob.glob(os.path.join(tmp_path, "results_*.json"))[0]))["config"]
    assert train.arm_of(config) == "cnn-joint" and train.ARMS["cnn-joint"] == ["--n-blocks", "0", "--head", "cnn",
                                                                              "--joint"]
    for flags in (["--n-blocks", "0", *CNN], ["--n-blocks", "0", "--joint"]):
        assert exit_2_message(capsys, *SMALL, *flags, "--save-dir", str(tmp_path / "x")) == [
            "error: --n-blocks 0 is the CNN alone: it needs --head cnn and --joint (with no scattering there is "
            "nothing to freeze for a Phase A)"]


def test_eval_every_evaluates_every_nth_and_the_last_epoch_and_fixed_blocks_train_no_gradient(tmp_path):
    results = train_in_process(*SMALL, "--joint", "--lr-extractor", "0", "--eval-every", "2", "--select", "last",
                               "--head-epochs", "2", "--epochs", "3", "--save-dir", str(tmp_path))
    curves = json.load(open(glob.glob(os.path.join(tmp_path, "results_*.json"))[0]))["curves"]["joint"]
    assert [("test_acc" in row) for row in curves] == [False, True, False, True, True]  # 2, 4 and the last, 5
    assert results["joint_best_epoch"] == 5 and results["joint_acc"] == curves[-1]["test_acc"]
    assert results["filter_delta_l2"] == 0 and results["n_params_trainable"] == results["n_params_classifier"]
