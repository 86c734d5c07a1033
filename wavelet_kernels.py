"""Gabor and Morlet kernels on a small K x K spatial grid (NumPy only).

    python -c "import wavelet_kernels as w; print(w.filter_bank(L=8, K=7)['psi'].shape)"
    # -> (8, 7, 7)

The parametrisation is kymatio's 2-D filter bank (Bruna & Mallat, "Invariant
Scattering Convolution Networks", PAMI 2013; Andreux et al., "Kymatio", JMLR
2020) restricted to its first scale j = 0, which is what one J=1 scattering
block needs. With these constants a network of frozen blocks computes a real
scattering transform; training then moves the filters away from them.

Every function here is pure: it returns new arrays and keeps no state.
"""
import numpy as np

# Scale of the Gaussian envelope at j = 0, in pixels. kymatio's filter_bank
# uses sigma = 0.8 * 2**j for both the wavelets and the low-pass.
SIGMA_0 = 0.8
# Centre frequency of the wavelets at j = 0, in radians per sample: kymatio's
# xi = 3/4 * pi / 2**j, a band near (not at) Nyquist so that one octave of
# downsampling afterwards loses little of it.
XI_0 = 3.0 * np.pi / 4.0
# Ellipticity of the wavelet envelope: kymatio's slant = 4 / L, so that more
# orientations get narrower angular (and longer spatial) support.
SLANT_NUMERATOR = 4.0
# The low-pass is isotropic (slant 1) and has no modulation (xi 0).
PHI_SLANT = 1.0
# The smallest grid with a nonzero wavelet: on 1 x 1, the Morlet wavelet minus its mean (psi) is identically 0.
MIN_KERNEL_SIZE = 3


def check_kernel_size(K):
    if not isinstance(K, (int, np.integer)) or K < MIN_KERNEL_SIZE or K % 2 == 0:
        raise ValueError(f"kernel size K must be an odd integer >= {MIN_KERNEL_SIZE} (the grid is centred on 0; a 1 x 1 "
                         f"wavelet is zero once its mean is removed), got {K!r}")


def check_orientations(L):
    if not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"number of orientations L must be an integer >= 1, got {L!r}")


def centred_grid(K):
    """Integer coordinates of a K x K grid centred on 0.

    Returns ``(x, y)``, two (K, K) arrays with values in ``-(K//2) .. K//2``;
    ``x`` varies along the first array axis, ``y`` along the second, as in
    kymatio.
    """
    check_kernel_size(K)
    half = K // 2
    return np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)


def gabor_2d(K, sigma, theta, xi, slant=1.0):
    r"""Complex Gabor filter sampled on a centred K x K grid.

    .. math::

        g(u) = \frac{\text{slant}}{2\pi\sigma^2}
               \exp\!\Big(-\frac{u^\top R_\theta D R_\theta^\top u}{2\sigma^2}\Big)
               \, e^{i \xi (u_1\cos\theta + u_2\sin\theta)},
        \qquad D = \operatorname{diag}(1, \text{slant}^2),

    with :math:`u = (u_1, u_2)` the (first-axis, second-axis) coordinate and
    :math:`R_\theta` the rotation by :math:`\theta`. The prefactor
    :math:`\text{slant} / (2\pi\sigma^2)` is kymatio's: it makes the
    continuous envelope integrate to 1 (its covariance has determinant
    :math:`\sigma^4/\text{slant}^2`), so sums on a finite grid fall slightly
    below 1.

    Parameters
    ----------
    K : int
        Odd grid size.
    sigma : float
        Envelope scale in pixels (along the direction of ``theta``).
    theta : float
        Orientation in radians; the modulation points along
        :math:`(\cos\theta, \sin\theta)`.
    xi : float
        Centre frequency in radians per sample.
    slant : float
        Ratio of the envelope widths, across over along the orientation.

    Returns
    -------
    ndarray of complex128, shape (K, K)
    """
    x, y = centred_grid(K)
    c, s = np.cos(theta), np.sin(theta)
    R = np.array([[c, -s], [s, c]])
    D = np.diag([1.0, slant * slant])
    curvature = R @ D @ R.T / (2.0 * sigma * sigma)
    quadratic = curvature[0, 0] * x * x + (curvature[0, 1] + curvature[1, 0]) * x * y + curvature[1, 1] * y * y
    phase = xi * (x * c + y * s)
    return np.exp(-quadratic + 1j * phase) * slant / (2.0 * np.pi * sigma * sigma)


def morlet_2d(K, sigma, theta, xi, slant=0.5):
    r"""Morlet wavelet: a Gabor filter made zero-mean on the K x K grid.

    .. math::

        \psi(u) = g_{\sigma,\theta,\xi}(u) - \beta\, g_{\sigma,\theta,0}(u),
        \qquad \beta = \frac{\sum_u g_{\sigma,\theta,\xi}(u)}{\sum_u g_{\sigma,\theta,0}(u)},

    where :math:`g` is :func:`gabor_2d` and the sums run over the same grid,
    so :math:`\sum_u \psi(u) = 0` to float precision. The normalisation is
    that of :func:`gabor_2d` (kymatio's), so ``psi`` equals kymatio's
    ``morlet_2d`` evaluated at the grid points (kymatio also periodises it
    over a large image, which a 7 x 7 kernel does not).

    Returns
    -------
    ndarray of complex128, shape (K, K)
    """
    gabor = gabor_2d(K, sigma, theta, xi, slant)
    envelope = gabor_2d(K, sigma, theta, 0.0, slant)
    beta = gabor.sum() / envelope.sum()
    return gabor - beta * envelope


def orientation_angle(l, L):
    r"""Angle of orientation ``l`` out of ``L``: :math:`\theta_l = (L/2 - 1 - l)\,\pi / L`.

    This is kymatio's ordering for even L (kymatio rounds ``L/2 - 1`` down
    to an integer, which shifts the angles by :math:`\pi/2L` for odd L). The
    angles cover a half-turn: the modulus of a real image's response is the
    same at :math:`\theta` and :math:`\theta + \pi`.
    """
    return (L / 2.0 - 1.0 - l) * np.pi / L


def filter_bank(L=8, K=7):
    r"""The J=1 filter bank of one scattering block.

    Returns a dict with

    - ``psi``: complex128 (L, K, K), the Morlet wavelets
      ``morlet_2d(K, SIGMA_0, orientation_angle(l, L), XI_0, SLANT_NUMERATOR / L)``;
    - ``phi``: float64 (K, K), the Gaussian low-pass
      ``gabor_2d(K, SIGMA_0, 0, 0, PHI_SLANT).real`` rescaled so that
      :math:`\sum_u \phi(u) = 1` on the grid (a local average that keeps the
      mean of the signal; kymatio's continuous normalisation would lose the
      tail mass beyond the kernel, 0.04 % for K = 7);
    - ``theta``: float64 (L,), the orientations in radians;
    - ``xi``, ``sigma``, ``slant``: the wavelet parameters used.
    """
    check_orientations(L)
    check_kernel_size(K)
    thetas = np.array([orientation_angle(l, L) for l in range(L)])
    slant = SLANT_NUMERATOR / L
    psi = np.stack([morlet_2d(K, SIGMA_0, theta, XI_0, slant) for theta in thetas])
    phi = gabor_2d(K, SIGMA_0, 0.0, 0.0, PHI_SLANT).real
    return {"psi": psi, "phi": phi / phi.sum(), "theta": thetas, "xi": XI_0, "sigma": SIGMA_0, "slant": slant}


def spectral_peak(kernels, fft_size=256):
    r"""Where the magnitude spectrum of each kernel peaks: radius and angle in radians.

    kernels: (..., K, K), real or complex. The spectrum is the zero-padded
    ``fft_size``-point DFT, so the answer is quantised to
    :math:`2\pi / \text{fft\_size}` rad per sample. With the first array axis
    as the first frequency coordinate :math:`\omega_1` (as in kymatio), the
    Morlet ``morlet_2d(K, sigma, theta, xi, slant)`` peaks near radius ``xi``
    and angle ``theta``. Returns two float64 arrays of shape ``kernels.shape[:-2]``:
    :math:`|\omega|` in [0, pi*sqrt(2)] and :math:`\mathrm{atan2}(\omega_2, \omega_1)` in (-pi, pi].
    """
    kernels = np.asarray(kernels)
    spectrum = np.abs(np.fft.fft2(kernels, s=(fft_size, fft_size)))
    flat = spectrum.reshape(*spectrum.shape[:-2], -1)  # (..., n, n) -> (..., n*n)
    i, j = np.unravel_index(flat.argmax(-1), (fft_size, fft_size))
    freqs = np.fft.fftfreq(fft_size) * 2 * np.pi
    w1, w2 = freqs[i], freqs[j]
    return np.hypot(w1, w2), np.arctan2(w2, w1)
