import copy

import pytest
import torch
import torch.nn.functional as F

import data
from engine import EarlyStopping, evaluate, filter_deltas, train_one_epoch
from scattering_net import ModelConfig, ScatteringNet


def synthetic_loaders(n_train=600, batch_size=50):
    (x, y), (xt, yt), info = data.synthetic_textures(n_train, 0), data.synthetic_textures(300, 1), data.INFO["synthetic"]
    return (data.TensorLoader(x, y, info, batch_size, "cpu", True, seed=0),
            data.TensorLoader(xt, yt, info, 100, "cpu", False))


def test_synthetic_textures_are_learnt_well_above_chance():
    torch.manual_seed(0)
    train, val = synthetic_loaders()
    model = ScatteringNet(ModelConfig(n_blocks=1, L=8, learnable=False))
    optimizer = torch.optim.AdamW(model.head_parameters(), lr=3e-3)
    for epoch in range(1, 4):
        train.set_epoch(epoch)
        stats = train_one_epoch(model, train, optimizer, "cpu", epoch, print_freq=0)
    result = evaluate(model, val, "cpu")
    assert result["acc"] > 60 and result["samples"] == 300  # chance is 10 %
    assert set(stats) == {"loss", "acc", "img_per_s", "seconds", "samples"} and stats["samples"] == 600


@pytest.mark.parametrize("amp", [False, True])
def test_one_batch_is_exactly_one_optimizer_step(amp):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model = ScatteringNet(ModelConfig(n_blocks=1, L=2))
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = reference(x)
    F.cross_entropy(logits.float(), y).backward()
    lr = 0.1
    expected = {n: p.detach() - lr * p.grad for n, p in reference.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    train_one_epoch(model, [(x, y)], optimizer, "cpu", 1, amp=amp, print_freq=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-4, atol=1e-6)


def test_frozen_extractor_builds_no_graph():
    x = torch.randn(2, 3, 32, 32)
    assert ScatteringNet(ModelConfig(learnable=False)).features(x).grad_fn is None
    assert ScatteringNet(ModelConfig(learnable=True)).features(x).grad_fn is not None


def test_evaluate_counts_exactly():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return F.one_hot(x[:, 0, 0, 0].long(), 3).float()
    x = torch.tensor([0, 1, 2, 2, 1]).float().view(5, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 0, 0])
    result = evaluate(Fixed(), [(x[:3], y[:3]), (x[3:], y[3:])], "cpu")
    assert result["acc"] == pytest.approx(60.0) and result["samples"] == 5


def test_progress_lines(capsys):
    train, _ = synthetic_loaders(n_train=100, batch_size=10)
    model = ScatteringNet(ModelConfig(n_blocks=1, L=2, learnable=False))
    lines = []
    train_one_epoch(model, train, torch.optim.AdamW(model.head_parameters()), "cpu", 3, print_freq=4, log=lines.append)
    assert len(lines) == 2 and lines[0].startswith("epoch 3 [4/10] loss ") and " img/s eta " in lines[0]


def test_early_stopping():
    stopper = EarlyStopping(patience=2)
    history = [(50, True), (60, True), (59, False), (60, False)]
    for epoch, (acc, improved) in enumerate(history, 1):
        assert stopper.step(acc, epoch) == improved
    assert stopper.should_stop and stopper.best == 60 and stopper.best_epoch == 2
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored.should_stop and restored.best_epoch == 2


def test_filter_deltas():
    model = ScatteringNet(ModelConfig(L=2, modulus_type="phase_relu"))
    initial = model.wavelet_weights()
    # the K x K filters only: not the pooling or the phase-collapse weights
    assert set(initial) == {f"blocks.{j}.{n}.weight" for j in (0, 1) for n in ("phi_conv", "psi_real", "psi_imag")}
    assert filter_deltas(initial, model.wavelet_weights()) == {"filter_delta_l2": 0.0, "filter_delta_relative": 0.0}
    with torch.no_grad():
        model.blocks[0].psi_real.weight[0, 0, 0, 0] += 3.0
        model.blocks[1].phi_conv.weight[0, 0, 0, 0] -= 4.0
    deltas = filter_deltas(initial, model.wavelet_weights())
    norm = sum(float(w.pow(2).sum()) for w in initial.values()) ** 0.5
    assert deltas["filter_delta_l2"] == pytest.approx(5.0)
    assert deltas["filter_delta_relative"] == pytest.approx(5.0 / norm)
