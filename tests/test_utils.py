import errno
import json
import os
import socket
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
    utils.save_checkpoint(path, {"state_dict": {}, "epoch": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")
    with pytest.raises(RuntimeError, match="disk full"):
        utils.save_checkpoint(path, {"state_dict": {}, "epoch": 2, "bad": Unpicklable()})
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


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        utils.write_json(str(tmp_path / "r.json"), {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- hostile input

class RunsCode:
    """A pickle that would create a file when unpickled: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unless_trusted(tmp_path):
    path, marker = str(tmp_path / "last.pth"), str(tmp_path / "pwned")
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, path)
    with pytest.raises(utils.CheckpointError) as e:
        utils.load_checkpoint(path)
    assert "could run code" in str(e.value) and "--trust-checkpoint" in str(e.value)
    assert not os.path.exists(marker)
    utils.load_checkpoint(path, trusted=True)  # the user's explicit choice
    assert os.path.exists(marker)


@pytest.mark.parametrize("content,message", [
    (b"", "is empty (0 bytes)"),
    (b"PK\x03\x04 truncated zip", "is truncated or not a PyTorch checkpoint"),
    (bytes(range(256)) * 4, "not a PyTorch checkpoint"),
    (b'{"config": {}, "results": {}}', "not a PyTorch checkpoint"),
])
def test_damaged_checkpoints_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "best.pth"
    path.write_bytes(content)
    with pytest.raises(utils.CheckpointError) as e:
        utils.load_checkpoint(str(path))
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_real_checkpoint(tmp_path):
    path = str(tmp_path / "last.pth")
    utils.save_checkpoint(path, {"state_dict": {"w": torch.randn(1000)}, "epoch": 1})
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    with pytest.raises(utils.CheckpointError, match="is truncated or not a PyTorch checkpoint"):
        utils.load_checkpoint(path)


def test_json_has_no_nan_tokens(tmp_path):
    path = str(tmp_path / "r.json")
    utils.write_json(path, {"loss": float("nan"), "rows": [1.0, float("inf")], "ok": 2.5})
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "rows": [1.0, None], "ok": 2.5}


def test_save_dir_lock_refuses_a_second_run_and_recovers_a_stale_one(tmp_path):
    os.makedirs(tmp_path / "run")
    first = utils.SaveDirLock(str(tmp_path / "run")).acquire()
    with pytest.raises(utils.CheckpointError) as e:
        utils.SaveDirLock(str(tmp_path / "run")).acquire()
    assert str(e.value) == (f"--save-dir {tmp_path / 'run'} is in use by another run (pid {os.getpid()}); wait for "
                            f"it to finish or choose another --save-dir")
    first.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run" / ".lock").write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")  # killed holder
    with utils.SaveDirLock(str(tmp_path / "run")).acquire():
        assert (tmp_path / "run" / ".lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_lock_removes_the_folder_it_made_when_nothing_was_written_there(tmp_path):
    with utils.SaveDirLock(str(tmp_path / "a" / "run")).acquire():
        pass
    assert os.listdir(tmp_path / "a") == []  # its parent stays: only the folder of the run is the lock's
    with utils.SaveDirLock(str(tmp_path / "b")).acquire():
        (tmp_path / "b" / "results.json").write_text("{}")
    assert os.listdir(tmp_path / "b") == ["results.json"]


def test_save_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(utils.CheckpointError, match="cannot be created"):
        utils.SaveDirLock(str(tmp_path / "file")).acquire()


@pytest.mark.parametrize("env,message", [
    ({"RANK": "0", "WORLD_SIZE": "abc"}, "torchrun's variables must be integers"),
    ({"WORLD_SIZE": "2"}, "RANK and WORLD_SIZE must both be set"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "0 <= RANK < WORLD_SIZE"),
])
def test_malformed_torchrun_variables(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        utils.distributed_env()


def test_world_size_without_master_addr(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but MASTER_ADDR"):
        utils.init_distributed("cpu")


def test_a_refused_write_keeps_the_earlier_file_and_is_one_line(tmp_path):
    path = tmp_path / "results.json"
    utils.write_json(str(path), {"epoch": 1})

    def full_disk(f):
        f.write(b"{\"epo")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(utils.WriteError) as e:
        utils.atomic_write(str(path), full_disk)
    assert str(e.value) == (f"disk full or write refused writing {path} (No space left on device); the files written "
                            f"before it are kept")
    assert json.load(open(path)) == {"epoch": 1} and os.listdir(tmp_path) == ["results.json"]
