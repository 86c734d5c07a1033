"""analyze.py on results written by a real short train.py run, plus hand-made edge cases."""
import copy
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats
import torch

import analyze
import train
from scattering_net import ModelConfig, ScatteringNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("plot_data_efficiency.png", "plot_advantage.png", "plot_size_vs_gain.png", "plot_delta_vs_gain.png")


def run_script(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("runs") / "real"
    train.main(train.get_args_parser().parse_args([
        "--dataset", "synthetic", "--train-size", "500", "--n-blocks", "1", "--L", "4", "--epochs", "2",
        "--global-batch-size", "50", "--seed", "0", "--print-freq", "0", "--threads", "1", "--lr-extractor", "1e-3",
        "--device", "cpu", "--save-dir", str(save_dir)]))
    (path,) = glob.glob(str(save_dir / "results_*.json"))
    return save_dir.parent, json.load(open(path))


def write_variant(folder, name, base, train_size, head_acc, finetune_acc, delta):
    exp = copy.deepcopy(base)
    exp["config"]["train_size"] = train_size  # another run, not a copy of the real one
    exp["results"].update(actual_train_samples=train_size, head_acc=head_acc, finetune_acc=finetune_acc,
                          finetune_gain=finetune_acc - head_acc, filter_delta_relative=delta)
    os.makedirs(folder / name, exist_ok=True)
    (folder / name / "results_20260101-000000.json").write_text(json.dumps(exp))
    return exp


def is_png(path):
    return open(path, "rb").read(8) == PNG_MAGIC


def test_table_plots_and_curves_from_a_real_run_and_edge_cases(real_run):
    results_dir, real = real_run
    write_variant(results_dir, "small", real, 50, 40.0, 35.5, 0.30)  # a negative gain
    write_variant(results_dir, "large", real, 4000, 90.0, 93.0, 0.10)
    (results_dir / "corrupt").mkdir()
    (results_dir / "corrupt" / "results_bad.json").write_text("{not json")
    (results_dir / "corrupt" / "results_partial.json").write_text(json.dumps({"config": real["config"]}))
    proc = run_script("analyze.py", "--results-dir", str(results_dir), "--curves")
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: skipping ") for w in warnings)
    assert "results_bad.json: missing unreadable (JSONDecodeError)" in proc.stderr
    assert "results_partial.json: missing results.head_acc" in proc.stderr

    table = pd.read_csv(results_dir / "plots" / "runs.csv", index_col="exp")
    assert list(table.train_size) == [50, 500, 4000] and list(table.index) == [1, 2, 3]
    real_row = table.loc[2]
    for key in ("head_acc", "finetune_acc", "finetune_gain", "filter_delta_l2", "filter_delta_relative",
                "n_params_total", "n_params_trainable"):
        assert real_row[key] == pytest.approx(real["results"][key]), key
    assert real_row.dataset == "synthetic" and real_row.n_blocks == 1 and real_row.L == 4
    assert table.loc[1].finetune_gain == pytest.approx(-4.5)
    for name in PLOTS:
        assert is_png(results_dir / "plots" / name)
    assert sorted(os.listdir(results_dir / "plots" / "curves")) == [f"curves_exp{i}.png" for i in (1, 2, 3)]
    r = np.corrcoef(table.filter_delta_relative, table.finetune_gain)[0, 1]
    assert f"Pearson r (filter_delta_relative vs finetune_gain): {r:.3f}" in proc.stdout
    assert f"{real['results']['head_acc']:.2f}" in proc.stdout.splitlines()[3]


def run_analyze(capsys, *args):
    """analyze.py's main in-process: (exit code, stdout, stderr)."""
    try:
        analyze.main(analyze.get_args_parser().parse_args(list(args)))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_one_experiment_says_r_is_undefined(real_run, tmp_path, capsys):
    _, real = real_run
    write_variant(tmp_path, "only", real, 500, 80.0, 82.0, 0.2)
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path))
    assert code == 0, err
    assert "Pearson r (filter_delta_relative vs finetune_gain): undefined" in out
    assert all(is_png(tmp_path / "plots" / name) for name in PLOTS)


def test_pearson_r():
    assert analyze.pearson_r([1, 2], [3, 4]) is None
    assert analyze.pearson_r([1, 1, 1], [3, 4, 5]) is None
    assert analyze.pearson_r([1, 2, 3], [2, 4, 7]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])


def test_filters_of_a_real_checkpoint(real_run, tmp_path, capsys):
    results_dir, _ = real_run
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path), "--filters",
                                 str(results_dir / "real" / "phase_b" / "best.pth"))
    assert code == 0, err
    lines = out.splitlines()
    assert "relative_l2" in lines[1] and len(lines) == 3 + 4 + 1  # header, column row, index row, 4 orientations
    moved = [float(line.split()[1]) for line in lines[3:7]]
    assert all(0 < m < 1 for m in moved)  # trained with lr 1e-3 for 2 epochs: moved, but still near Morlet
    assert is_png(tmp_path / "plots" / f"filters_block0__{str(results_dir).lstrip('/').replace('/', '__')}__real__"
                                          f"phase_b__best.png")


@pytest.mark.parametrize("args,message", [
    (["--results-dir", "EMPTY"], "error: no usable results_*.json under EMPTY"),
    (["--results-dir", "MISSING/x"], "error: --results-dir MISSING/x is not a folder"),
    (["--results-dir", "EMPTY", "--filters", "MISSING/best.pth"], "error: --filters: "
                                                                  "checkpoint MISSING/best.pth does not exist"),
    (["--results-dir", "EMPTY", "--stability", "MISSING/best.pth"], "error: --stability: "
                                                                    "checkpoint MISSING/best.pth does not exist"),
    (["--results-dir", "EMPTY", "--held-out"], "error: --held-out is for --literature (it chooses the best learnt "
                                               "linear arm of that table)"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    args = [a.replace("EMPTY", str(tmp_path)).replace("MISSING", str(tmp_path / "missing")) for a in args]
    message = message.replace("EMPTY", str(tmp_path)).replace("MISSING", str(tmp_path / "missing"))
    code, _, err = run_analyze(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(message)


def test_each_arm_is_its_own_row_and_line(real_run, tmp_path, capsys):
    _, real = real_run
    write_variant(tmp_path, "two_phase", real, 500, 80.0, 84.0, 0.2)
    frozen = write_variant(tmp_path, "frozen", real, 500, 80.0, 81.0, 0.0)
    frozen["config"]["freeze_extractor"] = True
    (tmp_path / "frozen" / "results_20260101-000000.json").write_text(json.dumps(frozen))
    joint = copy.deepcopy(real)
    joint["config"].update(joint=True, init="random")
    for key in ("head_acc", "head_err", "finetune_acc", "finetune_gain"):
        joint["results"].pop(key)
    joint["results"]["joint_acc"] = 70.0
    os.makedirs(tmp_path / "joint")
    (tmp_path / "joint" / "results_20260101-000000.json").write_text(json.dumps(joint))
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path))
    assert code == 0 and err == "", err
    table = pd.read_csv(tmp_path / "plots" / "runs.csv", index_col="exp")
    by_arm = table.set_index("arm")
    assert sorted(table.arm) == ["random-joint", "wavelet-frozen", "wavelet-two-phase"]
    assert set(table.arm) <= set(train.ARMS)  # one table of arm names for sweep.py and analyze.py
    assert by_arm.loc["random-joint", "joint_acc"] == 70.0 and pd.isna(by_arm.loc["random-joint", "head_acc"])
    assert by_arm.loc["random-joint", "init"] == "random" and by_arm.loc["wavelet-two-phase", "init"] == "wavelet"
    assert by_arm.loc["wavelet-frozen", "finetune_acc"] == 81.0
    assert "Pearson r (filter_delta_relative vs finetune_gain): undefined" in out  # one two-phase run


def test_hostile_results_folders(real_run, tmp_path, capsys):
    _, real = real_run
    strings = write_variant(tmp_path, "strings", real, 500, 80.0, 82.0, 0.2)
    strings["results"]["head_acc"] = "80.0"
    (tmp_path / "strings" / "results_20260101-000000.json").write_text(json.dumps(strings))
    no_curves = write_variant(tmp_path, "no_curves", real, 500, 80.0, 82.0, 0.2)
    del no_curves["curves"]
    (tmp_path / "no_curves" / "results_20260101-000000.json").write_text(json.dumps(no_curves))
    nan = write_variant(tmp_path, "nan", real, 600, 80.0, float("nan"), 0.2)  # json writes NaN, and reads it back
    (tmp_path / "nan" / "results_20260101-000000.json").write_text(json.dumps(nan))
    no_dataset = write_variant(tmp_path, "no_dataset", real, 700, 80.0, 82.0, 0.2)
    no_dataset["config"]["dataset"] = None
    (tmp_path / "no_dataset" / "results_20260101-000000.json").write_text(json.dumps(no_dataset))
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path), "--curves")
    assert code == 0
    assert err.strip().splitlines() == [
        f"warning: skipping {tmp_path}/nan/results_20260101-000000.json: missing results.finetune_acc as a finite number, "
        f"results.finetune_gain as a finite number",
        f"warning: skipping {tmp_path}/no_dataset/results_20260101-000000.json: missing config.dataset",
        f"warning: skipping {tmp_path}/strings/results_20260101-000000.json: missing results.head_acc as a finite number"]
    assert list(pd.read_csv(tmp_path / "plots" / "runs.csv").train_size) == [500]  # in no table, as in none
    assert list(pd.read_csv(tmp_path / "plots" / "summary.csv").n) == [1]
    assert is_png(tmp_path / "plots" / "curves" / "curves_exp1.png")


def test_several_folders_read_as_one_each_run_once_plots_where_asked(real_run, tmp_path, capsys):
    _, real = real_run
    write_variant(tmp_path / "a", "small", real, 500, 80.0, 82.0, 0.2)
    write_variant(tmp_path / "b", "large", real, 600, 81.0, 84.0, 0.3)
    os.symlink(tmp_path / "a" / "small", tmp_path / "b" / "small")  # reached from both folders: one run
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path / "a"), str(tmp_path / "b"),
                                 "--plots-dir", str(tmp_path / "both"))
    assert code == 0 and err == "", err
    assert list(pd.read_csv(tmp_path / "both" / "runs.csv").train_size) == [500, 600]
    assert not (tmp_path / "a" / "plots").exists() and not (tmp_path / "b" / "plots").exists()
    code, _, err = run_analyze(capsys, "--results-dir", str(tmp_path / "a"), str(tmp_path / "missing"))
    assert code == 2 and err == f"error: --results-dir {tmp_path / 'missing'} is not a folder\n"


def test_a_file_named_plots(real_run, tmp_path, capsys):
    _, real = real_run
    write_variant(tmp_path, "one", real, 500, 80.0, 82.0, 0.2)
    (tmp_path / "plots").write_text("not a folder")
    code, _, err = run_analyze(capsys, "--results-dir", str(tmp_path))
    assert code == 2 and err.strip() == (f"error: {tmp_path}/plots is a file: the plots go into a folder of that "
                                         f"name (move the file away)")


@pytest.mark.parametrize("content,message", [(b"", "is empty (0 bytes)"), (b'{"config": {}}', "not a PyTorch checkpoint")])
def test_filters_of_something_that_is_not_a_checkpoint(tmp_path, capsys, content, message):
    (tmp_path / "x.pth").write_bytes(content)
    code, _, err = run_analyze(capsys, "--results-dir", str(tmp_path), "--filters", str(tmp_path / "x.pth"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


def write_run(folder, name, base, seed, arm, accuracies, train_size=500):
    exp = copy.deepcopy(base)
    exp["config"].update(seed=seed, init="random" if arm == "random" else "wavelet", joint=arm == "random",
                         train_size=train_size,
                         freeze_extractor=arm == "frozen", save_dir=f"runs/{name}", threads=seed + 1,
                         from_phase_a=f"runs/phase_a_{seed}" if arm == "wavelet" else None)  # how it ran, not what
    for key in ("head_acc", "finetune_acc", "finetune_gain", "joint_acc"):
        exp["results"].pop(key, None)
    exp["results"].update(actual_train_samples=train_size, **accuracies)
    os.makedirs(folder / name)
    (folder / name / "results_20260101-000000.json").write_text(json.dumps(exp))


def test_means_over_seeds_and_a_known_paired_t_test(real_run, tmp_path, capsys):
    _, real = real_run
    ours, random_joint = [70.0, 72.0, 74.0], [65.0, 66.0, 70.0]  # differences 5, 6, 4: mean 5, std 1
    for seed in range(3):
        write_run(tmp_path, f"w{seed}", real, seed, "wavelet",
                  {"head_acc": 60.0 + seed, "finetune_acc": ours[seed], "finetune_gain": ours[seed] - 60 - seed})
        write_run(tmp_path, f"r{seed}", real, seed, "random", {"joint_acc": random_joint[seed]})
    write_run(tmp_path, "other_size", real, 0, "random", {"joint_acc": 50.0}, train_size=100)  # no partner
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path))
    assert code == 0, err
    groups = pd.read_csv(tmp_path / "plots" / "summary.csv")
    wavelet = groups[(groups.arm == "wavelet-two-phase") & (groups.train_size == 500)].iloc[0]
    assert wavelet.n == 3 and wavelet.finetune_acc_mean == pytest.approx(72.0) and wavelet.finetune_acc_std == pytest.approx(2.0)
    assert groups[groups.train_size == 100].iloc[0].n == 1
    significance = pd.read_csv(tmp_path / "plots" / "significance.csv").set_index("comparison")
    versus_random = significance.loc["wavelet fine-tuned - random joint"]
    # t = 5 / (1 / sqrt 3) with 2 degrees of freedom; Student's t with 2 dof has cdf 1/2 + t / (2 sqrt(2 + t^2))
    t = 5 * 3 ** 0.5
    assert versus_random.n == 3 and versus_random.mean_diff == pytest.approx(5.0)
    assert versus_random.p_value == pytest.approx(1 - t / (2 + t * t) ** 0.5, rel=1e-6)  # 0.01307
    half = 4.302652729911275 / 3 ** 0.5  # t_0.975 with 2 dof
    assert (versus_random.ci_low, versus_random.ci_high) == pytest.approx((5 - half, 5 + half))
    own_head = significance.loc["wavelet fine-tuned - its own head"]
    assert own_head.mean_diff == pytest.approx(11.0) and own_head.n == 3
    assert "wavelet fine-tuned - frozen continuation" not in significance.index  # no such runs
    assert all(is_png(tmp_path / "plots" / name) for name in ("plot_data_efficiency.png", "plot_advantage.png"))
    assert "paired by seed" in out


def test_curves_of_the_wrong_shape_are_left_out(real_run, tmp_path, capsys):
    _, real = real_run
    odd = write_variant(tmp_path, "odd", real, 500, 80.0, 82.0, 0.2)
    odd["curves"] = {"phase_a": [{"epoch": 1}, "not a row"], "phase_b": [{"epoch": 1, "val_acc": "x", "train_loss": 1}]}
    (tmp_path / "odd" / "results_20260101-000000.json").write_text(json.dumps(odd))
    listed = write_variant(tmp_path, "listed", real, 501, 80.0, 82.0, 0.2)
    listed["curves"] = [1, 2]
    (tmp_path / "listed" / "results_20260101-000000.json").write_text(json.dumps(listed))
    code, _, err = run_analyze(capsys, "--results-dir", str(tmp_path), "--curves")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "plots" / "curves")) == ["curves_exp1.png", "curves_exp2.png"]


def write_seeds(folder, real):
    """Three seeds of wavelet two-phase and random joint: differences 5, 6, 4."""
    for seed, (ours, theirs) in enumerate(zip([70.0, 72.0, 74.0], [65.0, 66.0, 70.0])):
        write_run(folder, f"w{seed}", real, seed, "wavelet", {"head_acc": 60.0, "finetune_acc": ours,
                                                              "finetune_gain": ours - 60})
        write_run(folder, f"r{seed}", real, seed, "random", {"joint_acc": theirs})


def test_each_run_is_counted_once_through_links_and_copies(real_run, tmp_path, capsys):
    _, real = real_run
    runs = tmp_path / "runs"
    write_seeds(runs / "demo-1", real)
    os.symlink("demo-1", runs / "demo-latest")  # as make demo leaves it
    code, out, err = run_analyze(capsys, "--results-dir", str(runs / "demo-latest"))
    assert code == 0 and err == "", err
    alone = pd.read_csv(runs / "demo-latest" / "plots" / "significance.csv")
    code, out, err = run_analyze(capsys, "--results-dir", str(runs))
    assert code == 0 and err == "", err
    through_parent = pd.read_csv(runs / "plots" / "significance.csv")
    pd.testing.assert_frame_equal(alone, through_parent)
    assert through_parent.set_index("comparison").loc["wavelet fine-tuned - random joint", "n"] == 3
    # a copied run folder (an extended sweep that ran a cell again): one run, the newer file, with a warning
    copy_dir = runs / "copy" / "w0"
    os.makedirs(copy_dir)
    copied = json.load(open(runs / "demo-1" / "w0" / "results_20260101-000000.json"))
    copied["provenance"] = [{"commit": "a" * 40, "ended": "2027-01-01T00:00:00+00:00"}]
    (copy_dir / "results_20270101-000000.json").write_text(json.dumps(copied))
    code, out, err = run_analyze(capsys, "--results-dir", str(runs))
    assert code == 0
    assert err.strip().splitlines()[0] == (f"warning: {runs}/demo-1/w0/results_20260101-000000.json records the same run "
                           f"(configuration, arm and seed) as {copy_dir}/results_20270101-000000.json: counted once, "
                           f"as the newer file")
    table = pd.read_csv(runs / "plots" / "runs.csv")
    assert len(table) == 6 and (table.commit == "a" * 40).sum() == 1
    assert pd.read_csv(runs / "plots" / "significance.csv").n.tolist()[0] == 3


def test_a_run_from_before_select_is_read_as_test_and_never_pooled_with_val_runs(real_run, tmp_path, capsys):
    _, real = real_run
    os.makedirs(tmp_path / "old")
    old = json.load(open(os.path.join(ROOT, "tests", "data", "pre_select_two_phase.json")))
    (tmp_path / "old" / "results_20261203-070000.json").write_text(json.dumps(old))
    new = copy.deepcopy(real)
    new["config"].update({k: v for k, v in old["config"].items() if k not in ("save_dir", "resume")},
                         select="val", val_size=None)
    os.makedirs(tmp_path / "new")
    (tmp_path / "new" / "results_20261203-080000.json").write_text(json.dumps(new))
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path))
    assert code == 0 and err == "", err
    table = pd.read_csv(tmp_path / "plots" / "runs.csv").set_index("select")
    assert sorted(table.index) == ["test", "val"]  # two runs, not one run recorded twice
    phase_b = old["curves"]["phase_b"]
    assert table.loc["test", "last_epoch_acc"] == phase_b[-1]["val_acc"]  # the old val_acc was the test split's
    assert table.loc["test", "best_test_epoch_acc"] == max(r["val_acc"] for r in phase_b)
    assert pd.isna(table.loc["test", "commit"])
    assert len(pd.read_csv(tmp_path / "plots" / "summary.csv")) == 2  # never averaged together


def test_mixed_code_versions_are_said(real_run, tmp_path, capsys):
    _, real = real_run
    write_seeds(tmp_path, real)
    path = tmp_path / "r1" / "results_20260101-000000.json"
    other = json.load(open(path))
    other["provenance"][0]["commit"] = "b" * 40
    path.write_text(json.dumps(other))
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path))
    assert code == 0 and "warning: 2 row(s) above combine runs of different code versions" in err
    assert pd.read_csv(tmp_path / "plots" / "significance.csv").commits.tolist()[0] == 2


def test_a_full_disk_is_one_line_and_keeps_the_earlier_tables(real_run, tmp_path):
    import resource
    import shutil
    shutil.copytree(real_run[0] / "real", tmp_path / "real")
    assert run_script("analyze.py", "--results-dir", str(tmp_path)).returncode == 0
    before = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "plots" / "*"))}
    full = subprocess.run([sys.executable, "analyze.py", "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,  # the PNGs are larger than the limit, the CSVs are not
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)))
    assert full.returncode == 2 and full.stderr.strip().splitlines()[-1] == (
        f"error: disk full or write refused writing {tmp_path}/plots/plot_size_vs_gain.png (File too large); the files "
        f"written before it are kept")
    after = {p: open(p, "rb").read() for p in glob.glob(str(tmp_path / "plots" / "*"))}
    assert after == before  # the same tables rewritten whole, the figures left as they were


# ----------------------------------------------------------------------------- --stability

def test_every_deformation_at_its_identity_strength_changes_nothing():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    for kind, strengths in analyze.STABILITY_STRENGTHS.items():
        assert torch.equal(analyze.deform(x, kind, strengths[0]), x), kind
        assert not torch.allclose(analyze.deform(x, kind, strengths[1], torch.Generator().manual_seed(0)), x), kind
    model = ScatteringNet(ModelConfig(n_blocks=2, L=4))
    rows = analyze.stability_rows(model, torch.randn(8, 3, 32, 32))
    identities = [r for r in rows if r["kind"] != "unrelated" and r["strength"] == analyze.STABILITY_STRENGTHS[r["kind"]][0]]
    assert len(identities) == 4 and all(r["mean"] == 0 for r in identities)
    means = {(r["kind"], r["strength"]): r["mean"] for r in rows}
    assert 0 < means["deformation", 0.5] < means["deformation", 3.0] < means["unrelated", None]


def test_a_shift_by_the_total_stride_shifts_the_coefficients_under_circular_padding():
    torch.manual_seed(0)
    model = ScatteringNet(ModelConfig(n_blocks=2, L=4, padding_mode="circular", modulus_type="phase_relu")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for pixels in (4, 8):  # multiples of 2^J = 4: the coefficients (at 1/4 resolution) move by pixels / 4
            moved = model.features(analyze.deform(x, "translation", pixels))
            torch.testing.assert_close(moved, torch.roll(model.features(x), (pixels // 4,) * 2, dims=(-2, -1)),
                                       rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model.features(analyze.deform(x, "translation", 2)), model.features(x), atol=1e-2)


def test_the_smooth_warp_moves_each_image_by_at_most_its_strength():
    field = analyze.smooth_displacement(4, 32, 32, 2.0, torch.Generator().manual_seed(0))
    largest = field.pow(2).sum(1).sqrt().amax((-2, -1))
    torch.testing.assert_close(largest, torch.full((4,), 2.0))
    assert field.diff(dim=-1).abs().max() < 0.5  # smooth: neighbours move alike


def test_stability_of_real_checkpoints_writes_its_table_and_plot(real_run, tmp_path, capsys):
    results_dir, _ = real_run
    checkpoints = [str(results_dir / "real" / phase / "best.pth") for phase in ("phase_a", "phase_b")]
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path), "--stability", *checkpoints,
                                 "--stability-images", "16")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "plots" / "stability.csv")
    assert len(table) == 2 * (4 * 5 + 1) and set(table.kind) == {*analyze.STABILITY_STRENGTHS, "unrelated"}
    # Phase A trained the head alone: its blocks are the fixed wavelets; Phase B learnt every tap (dense); 2 + 2
    # epochs at 500 images is not the protocol's budget (300): named with it
    assert list(table.model.unique()) == ["linear | Morlet | fixed (4 epochs)",
                                          "linear | Morlet | learnt taps, dense (4 epochs)"]
    assert (table.train_size == 500).all() and (table.seed == 0).all()
    unrelated = table[table.kind == "unrelated"]
    assert (unrelated.of_unrelated == 1).all() and (table.of_unrelated * unrelated["mean"].repeat(21).values
                                                   ).round(6).equals(table["mean"].round(6))
    summary = pd.read_csv(tmp_path / "plots" / "stability_summary.csv")
    assert len(summary) == len(table) and (summary.n == 1).all() and summary.change_std.isna().all()
    assert is_png(tmp_path / "plots" / "plot_stability.png") and "linear | Morlet | learnt taps, dense (4 epochs)" in out
    code, _, err = run_analyze(capsys, "--results-dir", str(tmp_path), "--stability", checkpoints[0],
                               "--stability-images", "1")
    assert code == 2 and err == "error: --stability-images must be >= 2 (the baseline pairs unrelated images), got 1\n"


def test_the_literature_plot_has_a_panel_per_head_and_the_paper_layout_its_order(tmp_path):
    rows = [("linear | Morlet | fixed", 100, 36.0), ("WRN-16-8 | Morlet | learnt Morlet parameters", 100, 44.0),
            ("WRN-16-8 | Morlet | learnt Morlet parameters", 500, 63.5), ("WRN-16-2 alone | - | -", 100, 35.0)]
    lit = pd.DataFrame([{"protocol": p, "train_size": n, "n": 3, "mean": m, "std": 1.0} for p, n, m in rows])
    published = [analyze.PUBLISHED.get(analyze.published_key(p), {}).get(n, (np.nan, np.nan)) for p, n, _ in rows]
    lit["published_mean"], lit["published_std"] = zip(*published)
    layout = analyze.paper_layout(lit)
    assert list(layout.index) == [  # the paper's order; its rows we did not run, '-' for ours; then the control
        "linear | Morlet | learnt (not run here)", "linear | Morlet | fixed", "linear | random | learnt (not run here)",
        "linear | random | fixed (not run here)", "WRN-16-8 | Morlet | learnt Morlet parameters",
        "WRN-16-8 | Morlet | fixed (not run here)", "WRN-16-8 | random | learnt (not run here)",
        "WRN-16-8 | random | fixed (not run here)", "WRN-16-8 alone | - | - (not run here)", "WRN-16-2 alone | - | -"]
    assert list(layout.columns) == ["100 images", "500 images"]
    assert layout.loc["WRN-16-8 | Morlet | learnt Morlet parameters", "500 images"] == "63.50 ± 1.00 (3) | 63.13 ± 0.29"
    assert layout.loc["WRN-16-2 alone | - | -", "100 images"] == "35.00 ± 1.00 (3)"  # no published row of its own
    assert layout.loc["WRN-16-8 alone | - | - (not run here)", "500 images"] == "- | 62.97 ± 0.41"
    assert layout.loc["linear | Morlet | fixed", "500 images"] == "-"
    linear_only = analyze.paper_layout(lit[lit.protocol.str.startswith("linear")])
    assert not linear_only.index.str.contains("WRN").any()  # no WRN run: no WRN reference rows
    plt = analyze.pyplot(False)
    analyze.plot_literature(plt, lit, str(tmp_path / "lit.png"))
    assert is_png(tmp_path / "lit.png")


def test_the_wrn_target_is_the_highest_published_wrn_row_and_our_cnn_alone():
    rows = [(analyze.WRN_NAMED, 100, 44.0), (analyze.WRN_NAMED, 500, 63.0), (analyze.WRN_NAMED, 1000, 72.0),
            (analyze.CNN_CONTROL, 100, 45.0), (analyze.CNN_CONTROL, 1000, 70.0), ("WRN-16-8 | Morlet | fixed", 100, 50.0)]
    lit = pd.DataFrame([{"protocol": p, "train_size": n, "n": 3, "mean": m, "std": 1.0} for p, n, m in rows])
    target = analyze.wrn_target(lit).set_index("train_size")
    assert list(target.bar_row) == ["WRN-16-8 | Morlet | learnt", "WRN-16-8 | Morlet | learnt", "WRN-16-8 alone | - | -"]
    assert list(target.published_bar) == [43.60, 63.13, 71.37]
    assert target.met[100] is False  # above every published row (43.60) but not our CNN alone (45.0)
    assert target.met[500] is None and target.control_n[500] == 0  # no CNN-alone run at 500 images: undecided
    assert target.met[1000] is True  # 72.0: above the published WRN-16-8 alone (71.37) and our 70.0
    assert analyze.wrn_target(lit[lit.protocol != analyze.WRN_NAMED]) is None


def test_the_literature_pairs_answer_each_protocol_question_by_seed_and_size():
    accs = {"linear | Morlet | learnt taps, per channel": (54.5, 53.5, 54.0), "linear | Morlet | fixed": (52.0, 50.0, 51.5),
            "linear | random | learnt taps, per channel": (47.5, 45.0, 47.5), "linear | random | fixed": (51.0, 46.5, 52.0)}
    table = pd.DataFrame([{"protocol": p, "train_size": n, "seed": seed, "dataset": "folder", "select": "last",
                           "joint_acc": acc + (n == 100), "finetune_acc": np.nan}
                          for p, seeds in accs.items() for seed, acc in enumerate(seeds) for n in (100, 500)])
    table = pd.concat([table, table.assign(select="test", joint_acc=99.0)])  # chosen on test: never paired
    pairs = analyze.literature_pairs(table).set_index(["comparison", "train_size"])
    init = pairs.loc[("linear | Morlet | learnt taps, per channel  -  linear | random | learnt taps, per channel", 500)]
    assert init.n == 3 and init.mean_diff == pytest.approx(22 / 3) and init.std_diff == pytest.approx((13 / 12) ** 0.5)
    learning = pairs.loc[("linear | random | learnt taps, per channel  -  linear | random | fixed", 100)]
    assert learning.mean_diff == pytest.approx(-3.1666667) and learning.p_value == pytest.approx(
        stats.ttest_rel([47.5, 45.0, 47.5], [51.0, 46.5, 52.0]).pvalue)
    assert len(pairs) == 6  # three of the questions at two sizes; those without both rows are left out


def test_the_wrn_head_is_paired_with_the_linear_head_on_the_same_seeds():
    accs = {"WRN-16-8 | Morlet | fixed": (53.0, 52.5, 52.7), "linear | Morlet | fixed": (51.0, 51.5, 50.9),
            analyze.WRN_NAMED: (55.4, 57.1, 55.8), "linear | Morlet | learnt taps, dense": (57.0, 57.5, 57.3)}
    table = pd.DataFrame([{"protocol": p, "train_size": 500, "seed": seed, "dataset": "folder", "select": "last",
                           "joint_acc": acc, "finetune_acc": np.nan}
                          for p, seeds in accs.items() for seed, acc in enumerate(seeds)])
    pairs = analyze.literature_pairs(table).set_index("comparison")
    fixed = pairs.loc["WRN-16-8 | Morlet | fixed  -  linear | Morlet | fixed"]
    assert fixed.mean_diff == pytest.approx(1.6) and fixed.p_value == pytest.approx(
        stats.ttest_rel([53.0, 52.5, 52.7], [51.0, 51.5, 50.9]).pvalue)
    assert pairs.loc[f"{analyze.WRN_NAMED}  -  linear | Morlet | learnt taps, dense"].mean_diff == pytest.approx(-3.5 / 3)
    assert len(pairs) == 3  # with learnt - fixed under the WRN head; learnt Morlet + linear not run: left out


def test_a_run_at_another_budget_is_its_own_row_paired_with_the_protocol_budget_by_seed():
    named = {"init": "wavelet", "learn": "morlet", "lr_extractor": 1e-2, "head": "cnn", "head_depth": 16,
             "head_width": 8, "n_blocks": 2}
    control = {"n_blocks": 0, "head": "cnn", "head_depth": 16, "head_width": 2}
    assert analyze.protocol_label({**named, "head_epochs": 400, "epochs": 400}, 100) == analyze.WRN_NAMED
    longer = analyze.protocol_label({**named, "head_epochs": 1500, "epochs": 1500}, 100)
    assert longer == f"{analyze.WRN_NAMED} (3,000 epochs)" and analyze.published_key(longer) == ("WRN-16-8", "Morlet",
                                                                                                  "learnt")
    assert analyze.protocol_label({**control, "head_epochs": None, "epochs": 5}, 100) == f"{analyze.CNN_CONTROL} (10 epochs)"
    assert analyze.protocol_label({**control, "head_epochs": 3, "epochs": 5}, 64) == analyze.CNN_CONTROL  # no protocol size
    fixed_longer = "linear | Morlet | fixed (3,000 epochs)"
    assert analyze.published_key(fixed_longer) == ("linear", "Morlet", "fixed")
    accs = {analyze.WRN_NAMED: (40.7, 37.9, 36.6), longer: (44.5, 43.9, 44.2),
            analyze.CNN_CONTROL: (35.0, 34.5, 36.8), f"{analyze.CNN_CONTROL} (3,000 epochs)": (41.0, 40.2, 43.5)}
    table = pd.DataFrame([{"protocol": p, "train_size": 100, "seed": seed, "dataset": "folder", "select": "last",
                           "joint_acc": acc, "finetune_acc": np.nan}
                          for p, seeds in accs.items() for seed, acc in enumerate(seeds)])
    pairs = analyze.literature_pairs(table).set_index("comparison")
    budget = pairs.loc[f"{longer}  -  {analyze.WRN_NAMED}"]  # the same arm and seed at 3,000 and at 800 epochs
    assert budget.n == 3 and budget.mean_diff == pytest.approx(17.4 / 3) and budget.p_value == pytest.approx(
        stats.ttest_rel([44.5, 43.9, 44.2], [40.7, 37.9, 36.6]).pvalue)
    same_budget = pairs.loc[f"{longer}  -  {analyze.CNN_CONTROL} (3,000 epochs)"]  # the named question at each budget
    assert same_budget.mean_diff == pytest.approx((3.5 + 3.7 + 0.7) / 3)
    assert len(pairs) == 4  # learnt - control at each budget; each row at 3,000 epochs against itself at 800
    lit = pd.DataFrame([{"protocol": p, "train_size": 100, "n": 3, "mean": np.mean(a), "std": np.std(a, ddof=1)}
                        for p, a in accs.items()])
    target = analyze.wrn_target(lit).set_index("budget")
    assert target.control_mean["3,000 epochs"] == pytest.approx(np.mean(accs[f"{analyze.CNN_CONTROL} (3,000 epochs)"]))
    # 44.2 at 3,000 epochs: above the published 43.60 and our CNN alone at 3,000 (41.57); 38.4 at 800 is not
    assert target.met["3,000 epochs"] and not target.met["protocol"]
    layout = analyze.paper_layout(lit.assign(published_mean=np.nan, published_std=np.nan))
    rows = list(layout.index)
    assert rows.index(longer) == rows.index(analyze.WRN_NAMED) + 1  # beside the same row at the protocol's budget


def test_the_stability_summary_averages_each_model_over_its_checkpoints():
    rows = [{"checkpoint": f"{model}{seed}", "model": model, "train_size": 100, "seed": seed, "kind": "rotation",
             "strength": 5, "mean": change, "of_unrelated": change / 2}
            for model, seed, change in (("a", 0, 0.2), ("a", 1, 0.4), ("b", 0, 0.5))]
    summary = analyze.stability_summary(pd.DataFrame(rows))
    assert summary[["model", "n"]].values.tolist() == [["a", 2], ["b", 1]]
    np.testing.assert_allclose(summary.change, [0.3, 0.5])
    np.testing.assert_allclose(summary.of_unrelated, [0.15, 0.25])
    np.testing.assert_allclose(summary.change_std[0], math.sqrt(0.02))  # sample std of 0.2 and 0.4
    assert math.isnan(summary.change_std[1])


def test_filters_of_a_learnt_morlet_checkpoint_print_its_parameters_before_and_after(tmp_path, capsys):
    save_dir = tmp_path / "morlet"
    train.main(train.get_args_parser().parse_args([
        "--dataset", "synthetic", "--train-size", "200", "--n-blocks", "1", "--L", "2", "--epochs", "1",
        "--global-batch-size", "50", "--seed", "3", "--print-freq", "0", "--threads", "1", "--lr-extractor", "1e-2",
        "--device", "cpu", "--learn", "morlet", "--init", "random", "--joint", "--save-dir", str(save_dir)]))
    capsys.readouterr()
    code, out, err = run_analyze(capsys, "--results-dir", str(tmp_path), "--filters", str(save_dir / "joint" / "best.pth"))
    assert code == 0, err
    (results,) = glob.glob(str(save_dir / "results_*.json"))
    recorded = json.load(open(results))["results"]["morlet_parameters"]
    rows = out.split("Morlet parameters")[1].splitlines()[4:6]  # orientations 0 and 1
    for row, start, end in zip(rows, recorded["initial"][0]["orientations"], recorded["learnt"][0]["orientations"]):
        values = [float(v) for v in row.split()[1:]]  # initial, learnt, change: theta, xi, sigma, slant each
        assert values[:4] == pytest.approx([start[k] for k in ("theta", "xi", "sigma", "slant")], abs=1e-4)
        assert values[4:8] == pytest.approx([end[k] for k in ("theta", "xi", "sigma", "slant")], abs=1e-4)
