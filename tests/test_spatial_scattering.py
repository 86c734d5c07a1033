import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spatial_scattering
import wavelet_kernels as wk
from spatial_scattering import (POLYPHASE_MAX_GROUP_INPUTS, RANDOM_SIGMA, RANDOM_SLANT, RANDOM_THETA, RANDOM_XI,
                                LowpassAndModulus, MorletBank, ScatteringBlock, block_parameter_count,
                                compose_downsampling, filter_movement, mixing_groups, output_orders, safe_modulus,
                                polyphase_conv, shares_filters, split_groups, strided_conv)


def per_channel_scattering(x, L, K, padding_mode="zeros"):
    """J=1 scattering of each channel separately from the NumPy filter bank (groups=C conv)."""
    bank = wk.filter_bank(L, K)
    C = x.shape[1]
    psi = torch.as_tensor(bank["psi"]).to(torch.complex128 if x.dtype == torch.float64 else torch.complex64)
    phi = torch.as_tensor(bank["phi"], dtype=x.dtype)
    pad = K // 2
    xp = F.pad(x, (pad,) * 4, mode="constant" if padding_mode == "zeros" else padding_mode)
    S0 = F.avg_pool2d(F.conv2d(xp, phi.expand(C, 1, K, K), groups=C), 2)
    w_re = psi.real.to(x.dtype).repeat(C, 1, 1).unsqueeze(1)  # (L, K, K) -> (C*L, 1, K, K)
    w_im = psi.imag.to(x.dtype).repeat(C, 1, 1).unsqueeze(1)
    re = F.avg_pool2d(F.conv2d(xp, w_re, groups=C), 2)
    im = F.avg_pool2d(F.conv2d(xp, w_im, groups=C), 2)
    return S0, torch.sqrt(re ** 2 + im ** 2)


@pytest.mark.parametrize("modulus_type", ["complex_modulus", "phase_relu"])
@pytest.mark.parametrize("C,L", [(3, 8), (5, 4)])
def test_shapes_and_channels(modulus_type, C, L):
    block = ScatteringBlock(C, L=L, modulus_type=modulus_type)
    out = block(torch.randn(2, C, 16, 12))
    assert out.shape == (2, C * (1 + L), 8, 6) and block.out_channels == C * (1 + L)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("mixing_horizon", [None, 1, 2])
@pytest.mark.parametrize("modulus_type", ["complex_modulus", "phase_relu"])
@pytest.mark.parametrize("size", [(10, 14), (11, 7)])  # odd sizes round down, as 2 x 2 pooling does
def test_fused_forward_equals_step_by_step(padding_mode, mixing_horizon, modulus_type, size):
    torch.manual_seed(0)
    block = ScatteringBlock(4, L=3, kernel_size=5, modulus_type=modulus_type, mixing_horizon=mixing_horizon,
                            padding_mode=padding_mode).double()
    with torch.no_grad():  # move away from the structured init so every weight matters
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    torch.testing.assert_close(block(x), block.reference_forward(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("mixing_horizon", [None, 1, 3])
@pytest.mark.parametrize("modulus_type", ["complex_modulus", "phase_relu"])
@pytest.mark.parametrize("orders,resolution", [(None, "full"), ((1, 2, 3), "half"), ((1, 2, 3), "full"),
                                                 ((3, 3), "half"), (None, "subsample"), ((1, 2, 3), "subsample")])
def test_order_limited_and_full_resolution_forward_equals_step_by_step(padding_mode, mixing_horizon, modulus_type,
                                                                         orders, resolution):
    torch.manual_seed(0)
    block = ScatteringBlock(6, L=3, kernel_size=5, modulus_type=modulus_type, mixing_horizon=mixing_horizon,
                            padding_mode=padding_mode, max_order=orders and 2, in_orders=orders,
                            modulus_resolution=resolution).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 6, 11, 10, dtype=torch.float64)
    out = block(x)
    assert out.shape == (2, block.out_channels, 5, 5)
    torch.testing.assert_close(out, block.reference_forward(x), rtol=1e-10, atol=1e-10)


def test_order_limit_channels_and_filters():
    block = ScatteringBlock(6, L=3, kernel_size=5, max_order=2, in_orders=(1, 2, 3))
    assert block.wavelet_inputs == 3 and block.psi_real.weight.shape == (9, 3, 5, 5)
    assert block.out_orders == output_orders((1, 2, 3), 3, 2) == (1, 2 + 3, 3 + 6)  # no order 3
    assert block.out_channels == 15 == block(torch.randn(1, 6, 8, 8)).shape[1]
    assert output_orders((1, 2, 3), 3) == (1, 5, 9, 9)  # no limit: the order-2 inputs make order 3
    assert output_orders((4,), 8, 1) == (4, 32) and output_orders((4, 32), 8, 1) == (4, 64)


def test_dense_wavelets_never_see_the_channels_at_the_order_limit():
    """Learnt, dense filters cannot break the limit: the order-2 inputs reach the output through phi only."""
    torch.manual_seed(0)
    block = ScatteringBlock(6, L=3, max_order=2, in_orders=(1, 2, 3))
    for conv in block.modules():
        if isinstance(conv, torch.nn.Conv2d):
            conv.reset_parameters()  # dense, nothing of the init's structure left
    with torch.no_grad():
        block.phi_conv.weight.zero_()
    x = torch.randn(2, 6, 12, 12)
    moved = x.clone()
    moved[:, 3:] = torch.randn(2, 3, 12, 12)  # the order-2 channels
    torch.testing.assert_close(block(moved), block(x))
    assert not torch.allclose(block(moved.flip(1)), block(x))  # the lower orders do matter


def test_full_resolution_takes_the_modulus_before_the_pooling():
    """A wavelet response whose carrier the 2 x 2 mean cancels: |mean(z)| < mean(|z|), kymatio's order keeps the envelope."""
    x = torch.randn(1, 1, 16, 16)
    half = ScatteringBlock(1, L=4, max_order=None)
    full = ScatteringBlock(1, L=4, modulus_resolution="full")
    S1_half, S1_full = half(x)[:, 1:], full(x)[:, 1:]
    assert (S1_full >= S1_half - 1e-6).all() and (S1_full - S1_half).mean() > 0.05 * S1_full.mean()
    torch.testing.assert_close(full(x)[:, :1], half(x)[:, :1])  # the low-pass path is the same


@pytest.mark.parametrize("modulus_type", ["complex_modulus", "phase_relu"])
def test_subsample_takes_the_modulus_of_the_response_at_every_other_pixel(modulus_type):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    block = ScatteringBlock(1, L=4, modulus_type=modulus_type, modulus_resolution="subsample").double()
    re, im = block.psi_real(x)[..., ::2, ::2], block.psi_imag(x)[..., ::2, ::2]  # full resolution, top-left pixels
    torch.testing.assert_close(block(x)[:, 1:], block.reference_modulus(re, im), rtol=1e-10, atol=1e-10)
    half = ScatteringBlock(1, L=4, modulus_type=modulus_type).double()
    torch.testing.assert_close(block(x)[:, :1], half(x)[:, :1])  # the low-pass path keeps the mean
    assert block(x)[:, 1:].mean() > 1.5 * half(x)[:, 1:].mean()  # the carrier is no longer averaged away


def test_compose_downsampling_is_conv_then_pool():
    torch.manual_seed(0)
    w, d = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, 1, 2, 2, dtype=torch.float64)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    two_step = F.conv2d(F.conv2d(x, w), d, stride=2, groups=6)
    torch.testing.assert_close(F.conv2d(x, compose_downsampling(w, d), stride=2), two_step)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("mixing_horizon", [None, 1, 3])
def test_init_is_a_per_channel_scattering_transform(padding_mode, mixing_horizon):
    x = torch.randn(2, 6, 16, 16, dtype=torch.float64)
    block = ScatteringBlock(6, L=8, kernel_size=7, mixing_horizon=mixing_horizon, padding_mode=padding_mode).double()
    S0, S1 = per_channel_scattering(x, 8, 7, padding_mode)
    # the filters were stored as float32 before .double(): agreement to ~1e-8
    torch.testing.assert_close(block(x), torch.cat([S0, S1], 1), rtol=1e-5, atol=1e-7)


def test_block_diagonal_init_has_zero_off_diagonal_planes():
    block = ScatteringBlock(3, L=2, kernel_size=3)
    w = block.psi_real.weight.detach()  # (C*L, C, K, K)
    for o in range(6):
        for c in range(3):
            assert (w[o, c].abs().sum() > 0) == (o // 2 == c)
    torch.testing.assert_close(block.phi_pool.weight, torch.full((3, 1, 2, 2), 0.25))


def test_phase_relu_at_init_is_within_sqrt2_of_the_modulus():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    modulus = ScatteringBlock(3, modulus_type="complex_modulus")(x)[:, 3:]
    phase = ScatteringBlock(3, modulus_type="phase_relu")(x)[:, 3:]
    assert (phase >= modulus / math.sqrt(2) - 1e-6).all() and (phase <= modulus + 1e-6).all()
    assert (phase - modulus).abs().max() > 1e-3  # it is an approximation, not the same function


@pytest.mark.parametrize("modulus_type", ["complex_modulus", "phase_relu"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("options", [{}, {"max_order": 1, "in_orders": (1, 1), "modulus_resolution": "full"}])
def test_gradcheck_float64(modulus_type, padding_mode, options):
    torch.manual_seed(0)
    block = ScatteringBlock(2, L=2, kernel_size=3, modulus_type=modulus_type, padding_mode=padding_mode,
                            **options).double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


def test_gradcheck_wrt_the_filters():
    torch.manual_seed(0)
    block = ScatteringBlock(2, L=2, kernel_size=3, mixing_horizon=1).double()
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    names = ["phi_conv.weight", "psi_real.weight", "psi_imag.weight", "psi_pool.weight"]
    params = tuple(dict(block.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def f(*p):
        return torch.func.functional_call(block, dict(zip(names, p)), (x,))
    assert torch.autograd.gradcheck(f, params)


@pytest.mark.parametrize("modulus_type", ["complex_modulus", "phase_relu"])
def test_gradients_are_finite_at_zero_input(modulus_type):
    block = ScatteringBlock(3, modulus_type=modulus_type)
    x = torch.zeros(2, 3, 8, 8, requires_grad=True)
    block(x).sum().backward()
    grads = [x.grad] + [p.grad for p in block.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)


def test_learnable_flag():
    assert all(p.requires_grad for p in ScatteringBlock(3, learnable=True).parameters())
    frozen = ScatteringBlock(3, learnable=False, modulus_type="phase_relu")
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(torch.randn(1, 3, 8, 8)).requires_grad


def test_mixing_horizon_groups_and_parameter_counts():
    assert mixing_groups(27, None) == 1 and mixing_groups(27, 27) == 1 and mixing_groups(27, 100) == 1
    assert mixing_groups(243, 27) == 9 and mixing_groups(243, 1) == 243
    block = ScatteringBlock(12, L=2, kernel_size=3, mixing_horizon=4)
    assert block.psi_real.groups == 3 and block.psi_real.weight.shape == (24, 4, 3, 3)
    assert block.phi_conv.weight.shape == (12, 4, 3, 3)
    for kwargs in ({}, {"mixing_horizon": 4}, {"modulus_type": "phase_relu"}, {"lowpass_only": True}):
        b = ScatteringBlock(12, L=2, kernel_size=3, **kwargs)
        assert sum(p.numel() for p in b.parameters()) == block_parameter_count(12, 2, 3, **kwargs)
    for kwargs in ({}, {"mixing_horizon": 4}, {"modulus_type": "phase_relu"}):
        b = ScatteringBlock(12, L=2, kernel_size=3, max_order=1, in_orders=(4, 8), **kwargs)
        assert sum(p.numel() for p in b.parameters()) == block_parameter_count(12, 2, 3, wavelet_inputs=4, **kwargs)


def test_mixing_horizon_that_does_not_divide_lists_valid_values():
    with pytest.raises(ValueError, match=r"mixing_horizon=5 does not divide in_channels=12; "
                                         r"valid values: \[1, 2, 3, 4, 6, 12\]"):
        ScatteringBlock(12, mixing_horizon=5)


def test_lowpass_only_returns_S0():
    x = torch.randn(2, 3, 16, 16)
    full = ScatteringBlock(3)
    low = ScatteringBlock(3, lowpass_only=True)
    assert not hasattr(low, "psi_real") and low.out_channels == 3
    torch.testing.assert_close(low(x), full(x)[:, :3])


def test_state_dict_round_trip_keeps_spec_names():
    torch.manual_seed(0)
    a = ScatteringBlock(3, L=4, modulus_type="phase_relu")
    with torch.no_grad():
        a.psi_real.weight.add_(torch.randn_like(a.psi_real.weight))
    sd = a.state_dict()
    assert {"phi_conv.weight", "psi_real.weight", "psi_imag.weight", "phase_collapse.weight"} <= set(sd)
    b = ScatteringBlock(3, L=4, modulus_type="phase_relu")
    b.load_state_dict(sd)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.phase_collapse.weight, torch.full((12, 4, 1, 1), 1 / math.sqrt(2)))


def test_batch_shape_independence():
    block = ScatteringBlock(3, L=4)
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(block(x)[2:3], block(x[2:3]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"modulus_type": "abs"}, "modulus_type must be one of ('complex_modulus', 'phase_relu'), got 'abs'"),
    ({"padding_mode": "mirror"}, "padding_mode must be one of ('zeros', 'reflect', 'replicate', 'circular'), got 'mirror'"),
    ({"kernel_size": 4}, "kernel size K must be an odd integer >= 3 (the grid is centred on 0; a 1 x 1 wavelet is zero "
                          "once its mean is removed), got 4"),
    ({"L": 0}, "number of orientations L must be an integer >= 1, got 0"),
    ({"max_order": 0}, "max_order must be a positive integer or None, got 0"),
    ({"max_order": 2, "in_orders": (1, 1)}, "in_orders must count the 3 input channels by order (with max_order), "
                                             "got (1, 1)"),
    ({"modulus_resolution": "quarter"}, "modulus_resolution must be one of ('half', 'subsample', 'full'), got "
                                        "'quarter'"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as e:
        ScatteringBlock(3, **kwargs)
    assert str(e.value) == message


def test_mixing_horizon_must_divide_the_channels_that_get_wavelets():
    with pytest.raises(ValueError) as e:
        ScatteringBlock(6, mixing_horizon=2, max_order=1, in_orders=(3, 3))
    assert str(e.value) == ("mixing_horizon=2 does not divide the 3 input channels of order < 1; valid values: "
                            "[1, 3] (or any value >= 3 for dense)")


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, M, N\), got \(2, 4, 8, 8\)"):
        ScatteringBlock(3)(torch.randn(2, 4, 8, 8))


@pytest.mark.parametrize("mixing_horizon", [None, 1, 3])
def test_diagonal_filters_are_the_morlet_bank_at_init(mixing_horizon):
    block = ScatteringBlock(6, L=4, kernel_size=5, mixing_horizon=mixing_horizon)
    bank = wk.filter_bank(4, 5)
    filters = block.diagonal_filters()
    assert filters["psi"].shape == (6, 4, 5, 5) and filters["phi"].shape == (6, 5, 5)
    np.testing.assert_allclose(filters["psi"], np.broadcast_to(bank["psi"], (6, 4, 5, 5)), atol=1e-7)
    np.testing.assert_allclose(filters["phi"], np.broadcast_to(bank["phi"], (6, 5, 5)), atol=1e-7)


def test_filter_movement_sees_a_rotated_wavelet():
    block = ScatteringBlock(2, L=4)
    rotated = wk.morlet_2d(7, wk.SIGMA_0, np.pi / 2 - np.pi / 8, wk.XI_0, 1.0)
    with torch.no_grad():  # orientation 0 of channel 1 (output 1*4 + 0 sees input 1)
        block.psi_real.weight[4, 1] = torch.as_tensor(rotated.real)
        block.psi_imag.weight[4, 1] = torch.as_tensor(rotated.imag)
    rows = filter_movement(block)
    assert max(r["relative_l2"] for r in rows[1:]) < 1e-6 and rows[0]["relative_l2"] > 0.1
    assert [r["init_frequency"] for r in rows] == pytest.approx([wk.XI_0] * 4, abs=0.1)
    assert rows[0]["init_angle_deg"] == pytest.approx(45.0, abs=2)  # (L/2 - 1 - 0) * 180 / L
    assert rows[0]["peak_angle_deg"] == pytest.approx((45.0 + 67.5) / 2, abs=2)  # circular mean of 45 and 67.5
    assert rows[0]["peak_frequency"] == pytest.approx(wk.XI_0, abs=0.1)


def trainable_twin(block):
    """The same block with trainable weights: it always runs the block's own (dense or grouped) convolution."""
    twin = ScatteringBlock(block.in_channels, block.L, block.kernel_size, block.modulus_type, True,
                           block.mixing_horizon, block.lowpass_only, block.padding_mode, block.max_order,
                           block.max_order and block.in_orders, block.modulus_resolution)
    twin.load_state_dict(block.state_dict())
    return twin


FROZEN_CASES = [dict(), dict(mixing_horizon=3, modulus_type="phase_relu"), dict(lowpass_only=True),
                dict(max_order=2, in_orders=(1, 2, 3)), dict(modulus_resolution="full", modulus_type="phase_relu"),
                dict(max_order=1, in_orders=(3, 3), modulus_resolution="full", mixing_horizon=3),
                dict(modulus_resolution="subsample", mixing_horizon=3)]


@pytest.mark.parametrize("kwargs", FROZEN_CASES)
def test_frozen_block_diagonal_runs_per_channel_with_the_same_output(kwargs):
    torch.manual_seed(0)
    block = ScatteringBlock(6, L=4, learnable=False, **kwargs)
    x = torch.randn(2, 6, 16, 16)
    assert block.is_frozen_block_diagonal() and not trainable_twin(block).is_frozen_block_diagonal()
    torch.testing.assert_close(block(x), trainable_twin(block)(x), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # output 0 (channel 0) now also sees input channel 1: no longer block-diagonal
        block.phi_conv.weight[0, 1, 3, 3] = 0.5
    assert not block.is_frozen_block_diagonal()
    torch.testing.assert_close(block(x), trainable_twin(block)(x), rtol=1e-5, atol=1e-6)
    block.load_state_dict(ScatteringBlock(6, L=4, **kwargs).state_dict())
    assert block.is_frozen_block_diagonal()  # a fresh init is diagonal again


def test_per_channel_blocks_never_take_the_shortcut():
    assert not ScatteringBlock(3, L=4, learnable=False, mixing_horizon=1).is_frozen_block_diagonal()


@pytest.mark.parametrize("modulus_type", ["complex_modulus", "phase_relu"])
def test_channels_last_input_gives_the_same_output(modulus_type):
    torch.manual_seed(0)
    block = ScatteringBlock(3, L=4, modulus_type=modulus_type)
    x = torch.randn(2, 3, 16, 16)
    expected = block(x)
    channels_last = block.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(channels_last, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- learn='morlet'

@pytest.fixture
def float64_default():
    """Build modules in float64, so Morlet parameters hold the NumPy bank's values exactly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("L,K", [(8, 7), (4, 5), (6, 9)])
def test_morlet_bank_at_init_is_the_numpy_bank(float64_default, L, K):
    kernels = MorletBank(L, K).kernels()
    bank = wk.filter_bank(L, K)
    np.testing.assert_allclose(kernels["psi_real"].detach().numpy(), bank["psi"].real, rtol=0, atol=1e-15)
    np.testing.assert_allclose(kernels["psi_imag"].detach().numpy(), bank["psi"].imag, rtol=0, atol=1e-15)
    np.testing.assert_allclose(kernels["phi"][0].detach().numpy(), bank["phi"], rtol=0, atol=1e-15)


def test_morlet_bank_follows_the_numpy_formula_away_from_init(float64_default):
    bank = MorletBank(3, 7)
    with torch.no_grad():
        bank.theta.copy_(torch.tensor([0.3, -1.0, 2.5]))
        bank.xi.copy_(torch.tensor([1.0, 2.0, 2.9]))
        bank.log_sigma.copy_(torch.tensor([0.7, 1.3, 1.9]).log())
        bank.log_slant.copy_(torch.tensor([0.6, 1.0, 1.4]).log())
        bank.log_phi_sigma.fill_(math.log(1.2))
    kernels = bank.kernels()
    for l, (theta, xi, sigma, slant) in enumerate([(0.3, 1.0, 0.7, 0.6), (-1.0, 2.0, 1.3, 1.0), (2.5, 2.9, 1.9, 1.4)]):
        psi = wk.morlet_2d(7, sigma, theta, xi, slant)
        np.testing.assert_allclose(kernels["psi_real"][l].detach().numpy(), psi.real, rtol=0, atol=1e-14)
        np.testing.assert_allclose(kernels["psi_imag"][l].detach().numpy(), psi.imag, rtol=0, atol=1e-14)
    phi = wk.gabor_2d(7, 1.2, 0.0, 0.0, 1.0).real
    np.testing.assert_allclose(kernels["phi"][0].detach().numpy(), phi / phi.sum(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("modulus_type", ["complex_modulus", "phase_relu"])
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("options", [{}, {"modulus_resolution": "full"}, {"modulus_resolution": "subsample"},
                                     {"max_order": 1, "in_orders": (1, 2)}, {"lowpass_only": True}])
def test_morlet_block_at_init_equals_the_taps_block(float64_default, modulus_type, padding_mode, options):
    morlet = ScatteringBlock(3, L=4, modulus_type=modulus_type, padding_mode=padding_mode, learn="morlet", **options)
    taps = ScatteringBlock(3, L=4, modulus_type=modulus_type, padding_mode=padding_mode, **options)
    x = torch.randn(2, 3, 12, 10)
    torch.testing.assert_close(morlet(x), taps(x), rtol=0, atol=1e-14)
    torch.testing.assert_close(morlet.reference_forward(x), morlet(x), rtol=0, atol=1e-14)
    with torch.no_grad():  # away from init the fused and the step-by-step forward still agree
        morlet.morlet.log_phi_sigma.add_(0.2)
        if not options.get("lowpass_only"):
            morlet.morlet.theta.add_(0.3)
            morlet.morlet.xi.sub_(0.5)
    torch.testing.assert_close(morlet.reference_forward(x), morlet(x), rtol=0, atol=1e-12)
    assert not torch.allclose(morlet(x), taps(x))


@pytest.mark.parametrize("modulus_type", ["complex_modulus", "phase_relu"])
def test_gradcheck_wrt_the_morlet_parameters(float64_default, modulus_type):
    torch.manual_seed(0)
    block = ScatteringBlock(2, L=3, kernel_size=5, modulus_type=modulus_type, learn="morlet")
    names = [name for name, _ in block.morlet.named_parameters()]
    x = torch.randn(1, 2, 6, 6)

    def scatter(*values):
        return torch.func.functional_call(block, {f"morlet.{n}": v for n, v in zip(names, values)}, (x,))

    values = tuple(p.detach().clone().requires_grad_(True) for p in block.morlet.parameters())
    assert torch.autograd.gradcheck(scatter, values)
    block(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.morlet.parameters())


def test_morlet_block_learns_only_its_parameters_and_keeps_the_poolings():
    block = ScatteringBlock(3, L=8, modulus_type="phase_relu", learn="morlet")
    trainable = {name: p.numel() for name, p in block.named_parameters()}
    assert trainable == {"morlet.log_phi_sigma": 1, "morlet.theta": 8, "morlet.xi": 8, "morlet.log_sigma": 8,
                         "morlet.log_slant": 8, "phase_collapse.weight": 3 * 8 * 4}
    assert sum(trainable.values()) == block_parameter_count(3, 8, 7, "phase_relu", learn="morlet")
    block.requires_grad_(True)  # what train.py does to the blocks in Phase B: the poolings stay averages
    assert not block.psi_pool.weight.requires_grad and torch.all(block.psi_pool.weight == 0.25)
    assert "psi_pool.weight" in block.state_dict() and "morlet.theta" in block.state_dict()
    lowpass = ScatteringBlock(3, learn="morlet", lowpass_only=True)
    assert [name for name, _ in lowpass.named_parameters()] == ["morlet.log_phi_sigma"]


def test_morlet_is_per_channel_only():
    assert ScatteringBlock(4, learn="morlet").groups == 4
    assert ScatteringBlock(4, learn="morlet", mixing_horizon=1).groups == 4
    with pytest.raises(ValueError, match=r"^learn='morlet' filters each input channel on its own: mixing_horizon "
                                         r"must be 1 \(or unset\), got 2$"):
        ScatteringBlock(4, learn="morlet", mixing_horizon=2)
    with pytest.raises(ValueError, match=r"^learn must be one of \('taps', 'morlet'\), got 'gabor'$"):
        ScatteringBlock(4, learn="gabor")


def test_random_morlet_parameters_lie_in_their_documented_ranges():
    torch.manual_seed(0)
    block = ScatteringBlock(3, L=64, learn="morlet")
    block.reset_random()
    table = block.morlet.parameter_table()["orientations"]
    for key, (low, high) in {"theta": RANDOM_THETA, "xi": RANDOM_XI, "sigma": RANDOM_SIGMA,
                             "slant": RANDOM_SLANT}.items():
        values = np.array([row[key] for row in table])
        assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6, key
        assert values.max() - values.min() > 0.5 * (high - low), key  # spread over the range, not one value
    assert block.morlet.parameter_table()["phi_sigma"] == pytest.approx(wk.SIGMA_0)
    torch.manual_seed(0)
    again = ScatteringBlock(3, L=64, learn="morlet")
    again.reset_random()
    torch.testing.assert_close(again.morlet.theta, block.morlet.theta)  # the seed fixes the draw


def test_morlet_filters_are_made_once_while_nothing_changes():
    block = ScatteringBlock(3, learn="morlet", learnable=False)
    first = block.morlet.kernels()
    assert block.morlet.kernels() is first  # frozen: cached
    with torch.no_grad():
        block.morlet.xi.add_(0.1)  # an in-place step bumps the version: made anew
    assert block.morlet.kernels() is not first
    block.requires_grad_(True)
    assert block.morlet.kernels() is not block.morlet.kernels()  # training: a fresh graph every call
    with torch.no_grad():
        cached = block.morlet.kernels()
        assert block.morlet.kernels() is cached and not cached["psi_real"].requires_grad


@pytest.mark.parametrize("options", [{}, {"modulus_resolution": "full"}, {"max_order": 1, "in_orders": (1, 2)}])
def test_a_training_forward_makes_the_morlet_filters_once(monkeypatch, options):
    block = ScatteringBlock(3, L=4, learn="morlet", **options)  # trains: no cache, a new graph every forward
    made = []
    generate = MorletBank._generate
    monkeypatch.setattr(MorletBank, "_generate", lambda bank: made.append(1) or generate(bank))
    block(torch.randn(2, 3, 12, 12)).sum().backward()
    assert len(made) == 1 and block.morlet.theta.grad.abs().sum() > 0  # one bank for phi, psi_real and psi_imag


PAGE_FAULT_PROBE = """
import resource, torch
torch.set_num_threads(1)  # one malloc arena: the count does not depend on how many threads the pool starts
from scattering_net import ModelConfig, ScatteringNet
net, x = ScatteringNet(ModelConfig(learnable=False, mixing_horizon=1)), torch.randn(64, 3, 32, 32)
with torch.no_grad():
    net(x)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_plain_import_reuses_its_activations_and_the_setting_can_be_refused():
    """A script that only imports and builds the model gets the scripts' allocator setting (no page faults per
    call); SCATTERING_KEEP_FREED_MEMORY=0 keeps glibc's policy, which page-faults the activations in every call."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    faults = {}
    for setting in ("unset", "0"):
        env = {k: v for k, v in os.environ.items() if k != spatial_scattering.KEEP_FREED_MEMORY_ENV}
        if setting != "unset":
            env[spatial_scattering.KEEP_FREED_MEMORY_ENV] = setting
        faults[setting] = int(subprocess.run([sys.executable, "-c", PAGE_FAULT_PROBE], cwd=root, env=env,
                                             capture_output=True, text=True, check=True).stdout)
    assert faults["0"] > 5 * 1000  # activations of several MiB, faulted in again on every call
    assert faults["unset"] < faults["0"] / 10


@pytest.mark.parametrize("size,padding,groups,group_inputs,group_outputs", [
    (12, 3, 3, 1, 3), (7, 3, 2, 3, 3), (9, 0, 1, 2, 3), (6, 1, 4, 1, 2),  # polyphase, odd sizes padded and trimmed
    (5, 3, 1, POLYPHASE_MAX_GROUP_INPUTS + 1, 3), (8, 3, 3, 1, 1)])  # strided_conv direct: wide groups; depthwise
@pytest.mark.parametrize("conv", [strided_conv, polyphase_conv])
def test_strided_conv_is_the_stride_2_convolution_and_so_are_its_gradients(conv, size, padding, groups, group_inputs,
                                                                           group_outputs):
    """Both forms give F.conv2d's outputs and, in float64, gradients that pass gradcheck for input and weight
    (fast mode: each Jacobian compared along random directions, which any wrong entry shows with probability 1)."""
    torch.manual_seed(0)
    x = torch.randn(1, groups * group_inputs, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(groups * group_outputs, group_inputs, 8, 8, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(x, w, stride=2, padding=padding, groups=groups)
    torch.testing.assert_close(conv(x, w, padding, groups), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: conv(x, w, padding, groups), (x, w), fast_mode=True)


@pytest.mark.parametrize("groups,n_lowpass,n_wavelet", [(3, 1, 8), (1, 3, 24)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lowpass_and_modulus_is_cat_of_lowpass_and_safe_modulus(groups, n_lowpass, n_wavelet, channels_last):
    torch.manual_seed(0)
    y = torch.randn(2, groups * (n_lowpass + 2 * n_wavelet), 5, 5, dtype=torch.float64)
    if channels_last:  # as strided_conv leaves it
        y = y.contiguous(memory_format=torch.channels_last)
    y.requires_grad_(True)
    S0, re, im = split_groups(y, groups, [n_lowpass, n_wavelet, n_wavelet])
    expected = torch.cat([S0.reshape(2, -1, 5, 5), safe_modulus(re, im).reshape(2, -1, 5, 5)], dim=1)
    torch.testing.assert_close(LowpassAndModulus.apply(y, groups, n_lowpass, n_wavelet), expected)
    assert torch.autograd.gradcheck(lambda y: LowpassAndModulus.apply(y, groups, n_lowpass, n_wavelet), (y,))


def test_lowpass_and_modulus_gradient_is_zero_not_nan_at_zero():
    y = torch.zeros(1, 3, 2, 2)
    y[0, 0] = 5.0
    y.requires_grad_(True)
    (LowpassAndModulus.apply(y, 1, 1, 1) * 1e30).sum().backward()  # a huge upstream gradient: still no inf * 0
    assert torch.equal(y.grad[0, 0], torch.full((2, 2), 1e30)) and torch.equal(y.grad[0, 1:], torch.zeros(2, 2, 2))


def test_a_fixed_block_with_one_bank_runs_as_one_convolution_and_a_changed_channel_does_not():
    """The fixed per-channel block repeats one filter bank per channel: its fused weight shares its filters, and
    the forward (and the gradient to the input) equal the step-by-step reference. One channel's filters
    changed: no longer shared, the grouped form runs, still equal to the reference."""
    torch.manual_seed(0)
    block = ScatteringBlock(3, L=4, learnable=False, mixing_horizon=1)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    block = block.double()
    assert shares_filters(block.fused_weight(), 3)
    torch.testing.assert_close(block(x), block.reference_forward(x))
    assert torch.autograd.gradcheck(block, (x,))
    with torch.no_grad():
        block.psi_real.weight[5] += 0.1  # channel 1's orientation 1
    assert not shares_filters(block.fused_weight(), 3)
    torch.testing.assert_close(block(x), block.reference_forward(x))
    assert not shares_filters(block.fused_weight().requires_grad_(), 3)  # a weight that trains is never checked
