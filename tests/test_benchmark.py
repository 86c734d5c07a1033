"""benchmark.py's bookkeeping (the timings themselves live in BENCHMARKS.md, not in tests)."""
import json
import subprocess
import sys

import pytest

import benchmark

ROOT = benchmark.os.path.dirname(benchmark.os.path.abspath(benchmark.__file__))


def test_ratios_are_against_kymatio_for_the_same_case_batch_and_pass():
    rows = [{"case": "cifar", "system": "kymatio", "batch": 128, "pass": "forward", "img_per_s": 1000.0},
            {"case": "cifar", "system": "ours-dense", "batch": 128, "pass": "forward", "img_per_s": 4500.0},
            {"case": "cifar", "system": "ours-dense", "batch": 1, "pass": "forward", "img_per_s": 50.0},
            {"case": "cifar", "system": "ours-dense", "batch": 128, "pass": "forward+backward", "skipped": "x"}]
    benchmark.add_ratios(rows)
    assert [r["ratio_to_kymatio"] for r in rows] == [1.0, 4.5, None, None]


def test_dense_four_blocks_at_imagenet_size_are_skipped_not_built():
    assert benchmark.too_large("ours-dense", "imagenet4") == "4,034,104,308 parameters"
    assert benchmark.too_large("ours-fixed-per-channel", "imagenet4") is None
    assert benchmark.too_large("kymatio", "imagenet4") is None


def test_ours_only_speed_run_writes_json(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "benchmark.py", "--systems", "ours", "--cases", "fmnist",
                           "--batch-sizes", "2", "--threads", "1", "--min-seconds", "0", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out.read_text())
    assert saved["kind"] == "speed" and len(saved["rows"]) == 15  # 7 configurations x 2 passes, + a library user
    assert all(r["img_per_s"] > 0 and r["ratio_to_kymatio"] is None for r in saved["rows"])
    assert "| fmnist | ours-fixed-per-channel | 2 | forward |" in proc.stdout
    assert "| fmnist | ours-fixed-per-channel (library user) | 2 | forward |" in proc.stdout


def test_compile_gain_times_each_model_eager_then_compiled(monkeypatch, capsys, tmp_path):
    """The bookkeeping of --compile-gain, with dynamo's eager backend so that no code is generated here."""
    compile_ = benchmark.torch.compile
    monkeypatch.setattr(benchmark.torch, "compile", lambda model, **kw: compile_(model, backend="eager", **kw))
    monkeypatch.setattr(benchmark, "COMPILE_MODELS", {"fixed per-channel": benchmark.COMPILE_MODELS["fixed per-channel"],
                                                      "dense": benchmark.COMPILE_MODELS["dense"]})
    benchmark.main(benchmark.get_args_parser().parse_args(["--compile-gain", "--batch-sizes", "2", "--threads", "1",
                                                           "--min-seconds", "0", "--json", str(tmp_path / "c.json")]))
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [(r["model"], r["pass"], r["compiled"]) for r in rows] == [
        ("fixed per-channel", "forward", False), ("fixed per-channel", "forward", True),
        ("dense", "training step", False), ("dense", "training step", True)]
    assert all(r["img_per_s"] > 0 and r["first_call_s"] > 0 for r in rows)
    assert rows[1]["speedup"] == pytest.approx(rows[1]["img_per_s"] / rows[0]["img_per_s"])
    assert "dense                training step  eager" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--cases", "mnist"], "error: --cases: invalid value(s) ['mnist']; choose from ['cifar', 'fmnist', 'imagenet2', "
                           "'imagenet4']"),
    (["--batch-sizes", "0"], "error: --batch-sizes: invalid value(s) [0]"),
    (["--batch-sizes", "x"], "error: --batch-sizes: expected comma-separated values, got 'x'"),
])
def test_bad_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(benchmark.get_args_parser().parse_args(flags))
    assert e.value.code == 2 and capsys.readouterr().err.strip() == message


def test_an_unwritable_json_path_stops_before_measuring(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(benchmark.get_args_parser().parse_args(["--json", str(tmp_path / "no" / "such" / "x.json")]))
    assert e.value.code == 2
    assert capsys.readouterr() == ("", f"error: --json {tmp_path}/no/such/x.json: the folder {tmp_path}/no/such does "
                                       f"not exist\n")


def test_order2_rows_compute_kymatios_path_count():
    config = benchmark.ours_config("ours-fixed-per-channel-order2", "imagenet4")
    assert config.max_order == 2 and not config.learnable
    channels = benchmark.count_parameters(config)["classifier_channels"]
    assert channels == 3 * (1 + 4 * 8 + 8 ** 2 * 4 * 3 // 2) == 3 * 417  # kymatio's J=4, L=8, max_order=2


def test_accuracy_compares_both_modulus_resolutions_on_a_folder(tmp_path, capsys):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 4)):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    args = benchmark.get_args_parser().parse_args(
        ["--accuracy", "--epochs", "1", "--systems", "ours", "--dataset", "folder", "--data-dir", str(tmp_path),
         "--threads", "1", "--json", str(tmp_path / "acc.json")])
    benchmark.main(args)
    rows = json.loads((tmp_path / "acc.json").read_text())["rows"]
    assert [r["model"] for r in rows] == [f"ScatteringNet (fixed, 2 blocks, L=8, --modulus-resolution {r})"
                                          for r in ("half", "subsample", "full")]
    assert all(r["dataset"] == "folder" and r["epochs"] == 1 and 0 <= r["test_acc"] <= r["best_test_acc_optimistic"] <= 100
               and r["select"] == "last" for r in rows)
    assert rows[0]["head_params"] == rows[1]["head_params"] == rows[2]["head_params"]  # same shapes, same head


def test_training_steps_time_each_model_three_ways_and_the_morlet_filters_share(monkeypatch):
    monkeypatch.setattr(benchmark, "STEP_MODELS", {"morlet": dict(learn="morlet", n_blocks=1, L=2),
                                                   "alone": dict(n_blocks=0, head="cnn", head_depth=10, head_width=1)})
    args = benchmark.get_args_parser().parse_args(["--steps", "--min-seconds", "0"])
    args.batch_sizes = [4]
    rows = benchmark.step_rows(args, benchmark.torch.device("cpu"))
    assert [(r["model"], r["amp"], r["channels_last"]) for r in rows] == [
        (m, a, c) for m in ("morlet", "alone") for a, c in ((False, False), (True, False), (False, True))]
    assert all(r["img_per_s"] > 0 for r in rows)
    assert all(0 < r["morlet_share"] < 1 for r in rows[:3]) and not any("morlet_share" in r for r in rows[3:])


def test_conv_forms_time_both_forms_of_every_shape_and_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "CONV_FORM_SHAPES", {"per channel": (3, 8, 3, 2), "dense": (2, 8, 1, 3)})
    benchmark.main(benchmark.get_args_parser().parse_args(["--conv-forms", "--batch-sizes", "2", "--threads", "1",
                                                           "--min-seconds", "0", "--json", str(tmp_path / "f.json")]))
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [(r["shape"], r["pass"]) for r in rows] == [
        (shape, p) for shape in ("per channel", "dense")
        for p in ("forward", "forward+input", "forward+input+weights")]
    assert all(r["direct_ms"] > 0 and r["polyphase_speedup"] == pytest.approx(r["direct_ms"] / r["polyphase_ms"])
               for r in rows)
