import numpy as np
import pytest

import wavelet_kernels as wk

FFT_SIZE = 256  # zero-padded spectrum resolution: 2*pi/256 = 0.025 rad per bin


def kymatio_morlet_reference(K, sigma, theta, xi, slant):
    """kymatio's morlet_2d written independently: rotated coordinates, then the envelope."""
    half = K // 2
    u1, u2 = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1), indexing="ij")
    along = u1 * np.cos(theta) + u2 * np.sin(theta)
    across = -u1 * np.sin(theta) + u2 * np.cos(theta)
    envelope = np.exp(-(along ** 2 + slant ** 2 * across ** 2) / (2 * sigma ** 2)) * slant / (2 * np.pi * sigma ** 2)
    gabor = envelope * np.exp(1j * xi * along)
    return gabor - gabor.sum() / envelope.sum() * envelope


@pytest.mark.parametrize("L,K", [(8, 7), (4, 5), (6, 9), (1, 3)])
def test_morlet_matches_kymatio_formula(L, K):
    bank = wk.filter_bank(L, K)
    for l in range(L):
        theta = (L / 2 - 1 - l) * np.pi / L
        ref = kymatio_morlet_reference(K, 0.8, theta, 3 * np.pi / 4, 4 / L)
        np.testing.assert_allclose(bank["psi"][l], ref, atol=1e-14)
        assert bank["theta"][l] == pytest.approx(theta)


def test_constants_are_kymatios_j0():
    assert wk.SIGMA_0 == 0.8 and wk.XI_0 == pytest.approx(2.35619449) and wk.SLANT_NUMERATOR == 4
    assert wk.filter_bank(8, 7)["slant"] == 0.5


@pytest.mark.parametrize("L,K", [(8, 7), (4, 5), (8, 11)])
def test_wavelets_have_zero_mean_on_the_grid(L, K):
    psi = wk.filter_bank(L, K)["psi"]
    assert np.abs(psi.sum(axis=(1, 2))).max() < 1e-15
    assert np.abs(psi).sum(axis=(1, 2)).min() > 0.5  # and are not trivially zero


@pytest.mark.parametrize("L", [4, 8])
def test_spectrum_peaks_at_xi_along_theta(L):
    bank = wk.filter_bank(L, 7)
    radius, angle = wk.spectral_peak(bank["psi"], FFT_SIZE)
    assert radius.shape == angle.shape == (L,)
    # first array axis <-> first frequency coordinate, as in kymatio
    np.testing.assert_allclose(radius, wk.XI_0, atol=0.1)
    np.testing.assert_allclose(angle, bank["theta"], atol=0.03)
    assert np.abs(np.fft.fft2(bank["psi"])[:, 0, 0]).max() < 1e-12  # no DC response


def test_spectral_peak_of_a_plane_wave():
    x, y = wk.centred_grid(9)
    wave = np.exp(1j * (0.5 * x - 1.0 * y))  # frequency (0.5, -1.0)
    radius, angle = wk.spectral_peak(wave, fft_size=512)
    assert radius == pytest.approx(np.hypot(0.5, 1.0), abs=0.01)
    assert angle == pytest.approx(np.arctan2(-1.0, 0.5), abs=0.01)


def test_lowpass_is_a_normalised_isotropic_gaussian():
    phi = wk.filter_bank(8, 7)["phi"]
    assert phi.dtype == np.float64 and phi.shape == (7, 7)
    assert phi.sum() == pytest.approx(1.0, abs=1e-14)
    x, y = wk.centred_grid(7)
    gauss = np.exp(-(x ** 2 + y ** 2) / (2 * 0.8 ** 2))
    np.testing.assert_allclose(phi, gauss / gauss.sum(), rtol=1e-12)
    np.testing.assert_allclose(phi, phi.T)


def test_gabor_normalisation_is_kymatios():
    # the continuous envelope integrates to 1; on a wide grid the sum approaches it
    envelope = wk.gabor_2d(41, sigma=2.0, theta=0.3, xi=0.0, slant=0.5)
    assert envelope.sum().real == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("K", [0, 1, -3, 4, 6, 2.5])
def test_bad_kernel_size(K):
    with pytest.raises(ValueError, match=fr"kernel size K must be an odd integer >= 3 \(.*\), got {K!r}"):
        wk.filter_bank(8, K)


@pytest.mark.parametrize("L", [0, -1, 2.0])
def test_bad_orientations(L):
    with pytest.raises(ValueError, match=f"number of orientations L must be an integer >= 1, got {L!r}"):
        wk.filter_bank(L, 7)
