import itertools
import math
import os
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from scattering_net import ModelConfig as Config, ScatteringNet, count_parameters, plan_blocks


def matches_spec_rounding(n, text):
    """True when n rounds to a figure of docs/DESIGN.md's tables, e.g. '3.98 B' means 3.975e9 <= n < 3.985e9."""
    number, unit = text.split()
    decimals = len(number.partition(".")[2])
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}[unit]
    return abs(n / scale - float(number)) <= 0.5 * 10 ** -decimals


@pytest.mark.parametrize("n_blocks,L,channels,classifier_in", [
    (2, 8, [3, 27, 243], 15_552),
    (2, 4, [3, 15, 75], 4_800),
    (3, 8, [3, 27, 243, 2_187], 34_992),
    (3, 4, [3, 15, 75, 375], 6_000),
])
def test_channel_growth_table(n_blocks, L, channels, classifier_in):
    plan = count_parameters(Config(n_blocks=n_blocks, L=L))
    assert [b.in_channels for b in plan["blocks"]] + [plan["blocks"][-1].out_channels] == channels
    assert plan["classifier_in"] == classifier_in


def test_mixing_horizon_table():
    # docs/DESIGN.md: block, C_in, dense wavelet params, horizon-27 wavelet params (K=7, L=8)
    table = [(0, 3, "7.5 K", "7.5 K"), (1, 27, "607 K", "607 K"), (2, 243, "49 M", "5.5 M"),
             (3, 2_187, "3.98 B", "49 M"), (4, 19_683, "322.7 B", "443 M")]
    dense = plan_blocks(Config(n_blocks=5, L=8, kernel_size=7))
    horizon = plan_blocks(Config(n_blocks=5, L=8, kernel_size=7, mixing_horizon=27))
    for j, c_in, dense_text, horizon_text in table:
        assert dense[j].in_channels == c_in
        assert matches_spec_rounding(dense[j].wavelet_params, dense_text)
        assert matches_spec_rounding(horizon[j].wavelet_params, horizon_text)
    assert dense[3].wavelet_params == 3_984_213_177
    assert dense[3].wavelet_params * 4 / 2 ** 30 == pytest.approx(14.8, abs=0.05)  # "~15 GB" of fp32
    assert [b.groups for b in horizon] == [1, 1, 9, 81, 729]


@pytest.mark.parametrize("gap,lowpass_last,channels,spec_millions", [
    (False, False, 50_421, 2_470), (True, False, 50_421, 50.4), (False, True, 7_203, 353), (True, True, 7_203, 7.2),
])
def test_imagenet_classifier_table(gap, lowpass_last, channels, spec_millions):
    plan = count_parameters(Config(n_blocks=5, in_spatial=224, nb_classes=1000, L=6, global_avg_pool=gap,
                                   lowpass_last=lowpass_last))
    spatial = 1 if gap else 7
    assert plan["classifier_channels"] == channels and plan["classifier_spatial"] == spatial
    assert plan["n_params_classifier"] == channels * spatial ** 2 * 1000 + 1000
    # the spec rounds 2,470.6 M down and 352.9 M up: agree to 0.1 %
    assert plan["n_params_classifier"] / 1e6 == pytest.approx(spec_millions, rel=1e-3)


@pytest.mark.parametrize("kwargs", [
    {}, {"modulus_type": "phase_relu"}, {"mixing_horizon": 3}, {"global_avg_pool": True},
    {"lowpass_last": True}, {"global_avg_pool": True, "lowpass_last": True, "L": 4},
    {"learn": "morlet"}, {"learn": "morlet", "modulus_type": "phase_relu", "lowpass_last": True, "max_order": 1},
    {"head": "cnn", "head_depth": 10, "head_width": 2}, {"head": "cnn", "n_blocks": 0, "head_depth": 16, "head_width": 8},
])
def test_analytic_count_equals_the_built_model(kwargs):
    model = ScatteringNet(Config(**kwargs))
    plan = count_parameters(Config(**kwargs))
    assert sum(p.numel() for p in model.parameters()) == plan["n_params_total"]
    assert sum(p.numel() for p in model.extractor_parameters()) == plan["n_params_extractor"]
    assert sum(p.numel() for p in model.head_parameters()) == plan["n_params_head"]


def test_forward_backward_and_features():
    torch.manual_seed(0)
    model = ScatteringNet(Config(L=4, modulus_type="phase_relu"))
    x = torch.randn(4, 3, 32, 32)
    assert model.features(x).shape == (4, 75, 8, 8)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.blocks[0].psi_real.weight.grad.abs().sum() > 0


def test_global_avg_pool_and_lowpass_last():
    x = torch.randn(2, 3, 32, 32)
    model = ScatteringNet(Config(L=4, global_avg_pool=True, lowpass_last=True))
    assert model.features(x).shape == (2, 15, 8, 8)
    assert model.classifier.in_features == 15 and model(x).shape == (2, 10)


def test_frozen_extractor_and_head_split():
    model = ScatteringNet(Config(learnable=False))
    assert not any(p.requires_grad for p in model.extractor_parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"bn.weight", "bn.bias", "classifier.weight", "classifier.bias"}


def test_describe_one_line_per_block():
    lines = ScatteringNet(Config(n_blocks=3, L=8, mixing_horizon=27)).describe()
    assert lines[0] == "block 0: 3 -> 27 channels, 32x32 -> 16x16, 7,605 params (7,497 wavelet), dense"
    assert lines[2].startswith("block 2: 243 -> 2,187 channels, 8x8 -> 4x4,")
    assert lines[2].endswith("grouped (9 groups of 27)")
    assert lines[3] == "head: BatchNorm2d(2,187) -> Linear(34,992 -> 10), 354,304 params"
    assert lines[4] == "total: 6,444,199 params (6,089,895 extractor, 6,444,199 trainable)"  # 6,089,895 + 354,304


@pytest.mark.parametrize("kwargs,message", [
    ({"in_spatial": 3}, "in_spatial=3 is too small for n_blocks=2: the last block would get 1x1 input (each block "
                        "halves the resolution, rounding down)"),
    ({"in_spatial": 6, "padding_mode": "reflect"},
     "padding_mode='reflect' needs every block's input larger than kernel_size // 2 = 3, but the last block gets 3x3"),
    ({"n_blocks": 0}, "n_blocks must be a positive integer (or 0 with head='cnn': the CNN alone), got 0"),
    ({"head": "cnn", "head_depth": 12}, "head_depth must be 6n + 4 for n >= 1 (10, 16, 22, 28, ...), got 12"),
    ({"head": "mlp"}, "head must be one of ('linear', 'cnn'), got 'mlp'"),
    ({"nb_classes": 0}, "nb_classes must be a positive integer, got 0"),
    ({"mixing_horizon": 4}, "mixing_horizon=4 does not divide in_channels=27; valid values: [1, 3, 9, 27] "
                            "(or any value >= 27 for dense)"),
    ({"padding_mode": "wrap"}, "padding_mode must be one of ('zeros', 'reflect', 'replicate', 'circular'), got 'wrap'"),
    ({"learn": "morlet", "mixing_horizon": 3},
     "learn='morlet' filters each input channel on its own: mixing_horizon must be 1 (or unset), got 3"),
])
def test_impossible_configurations(kwargs, message):
    with pytest.raises(ValueError) as e:
        ScatteringNet(Config(**kwargs))
    assert str(e.value) == message


def test_config_is_keyword_only_and_older_checkpoints_still_load():
    with pytest.raises(TypeError):
        Config(2, 3)  # positional fields could be swapped unnoticed (global_avg_pool vs lowpass_last)
    with pytest.raises(TypeError, match="ScatteringNet takes a ModelConfig, got dict"):
        ScatteringNet({"n_blocks": 2})
    flags = {"dataset": "fashion-mnist", "n_blocks": 1, "L": 4, "kernel_size": 5, "modulus_type": "phase_relu",
             "mixing_horizon": None, "global_avg_pool": True, "lowpass_last": False, "lr_head": 1e-3}
    import data
    old = Config.from_dict(flags, data.INFO["fashion-mnist"])  # a checkpoint from before ModelConfig
    assert old == Config(n_blocks=1, in_channels=1, in_spatial=28, L=4, kernel_size=5, modulus_type="phase_relu",
                         global_avg_pool=True)
    assert Config.from_dict(asdict(old)) == old


def test_six_blocks_on_imagenet_crops_round_down_like_pooling():
    plan = count_parameters(Config(n_blocks=6, in_spatial=224, nb_classes=1000, L=6, mixing_horizon=21,
                                   global_avg_pool=True, lowpass_last=True))
    assert [b.out_spatial for b in plan["blocks"]] == [112, 56, 28, 14, 7, 3]
    net = ScatteringNet(Config(n_blocks=3, in_channels=1, in_spatial=14, L=2, kernel_size=3))  # 14 -> 7 -> 3 -> 1
    assert net.features(torch.randn(2, 1, 14, 14)).shape == (2, 27, 1, 1)


def test_wrong_input_shape():
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, 32, 32\), got \(1, 3, 28, 28\)"):
        ScatteringNet(Config())(torch.randn(1, 3, 28, 28))


def test_cli_prints_plan():
    ok = subprocess.run([sys.executable, "scattering_net.py", "--n-blocks", "5", "--L", "6", "--in-spatial", "224",
                         "--nb-classes", "1000", "--global-avg-pool", "--lowpass-last"], capture_output=True, text=True)
    assert ok.returncode == 0
    assert "head: BatchNorm2d(7,203), global average pool -> Linear(7,203 -> 1000), 7,218,406 params" in ok.stdout

def test_cli_rejects_bad_sizes_with_one_line(capsys):
    import scattering_net
    with pytest.raises(SystemExit) as e:
        scattering_net.main(scattering_net.get_args_parser().parse_args(["--in-spatial", "3"]))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: in_spatial=3 is too small for n_blocks=2: the last block would get 1x1 input (each block halves the "
        "resolution, rounding down)"]


def test_filter_movement_is_zero_at_init_and_sees_a_change():
    net = ScatteringNet(Config(L=4, lowpass_last=True))
    at_init = net.filter_movement()
    assert [m["block"] for m in at_init] == [0]  # the low-pass-only last block has no wavelets
    assert at_init[0]["relative_l2"] < 1e-6 and at_init[0]["angle_shift_deg"] == 0
    with torch.no_grad():
        net.blocks[0].psi_imag.weight.mul_(-1)  # conjugate: the spectrum peak turns by 180 degrees
    moved = net.filter_movement()[0]
    assert moved["angle_shift_deg"] == pytest.approx(180, abs=1e-6) and moved["frequency_shift"] < 1e-9


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_equals_cpu_and_a_cuda_checkpoint_loads_on_cpu(tmp_path):
    import utils
    torch.manual_seed(0)
    net, x = ScatteringNet(Config(L=4, modulus_type="phase_relu")), torch.randn(4, 3, 32, 32)
    expected = net(x)
    on_gpu = net.cuda()
    torch.testing.assert_close(on_gpu(x.cuda()).cpu(), expected, rtol=1e-3, atol=1e-3)
    utils.save_checkpoint(str(tmp_path / "best.pth"), {"state_dict": on_gpu.state_dict()})
    restored = ScatteringNet(Config(L=4, modulus_type="phase_relu"))
    restored.load_state_dict(utils.load_checkpoint(str(tmp_path / "best.pth"))["state_dict"])
    torch.testing.assert_close(restored(x), expected, rtol=1e-5, atol=1e-5)


def brute_force_paths(n_blocks, L, max_order):
    """Every path through n blocks (low-pass or one of L wavelets per block) with at most max_order wavelets."""
    return [p for p in itertools.product(range(L + 1), repeat=n_blocks) if sum(c > 0 for c in p) <= max_order]


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("L", [2, 4, 8])
@pytest.mark.parametrize("max_order", [1, 2, 3])
def test_order_limited_channel_counts(n_blocks, L, max_order):
    plan = count_parameters(Config(n_blocks=n_blocks, L=L, in_channels=3, in_spatial=64, max_order=max_order))
    channels = plan["blocks"][-1].out_channels
    assert channels == 3 * len(brute_force_paths(n_blocks, L, max_order))
    assert channels == 3 * sum(math.comb(n_blocks, k) * L ** k for k in range(max_order + 1))
    if max_order == 2:  # kymatio's count for Scattering2D(J=n, L, max_order=2)
        assert channels == 3 * (1 + n_blocks * L + L ** 2 * n_blocks * (n_blocks - 1) // 2)
    if max_order >= n_blocks:
        assert channels == 3 * (1 + L) ** n_blocks


def all_orders_layout(in_channels, L, n_blocks):
    """Path order of every output channel in the design's layout: cat(S0 of every input, S1 as c*L + l)."""
    orders = [0] * in_channels
    for _ in range(n_blocks):
        orders = orders + [o + 1 for o in orders for _ in range(L)]
    return torch.tensor(orders)


@pytest.mark.parametrize("learnable,max_order,resolution", [(False, 2, "half"), (True, 2, "half"),
                                                            (False, 1, "full"), (True, 2, "full"),
                                                            (False, 2, "subsample")])
def test_order_limited_net_is_the_all_orders_net_restricted(learnable, max_order, resolution):
    """The fixed per-channel transform with --max-order M is exactly the cascade's paths of order <= M, sorted."""
    torch.manual_seed(0)
    common = dict(n_blocks=3, L=3, in_channels=2, in_spatial=24, kernel_size=5, learnable=learnable,
                  modulus_type="phase_relu", modulus_resolution=resolution)
    x = torch.randn(2, 2, 24, 24, dtype=torch.float64)
    limited = ScatteringNet(Config(max_order=max_order, **common)).double().features(x)
    every = ScatteringNet(Config(**common)).double().features(x)
    orders = all_orders_layout(2, 3, 3)
    kept = every[:, orders <= max_order].flatten(2)  # (B, C_M, H*W): the paths of order <= M
    flat = limited.flatten(2)  # (B, C_M, H*W)
    assert flat.shape == kept.shape
    distance = (flat[:, :, None] - kept[:, None]).abs().amax(dim=(0, 3))  # (C_M, C_M)
    match = distance.argmin(dim=1)
    assert distance.min(dim=1).values.max() < 1e-10 and len(set(match.tolist())) == len(match)  # a bijection
    limited_orders = orders[orders <= max_order][match]
    assert torch.equal(limited_orders, limited_orders.sort().values)  # channels sorted by order


def test_order_limit_in_the_plan_and_its_errors():
    plan = count_parameters(Config(n_blocks=3, L=8, max_order=2, modulus_type="phase_relu"))
    assert [b.wavelet_inputs for b in plan["blocks"]] == [3, 27, 51]  # orders 0-1: 3 + 24 + 24
    assert [b.out_channels for b in plan["blocks"]] == [27, 243, 651]  # 3 x (1 + 24 + 192)
    assert plan["blocks"][2].describe().endswith("dense, wavelets on the 51 channels of order < 2")
    model = ScatteringNet(Config(n_blocks=3, L=8, max_order=2, modulus_type="phase_relu"))
    assert sum(p.numel() for p in model.parameters()) == plan["n_params_total"]
    with pytest.raises(ValueError) as e:
        count_parameters(Config(n_blocks=3, L=8, max_order=2, mixing_horizon=27))
    assert str(e.value) == ("mixing_horizon=27 does not divide block 2's 51 input channels of order < 2; valid values: "
                            "[1, 3, 17, 51] (or any value >= 51 for dense)")
    for field, value, message in (("max_order", 0, "max_order must be a positive integer, got 0"),
                                  ("modulus_resolution", "x", "modulus_resolution must be one of ('half', 'subsample', "
                                                              "'full'), got 'x'")):
        with pytest.raises(ValueError) as e:
            count_parameters(Config(**{field: value}))
        assert str(e.value) == message


def test_training_memory_grows_with_the_batch_and_counts_the_optimizer_state():
    from scattering_net import training_memory
    config = Config(n_blocks=2, L=4, in_channels=3, in_spatial=16, max_order=1)
    small, large = training_memory(config, 10), training_memory(config, 30)
    params = count_parameters(config)["n_params_total"]
    assert small["optimizer"] == large["optimizer"] == 16 * params
    per_image = (large["activations"] - small["activations"]) / 20
    block_outputs = 4 * (3 * 5 * 8 * 8 + 3 * 9 * 4 * 4)  # fp32 outputs of both blocks, (B, 15, 8, 8), (B, 27, 4, 4)
    assert per_image >= block_outputs and small["activations"] >= 10 * per_image


def test_memory_batch_prints_the_measured_total(capsys):
    import scattering_net
    scattering_net.main(scattering_net.get_args_parser().parse_args(
        ["--n-blocks", "2", "--L", "4", "--in-spatial", "16", "--memory-batch", "8"]))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("training memory at batch 8 (fp32, every weight trained): ") and last.endswith(" GiB")


def test_the_design_documents_keyword_constructor_runs_as_written():
    # Traditional scattering (fixed wavelets + complex modulus)
    model = ScatteringNet(
        n_blocks=3, in_channels=3, in_spatial=32,
        nb_classes=10, L=8,
        learnable=False, modulus_type='complex_modulus',
    )
    assert model.config == Config(n_blocks=3, learnable=False) and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # Learnable scattering (trainable wavelets + phase ReLU with collapse)
    model = ScatteringNet(
        n_blocks=3, in_channels=3, in_spatial=32,
        nb_classes=10, L=8,
        learnable=True, modulus_type='phase_relu',
    )
    assert model.config == Config(n_blocks=3, modulus_type="phase_relu")
    assert ScatteringNet().config == Config()  # the keywords' defaults are ModelConfig's, one copy
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_block'"):
        ScatteringNet(n_block=3)
    with pytest.raises(TypeError, match=r"ScatteringNet takes a ModelConfig or keywords, not both \(got \['L'\] too\)"):
        ScatteringNet(Config(), L=4)


def test_the_design_documents_checkpoint_snippet_runs(tmp_path, capsys, monkeypatch):
    import quick_check
    quick_check.main(quick_check.get_args_parser().parse_args([
        "--dataset", "synthetic", "--train-size", "200", "--n-blocks", "1", "--L", "4", "--epochs", "1",
        "--batch-size", "50", "--seed", "0", "--print-freq", "0", "--threads", "1", "--device", "cpu",
        "--select", "last", "--save-dir", str(tmp_path / "runs" / "phase_b")]))
    monkeypatch.chdir(tmp_path)
    saved = torch.load("runs/phase_b/best.pth", weights_only=True)["model_config"]
    # the snippet, with its ScatteringNet(...) filled from the checkpoint's config
    import torch as torch_in_snippet
    from scattering_net import ScatteringNet as Net

    model = Net(**saved)
    ckpt = torch_in_snippet.load("runs/phase_b/best.pth", weights_only=False)
    model.load_state_dict(ckpt["state_dict"])
    print(f"Best val acc: {ckpt['best_val_acc']:.2f}% (epoch {ckpt['epoch']})")
    assert capsys.readouterr().out.splitlines()[-1].startswith("Best val acc: ")


def test_the_installed_modules_are_the_model_alone(tmp_path):
    """pyproject.toml installs wavelet_kernels, spatial_scattering and scattering_net only: they must work
    without the scripts' modules (utils, data, train) beside them."""
    import shutil
    import tomllib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        modules = tomllib.load(f)["tool"]["setuptools"]["py-modules"]
    assert modules == ["wavelet_kernels", "spatial_scattering", "scattering_net"]
    for name in modules:
        shutil.copy(os.path.join(root, f"{name}.py"), tmp_path)
    code = ("from scattering_net import ScatteringNet; import torch; "
            "print(ScatteringNet(n_blocks=2, L=4)(torch.zeros(1, 3, 32, 32)).shape)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "torch.Size([1, 10])"


def test_learnt_morlet_network_plan_random_init_and_table():
    config = Config(learn="morlet", modulus_type="phase_relu")
    lines = ScatteringNet(config).describe()
    assert lines[0] == "block 0: 3 -> 27 channels, 32x32 -> 16x16, 129 params (33 Morlet), grouped (3 groups of 1)"
    torch.manual_seed(0)
    wavelet, random = ScatteringNet(config), ScatteringNet(replace(config, init="random"))
    assert wavelet.morlet_table()[1]["orientations"][0] == pytest.approx(
        {"theta": 3 * np.pi / 8, "xi": 3 * np.pi / 4, "sigma": 0.8, "slant": 0.5})
    assert random.morlet_table()[1]["orientations"][0] != wavelet.morlet_table()[1]["orientations"][0]
    torch.testing.assert_close(random.blocks[0].phase_collapse.weight, wavelet.blocks[0].phase_collapse.weight)
    assert len(wavelet.morlet_parameters()) == 10 and ScatteringNet(Config()).morlet_parameters() == []
    assert ScatteringNet(Config()).morlet_table() is None
    x = torch.randn(2, 3, 32, 32)
    taps = ScatteringNet(replace(config, learn="taps"))
    taps.load_state_dict({k: v for k, v in wavelet.state_dict().items() if k in taps.state_dict()}, strict=False)
    torch.testing.assert_close(wavelet.features(x), taps.features(x), rtol=1e-5, atol=1e-5)  # the same at init


def test_the_cnn_head_is_a_wide_resnet():
    wrn = ScatteringNet(Config(n_blocks=0, head="cnn"))  # WRN-16-8 on CIFAR: the paper's 10,961,370 + input BN
    assert wrn.plan["n_params_total"] == 10_961_370 + 2 * 3
    assert wrn.describe()[0] == "head: wide residual network on the image (no scattering block) (3 channels), " \
                                "10,961,376 params"
    stages = [b for b in wrn.cnn.stages]
    assert len(stages) == 6 and [b.conv1.stride[0] for b in stages] == [1, 1, 2, 1, 2, 1]
    assert [b.conv2.out_channels for b in stages] == [128, 128, 256, 256, 512, 512]
    hybrid = ScatteringNet(Config(head="cnn", head_depth=10, head_width=1))
    x = torch.randn(2, 3, 32, 32)
    assert hybrid.cnn.stem.in_channels == 243 and hybrid(x).shape == (2, 10)
    assert hybrid.head_parameters() == list(hybrid.cnn.parameters())
    torch.testing.assert_close(hybrid(x), hybrid.cnn(hybrid.blocks(x)))


# The models torch.compile must trace whole: ModelConfig fields.
COMPILED_MODELS = {"fixed": dict(learnable=False, mixing_horizon=1), "dense": {},
                   "phase_relu": dict(modulus_type="phase_relu"), "learnt Morlet": dict(learn="morlet"),
                   "Morlet + CNN head": dict(learn="morlet", head="cnn", head_depth=10, head_width=1)}
EPOCH_BATCHES = (8, 8, 5)  # an epoch of three steps: two full batches, then the smaller last one


def compiled_epochs(model, epochs):
    """Train ``model`` for ``epochs`` epochs under torch.compile as runner.wrap_model compiles it (a new
    wrapper per phase, dynamic=False), with dynamo's eager backend: tracing is what is tested, not codegen."""
    runner = torch.compile(model, backend="eager", dynamic=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(max(EPOCH_BATCHES), 3, 32, 32)
    for _ in range(epochs):
        for batch in EPOCH_BATCHES:
            optimizer.zero_grad()
            runner(x[:batch]).logsumexp(dim=1).mean().backward()
            optimizer.step()


@pytest.mark.parametrize("name", COMPILED_MODELS)
def test_compiled_training_has_no_graph_break_and_only_the_expected_recompiles(name):
    """Two epochs of Phase A (extractor frozen), then two of Phase B (everything trains) when the model learns.

    Expected graphs, and nothing else: the full batch and the epoch's last, smaller batch (dynamic=False
    gives each batch size its own static graph), once per phase (Phase B changes requires_grad, which
    the first graphs are guarded on). Across epochs nothing is traced again.
    """
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    dynamo.reset()
    counters.clear()
    model = ScatteringNet(Config(**COMPILED_MODELS[name]))
    learns = any(p.requires_grad for p in model.extractor_parameters())
    for p in model.extractor_parameters():
        p.requires_grad_(False)
    compiled_epochs(model, epochs=2)
    expected = len(set(EPOCH_BATCHES))
    if learns:
        for p in model.extractor_parameters():
            p.requires_grad_(True)
        compiled_epochs(model, epochs=2)
        expected += len(set(EPOCH_BATCHES))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == expected
