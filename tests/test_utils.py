import os
import subprocess
import sys

import pytest
import torch

import utils


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "sub" / "best.pth"
    utils.save_checkpoint(str(path), {"state_dict": {"w": torch.arange(3.0)}, "best_val_acc": 91.5, "epoch": 7})
    ckpt = utils.load_checkpoint(str(path))
    assert ckpt["best_val_acc"] == 91.5 and ckpt["epoch"] == 7 and torch.equal(ckpt["state_dict"]["w"], torch.arange(3.0))


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "last.pth")
    utils.save_checkpoint(path, {"epoch": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")
    with pytest.raises(RuntimeError, match="disk full"):
        utils.save_checkpoint(path, {"epoch": 2, "bad": Unpicklable()})
    assert utils.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pth"]


def test_die_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        utils.die("--epochs must be >= 1, got 0")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: --epochs must be >= 1, got 0\n"


def test_single_process_helpers(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert utils.distributed_env() == (0, 1, 0)
    assert utils.init_distributed("cpu") == (0, 1, 0) and not utils.is_distributed()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(utils.all_reduce_sum(t), torch.tensor([1.0, 2.0])) and utils.is_main_process()
    assert utils.broadcast_object({"a": 1}) == {"a": 1}
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert utils.distributed_env() == (3, 4, 1)


PAGE_FAULT_PROBE = """
import resource, sys, torch, utils
from scattering_net import ModelConfig, ScatteringNet
if sys.argv[1] == "keep":
    assert utils.keep_freed_memory()
net, x = ScatteringNet(ModelConfig(learnable=False, mixing_horizon=1)), torch.randn(64, 3, 32, 32)
with torch.no_grad():
    net(x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_stops_page_faulting_activations_in_again():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    faults = {mode: int(subprocess.run([sys.executable, "-c", PAGE_FAULT_PROBE, mode], cwd=root, capture_output=True,
                                       text=True, check=True).stdout) for mode in ("default", "keep")}
    assert faults["default"] > 5 * 1000  # activations of several MiB, faulted in again on every call
    assert faults["keep"] < faults["default"] / 10


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        utils.write_json(str(tmp_path / "r.json"), {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
