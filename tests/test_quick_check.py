"""quick_check.py end to end on the synthetic dataset: one subprocess smoke run, the rest in-process."""
import os
import re
import subprocess
import sys

import pytest
import torch

import quick_check
from scattering_net import ModelConfig, ScatteringNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dataset", "synthetic", "--train-size", "1000", "--n-blocks", "1", "--L", "4", "--epochs", "2",
         "--batch-size", "50", "--seed", "0", "--print-freq", "10", "--threads", "1", "--device", "cpu"]


def run_quick_check(*args):
    return subprocess.run([sys.executable, "quick_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_trains_and_saves_the_best_model(tmp_path):
    proc = run_quick_check(*SMALL, "--save-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("quick_check.py: synthetic (1,000 training images, 400 held out for --select val, "
                               "1,000 test; 3x32x32), in-memory fast path")
    assert any(re.match(r"epoch 1 \[10/20\] loss [\d.]+ acc [\d.]+% \d+ img/s eta ", line) for line in lines)
    found = re.search(r"test acc ([\d.]+)% at epoch (\d) \(selected by val\)", lines[-1])
    assert float(found.group(1)) > 30  # 10 classes: chance is 10 %
    ckpt = torch.load(tmp_path / "best.pth")
    model = ScatteringNet(ModelConfig(n_blocks=1, L=4, learnable=False))
    model.load_state_dict(ckpt["state_dict"])
    assert ckpt["epoch"] == int(found.group(2)) and ckpt["model_config"]["learnable"] is False
    assert ckpt["config"]["select"] == "val" and ckpt["provenance"][0]["command"].startswith("python quick_check.py")


def test_learnable_moves_the_filters(tmp_path):
    run = quick_check.main(quick_check.get_args_parser().parse_args(
        [*SMALL, "--learnable", "--modulus-type", "phase_relu", "--save-dir", str(tmp_path)]))
    best = max(run["curves"], key=lambda r: r["val_acc"])  # the first best held-out epoch
    assert len(run["curves"]) == 2 and run["selected_epoch"] == best["epoch"] and run["test_acc"] == best["test_acc"]
    trained = torch.load(tmp_path / "best.pth")["state_dict"]
    init = ScatteringNet(ModelConfig(n_blocks=1, L=4, modulus_type="phase_relu")).state_dict()
    assert not torch.equal(trained["blocks.0.psi_imag.weight"], init["blocks.0.psi_imag.weight"])


@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "error: --lr must be > 0, got -1.0"),
    (["--batch-size", "0"], "error: the batch size 0 must be a positive multiple of the number of processes (1)"),
    (["--patience", "0"], "error: --patience must be >= 1, got 0"),
    (["--L", "0"], "error: --L must be >= 1, got 0"),
    (["--workers", "-1"], "error: --workers must be >= 0, got -1"),
    (["--threads", "0"], "error: --threads must be >= 1, got 0"),
    (["--train-size", "0"], "error: --train-size count must be between 1 and the dataset size 4000, got 0"),
    (["--dataset", "fashion-mnist", "--n-blocks", "5"], "error: in_spatial=28 is too small for n_blocks=5: the last "
                                                        "block would get 1x1 input (each block halves the resolution, "
                                                        "rounding down)"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        quick_check.main(quick_check.get_args_parser().parse_args([*SMALL, "--save-dir", str(tmp_path), *flags]))
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]
    assert not os.listdir(tmp_path)


def test_never_overwrites_a_saved_model(tmp_path, capsys):
    (tmp_path / "best.pth").write_bytes(b"an earlier run's model")
    with pytest.raises(SystemExit) as e:
        quick_check.main(quick_check.get_args_parser().parse_args([*SMALL, "--save-dir", str(tmp_path)]))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'best.pth'} already exists: choose another --save-dir (nothing was overwritten)"]
    assert (tmp_path / "best.pth").read_bytes() == b"an earlier run's model"


def test_fit_single_phase_trains_any_module(tmp_path):
    """benchmark.py --accuracy trains kymatio's network through it: a model without a ModelConfig."""
    import runner
    args = quick_check.get_args_parser().parse_args([*SMALL, "--save-dir", str(tmp_path)])
    env = runner.setup(args, args.batch_size, lock_save_dir=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    test_acc, epoch, curves = quick_check.fit_single_phase("plain", model, env, args, str(tmp_path))
    best = max(curves, key=lambda r: r["val_acc"])
    assert len(curves) == 2 and (epoch, test_acc) == (best["epoch"], best["test_acc"]) and test_acc > 10
    assert torch.load(tmp_path / "best.pth")["model_config"] is None
