"""ScatteringBlock: one J=1 scattering scale as spatial convolutions.

    python -c "import torch, spatial_scattering as s; print(s.ScatteringBlock(3)(torch.randn(2, 3, 32, 32)).shape)"
    # -> torch.Size([2, 27, 16, 16])

Data flow (SPEC.md, "ScatteringBlock Architecture"), for x of shape (B, C, M, N):

    S0 = pool_phi(phi_conv(x))                                  (B, C,   M/2, N/2)
    re, im = pool_psi(psi_real(x)), pool_psi(psi_imag(x))       (B, C*L, M/2, N/2)
    S1 = sqrt(re^2 + im^2)                    (complex_modulus)
       = phase_collapse(relu([re, -re, im, -im]))   (phase_relu)
    out = cat(S0, S1)                                           (B, C*(1+L), M/2, N/2)

The forward pass computes all of this with a single strided convolution:
a K x K convolution followed by a linear 2 x 2 stride-2 downsampling equals
one stride-2 convolution with the (K+1) x (K+1) kernel w * d (the full 2-D
convolution of the two kernels). It is exact, learnable through both
factors, and computes only the outputs that are kept (about a quarter of the
multiply-adds). The parameters keep their own names in the state dict.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import wavelet_kernels

MODULUS_TYPES = ("complex_modulus", "phase_relu")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# relu(a) + relu(-a) = |a|, and (|a| + |b|) / sqrt(2) lies between |a + ib| / sqrt(2)
# and |a + ib|: with 1/sqrt(2) on each rectified phase, phase_relu starts as the
# complex modulus to within a factor sqrt(2) (SPEC.md, "Phase Collapse").
PHASE_COLLAPSE_INIT = 1.0 / math.sqrt(2.0)
# Weight of each tap of a 2 x 2 average pooling.
AVG_POOL_2X2 = 0.25
# The rectified phases per (channel, orientation): +Re, -Re, +Im, -Im.
N_PHASES = 4
# Grid of the zero-padded FFT that locates a K x K filter's spectral peak: 2*pi/256 ~ 0.025 rad/sample
# resolution, ten times finer than the frequency shifts that training produces (README.md, "Results").
FFT_SIZE = 256


def mixing_groups(in_channels, mixing_horizon):
    """Number of groups of the wavelet convolutions for a mixing horizon.

    ``None`` or ``in_channels <= mixing_horizon``: 1 (dense). Otherwise
    ``in_channels // mixing_horizon``, which must divide exactly.
    """
    if mixing_horizon is None:
        return 1
    if not isinstance(mixing_horizon, int) or mixing_horizon < 1:
        raise ValueError(f"mixing_horizon must be a positive integer or None, got {mixing_horizon!r}")
    if in_channels <= mixing_horizon:
        return 1
    if in_channels % mixing_horizon:
        valid = [h for h in range(1, in_channels + 1) if in_channels % h == 0]
        raise ValueError(f"mixing_horizon={mixing_horizon} does not divide in_channels={in_channels}; "
                         f"valid values: {valid} (or any value >= {in_channels} for dense)")
    return in_channels // mixing_horizon


def block_diagonal_weight(kernels, in_channels, groups):
    """Conv2d weight that applies ``kernels`` to each input channel separately.

    kernels: (P, K, K), P filters per input channel. Returns the weight of
    ``Conv2d(in_channels, in_channels * P, K, groups=groups)``, shape
    (in_channels * P, in_channels // groups, K, K): output channel ``c*P + p``
    holds ``kernels[p]`` on its own input channel ``c`` and zeros elsewhere.
    """
    P, K, _ = kernels.shape
    per_group = in_channels // groups
    weight = torch.zeros(in_channels, P, per_group, K, K, dtype=torch.float64)
    c = torch.arange(in_channels)
    weight[c, :, c % per_group] = torch.as_tensor(kernels, dtype=torch.float64)
    return weight.reshape(in_channels * P, per_group, K, K)  # (C, P, C/g, K, K) -> (C*P, C/g, K, K)


def compose_downsampling(weight, down):
    """Kernel of a K x K convolution followed by a 2 x 2 stride-2 depthwise one.

    weight: (O, I, K, K); down: (O, 1, 2, 2). Returns (O, I, K+1, K+1) with
    ``out[o, i] = sum_{a,b} down[o, 0, a, b] * shift_{a,b}(weight[o, i])``,
    so that ``conv(x, out, stride=2) == conv(conv(x, weight), down, stride=2, groups=O)``
    on the same padded input.
    """
    d = down.reshape(-1, 1, 2, 2)
    shifted = (F.pad(weight, (b, 1 - b, a, 1 - a)) * d[:, :, a:a + 1, b:b + 1] for a in (0, 1) for b in (0, 1))
    return sum(shifted)


def safe_modulus(re, im):
    """sqrt(re^2 + im^2) with gradient 0 (not NaN) where both are 0.

    The clamp at the dtype's smallest normal number only changes moduli below
    ~1e-19 (fp32); below it the clamp passes no gradient, which is the
    subgradient 0 at the cone's tip.
    """
    squared = re * re + im * im
    return torch.sqrt(torch.clamp(squared, min=torch.finfo(squared.dtype).tiny))


class ScatteringBlock(nn.Module):
    """Single-scale (J=1) scattering with 2x downsampling; see the module docstring.

    Parameters
    ----------
    in_channels : int
    L : int
        Wavelet orientations.
    kernel_size : int
        Odd K of the K x K wavelet and low-pass kernels.
    modulus_type : {'complex_modulus', 'phase_relu'}
    learnable : bool
        False freezes every parameter of the block (``requires_grad=False``).
    mixing_horizon : int or None
        Input channels each wavelet filter sees (grouped convolutions); None: all.
    lowpass_only : bool
        Return S0 only (C_in channels); the band-pass filters are not built.
    padding_mode : {'zeros', 'reflect', 'replicate', 'circular'}
        Border handling of the K x K convolutions, as in ``nn.Conv2d``.
    """

    def __init__(self, in_channels, L=8, kernel_size=7, modulus_type="complex_modulus", learnable=True,
                 mixing_horizon=None, lowpass_only=False, padding_mode="zeros"):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if modulus_type not in MODULUS_TYPES:
            raise ValueError(f"modulus_type must be one of {MODULUS_TYPES}, got {modulus_type!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        bank = wavelet_kernels.filter_bank(L, kernel_size)
        self.in_channels, self.L, self.kernel_size = in_channels, L, kernel_size
        self.modulus_type, self.lowpass_only, self.padding_mode = modulus_type, lowpass_only, padding_mode
        self.mixing_horizon = mixing_horizon
        self.groups = mixing_groups(in_channels, mixing_horizon)
        self.out_channels = in_channels if lowpass_only else in_channels * (1 + L)
        C, CL = in_channels, in_channels * L

        self.phi_conv = self._wavelet_conv(C, bank["phi"][None])
        self.phi_pool = self._avg_pool_conv(C)
        if not lowpass_only:
            self.psi_real = self._wavelet_conv(CL, bank["psi"].real)
            self.psi_imag = self._wavelet_conv(CL, bank["psi"].imag)
            self.psi_pool = self._avg_pool_conv(CL)
            if modulus_type == "phase_relu":
                self.phase_collapse = nn.Conv2d(N_PHASES * CL, CL, 1, groups=CL, bias=False)
                nn.init.constant_(self.phase_collapse.weight, PHASE_COLLAPSE_INIT)
        self.requires_grad_(learnable)

    def filter_convs(self):
        """The K x K convolutions by name: phi_conv, and psi_real, psi_imag unless lowpass_only."""
        convs = {"phi_conv": self.phi_conv}
        if not self.lowpass_only:
            convs.update(psi_real=self.psi_real, psi_imag=self.psi_imag)
        return convs

    def _wavelet_conv(self, out_channels, kernels):
        conv = nn.Conv2d(self.in_channels, out_channels, self.kernel_size, padding="same", bias=False,
                         groups=self.groups, padding_mode=self.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(block_diagonal_weight(kernels, self.in_channels, self.groups))
        return conv

    @staticmethod
    def _avg_pool_conv(channels):
        conv = nn.Conv2d(channels, channels, 2, stride=2, groups=channels, bias=False)
        nn.init.constant_(conv.weight, AVG_POOL_2X2)
        return conv

    def fused_weight(self, groups=None):
        """The composed stride-2 kernels of [phi, psi_real, psi_imag], ordered by group.

        Returns (g * (C + 2CL) / g, C/g, K+1, K+1): for grouped convolutions
        the output channels of each group must be contiguous, so the three
        filter sets are interleaved group by group. ``groups=C`` (per channel)
        keeps only each output's own input channel: equal to the block's
        convolution only while the weights are block-diagonal.
        """
        g = groups or self.groups
        convs = [(self.phi_conv, self.phi_pool)]
        if not self.lowpass_only:
            convs += [(self.psi_real, self.psi_pool), (self.psi_imag, self.psi_pool)]
        parts = [compose_downsampling(self._planes(conv.weight, g), pool.weight) for conv, pool in convs]
        per_group = [w.reshape(g, -1, *w.shape[1:]) for w in parts]  # (O, I/g, k, k) -> (g, O/g, I/g, k, k)
        return torch.cat(per_group, dim=1).flatten(0, 1)  # (g, sum O/g, I/g, k, k) -> (g*sum O/g, I/g, k, k)

    def _planes(self, weight, groups):
        """weight (O, C/self.groups, K, K) as the weight of a convolution with ``groups`` groups."""
        if groups == self.groups:
            return weight
        return weight[self._own_input(weight)].unsqueeze(1)  # (O, C/g, K, K) -> (O, 1, K, K)

    def _own_input(self, weight):
        """Index (outputs, in-group input) of each output's own input channel: c for outputs c*P + p."""
        out = torch.arange(len(weight), device=weight.device)
        return out, out // (len(weight) // self.in_channels) % (self.in_channels // self.groups)

    def is_frozen_block_diagonal(self):
        """True when no weight trains and every output sees only its own input channel (as at init).

        Then the forward pass runs per channel (groups=C): the same result for
        C/g times fewer multiply-adds. Cached until a weight changes (in-place
        updates bump a tensor's version counter; moves change its storage).
        """
        weights = [conv.weight for conv in self.filter_convs().values()]
        if self.groups == self.in_channels or any(w.requires_grad for w in weights):
            return False
        key = tuple((w.data_ptr(), w._version) for w in weights)
        if getattr(self, "_diagonal_cache", (None,))[0] != key:
            self._diagonal_cache = (key, all(self._off_diagonal_is_zero(w) for w in weights))
        return self._diagonal_cache[1]

    def _off_diagonal_is_zero(self, weight):
        off_diagonal = torch.ones(weight.shape[:2], dtype=torch.bool, device=weight.device)
        off_diagonal[self._own_input(weight)] = False
        return not bool(weight[off_diagonal].any())

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ScatteringBlock expects input of shape (B, {self.in_channels}, M, N), "
                             f"got {tuple(x.shape)}")
        if min(x.shape[-2:]) < 2:
            raise ValueError(f"ScatteringBlock needs spatial size >= 2 to downsample, got {tuple(x.shape[-2:])}")

    def _pad(self, x):
        p = self.kernel_size // 2
        if self.padding_mode == "zeros":
            return x, p  # let the convolution pad: no copy of the input
        return F.pad(x, (p, p, p, p), mode=self.padding_mode), 0

    def forward(self, x):
        self._check_input(x)
        x, padding = self._pad(x)
        g = self.in_channels if self.is_frozen_block_diagonal() else self.groups
        y = F.conv2d(x, self.fused_weight(g), stride=2, padding=padding, groups=g)
        B, _, H, W = y.shape
        C, CL = self.in_channels, self.in_channels * self.L
        if self.lowpass_only:
            return y
        y = y.view(B, g, (C + 2 * CL) // g, H, W)  # (B, g*(C+2CL)/g, H, W) -> (B, g, (C+2CL)/g, H, W)
        S0, re, im = y.split([C // g, CL // g, CL // g], dim=2)
        S0, re, im = (t.reshape(B, -1, H, W) for t in (S0, re, im))  # (B, g, n/g, H, W) -> (B, n, H, W)
        return torch.cat([S0, self.phase_modulus(re, im)], dim=1)

    def phase_modulus(self, re, im):
        """S1 from the downsampled real and imaginary parts, both (B, C*L, H, W)."""
        if self.modulus_type == "complex_modulus":
            return safe_modulus(re, im)
        B, CL, H, W = re.shape
        phases = torch.stack([re, -re, im, -im], dim=2).relu()  # (B, CL, 4, H, W), contiguous per (c, l)
        # (B, CL, 4, H, W) -> (B, 4CL, H, W); reshape, not view: channels_last inputs stack non-contiguously
        return self.phase_collapse(phases.reshape(B, N_PHASES * CL, H, W))

    @torch.no_grad()
    def diagonal_filters(self):
        """What each output sees of its own input channel, as NumPy arrays.

        Returns {'phi': (C, K, K), 'psi': (C, L, K, K) complex = psi_real + i psi_imag}
        (no 'psi' when lowpass_only). At init these are the Morlet filter bank
        repeated per channel; after training the planes that mix channels are
        left out (filter_delta_* in engine.py measures the whole weights).
        """
        C, per_group = self.in_channels, self.in_channels // self.groups
        c = torch.arange(C)
        out = {"phi": self.phi_conv.weight[c, c % per_group].double().cpu().numpy()}
        if not self.lowpass_only:
            rows = (c[:, None] * self.L + torch.arange(self.L)).flatten()  # output c*L + l
            cols = c.repeat_interleave(self.L) % per_group  # its own input channel
            planes = [w[rows, cols].double().cpu().numpy().reshape(C, self.L, self.kernel_size, self.kernel_size)
                      for w in (self.psi_real.weight, self.psi_imag.weight)]  # (C*L, K, K) -> (C, L, K, K)
            out["psi"] = planes[0] + 1j * planes[1]
        return out

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, L={self.L}, kernel_size={self.kernel_size}, "
                f"modulus_type={self.modulus_type!r}, groups={self.groups}, lowpass_only={self.lowpass_only}, "
                f"padding_mode={self.padding_mode!r}")


def wavelet_parameter_count(in_channels, L, kernel_size, mixing_horizon=None, lowpass_only=False):
    """Weights of phi_conv + psi_real + psi_imag, as SPEC.md's mixing-horizon table counts them."""
    groups = mixing_groups(in_channels, mixing_horizon)
    out_channels = in_channels if lowpass_only else in_channels * (1 + 2 * L)
    return out_channels * (in_channels // groups) * kernel_size ** 2


def block_parameter_count(in_channels, L, kernel_size, modulus_type="complex_modulus", mixing_horizon=None,
                          lowpass_only=False):
    """All parameters of a ScatteringBlock, computed without building it."""
    n = wavelet_parameter_count(in_channels, L, kernel_size, mixing_horizon, lowpass_only)
    n += in_channels * 4  # phi_pool: depthwise 2 x 2
    if not lowpass_only:
        n += in_channels * L * 4  # psi_pool: depthwise 2 x 2
        if modulus_type == "phase_relu":
            n += in_channels * L * N_PHASES  # phase_collapse: grouped 1 x 1
    return n


def filter_movement(block, fft_size=FFT_SIZE):
    """Per orientation, how far ``block``'s wavelets moved from the Morlet bank they started as.

    Compares the diagonal filters (ScatteringBlock.diagonal_filters) of all
    input channels with ``wavelet_kernels.filter_bank(L, K)``. Returns L dicts:
    ``relative_l2`` = ||psi - psi0|| / ||psi0||, ``peak_frequency`` (rad/sample)
    and ``peak_angle_deg`` of the magnitude spectrum (mean over channels; the
    angle as a circular mean), and ``init_frequency``, ``init_angle_deg``, the
    same for the Morlet wavelet.
    """
    psi = block.diagonal_filters()["psi"]  # (C, L, K, K)
    psi0 = wavelet_kernels.filter_bank(block.L, block.kernel_size)["psi"]  # (L, K, K)
    radius0, angle0 = wavelet_kernels.spectral_peak(psi0, fft_size)
    rows = []
    for l in range(block.L):
        radius, angle = wavelet_kernels.spectral_peak(psi[:, l], fft_size)
        moved = np.linalg.norm(psi[:, l] - psi0[l]) / (np.linalg.norm(psi0[l]) * np.sqrt(len(psi)))
        rows.append({"orientation": l, "relative_l2": float(moved), "peak_frequency": float(radius.mean()),
                     "peak_angle_deg": circular_mean_deg(angle), "init_frequency": float(radius0[l]),
                     "init_angle_deg": float(np.degrees(angle0[l]))})
    return rows


def circular_mean_deg(angles):
    """Mean direction of angles in radians, in degrees in (-180, 180]."""
    return float(np.degrees(np.angle(np.exp(1j * np.asarray(angles)).mean())))
