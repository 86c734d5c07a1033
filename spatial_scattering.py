"""ScatteringBlock: one J=1 scattering scale as spatial convolutions.

    python -c "import torch, spatial_scattering as s; print(s.ScatteringBlock(3)(torch.randn(2, 3, 32, 32)).shape)"
    # -> torch.Size([2, 27, 16, 16])

Data flow (docs/DESIGN.md, "The block"), for x of shape (B, C, M, N):

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

Two options change the data flow:

- ``max_order=M`` (with ``in_orders``, the input channels per path order,
  sorted by order): the wavelets see only the input channels of order < M,
  a contiguous prefix of P channels; the order-M channels pass through the
  low-pass path only. The output is sorted by order again (order k: the
  low-pass of the order-k inputs, then the wavelets of the order-(k-1) ones),
  so the next block's prefix is contiguous too.
- ``modulus_resolution='full'``: the wavelet responses are computed at full
  resolution, the modulus (or phase ReLU) is taken there, and the 2 x 2
  pooling comes after it, as kymatio does; the low-pass path stays fused.
- ``learn='morlet'``: the K x K filters are not free taps but Morlet wavelets
  generated from learnable (orientation, frequency, width, slant) per
  orientation and a learnable low-pass width (MorletBank), applied to each
  input channel on its own; the 2 x 2 poolings stay fixed averages, so every
  band-pass path stays a Morlet wavelet followed by a mean.
- ``modulus_resolution='subsample'``: the 2 x 2 wavelet pooling starts as
  "keep the top-left pixel" instead of the mean, so the modulus is taken of
  the response itself at every other pixel. The 2-tap mean passes only
  cos(3 pi / 8) ~ 0.38 of the Morlet carrier (3 pi / 4 rad/sample) along an
  axis; a single tap passes all of it. Same fused convolution, same cost.
"""
import ctypes
import functools
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import wavelet_kernels

MODULUS_TYPES = ("complex_modulus", "phase_relu")
# Where the modulus is taken: after the 2 x 2 pooling (the default order) or before it, at full resolution.
MODULUS_RESOLUTIONS = ("half", "subsample", "full")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# relu(a) + relu(-a) = |a|, and (|a| + |b|) / sqrt(2) lies between |a + ib| / sqrt(2)
# and |a + ib|: with 1/sqrt(2) on each rectified phase, phase_relu starts as the
# complex modulus to within a factor sqrt(2) (docs/DESIGN.md, "The block").
PHASE_COLLAPSE_INIT = 1.0 / math.sqrt(2.0)
# Weight of each tap of a 2 x 2 average pooling.
AVG_POOL_2X2 = 0.25
# modulus_resolution='subsample': the wavelet pooling keeps this tap of each 2 x 2 cell (weight 1, the rest 0).
SUBSAMPLE_TAP = (0, 0)
# The rectified phases per (channel, orientation): +Re, -Re, +Im, -Im.
N_PHASES = 4
# What the K x K filters are made of: free taps (the default) or the parameters of a Morlet wavelet per orientation.
LEARN_MODES = ("taps", "morlet")
# The learnable parameters of each orientation's Morlet wavelet under learn='morlet' (MorletBank).
MORLET_PARAMS = ("theta", "xi", "sigma", "slant")
# --learn morlet --init random draws each orientation's parameters uniformly from these ranges (the width
# log-uniformly). Gauthier et al. (CVPR 2022, "Parametric Scattering Networks") draw theta in [0, 2 pi),
# slant in [0.5, 1.5], xi in [0.5, 1] and sigma log-uniform in [1, 5] for a two-scale bank on whole
# images; our filters are one scale on a 7 x 7 grid, so: theta over a half-turn (the modulus of a real
# image's response is the same at theta and theta + pi), xi from a quarter of Nyquist to Nyquist (the
# band a K x K kernel resolves; the wavelet init sits at 3 pi / 4), sigma from 0.5 px to 2 px (an envelope
# that stays inside a 7 x 7 grid; the init is 0.8), and the paper's slant range.
RANDOM_THETA = (0.0, math.pi)
RANDOM_XI = (math.pi / 4, math.pi)
RANDOM_SIGMA = (0.5, 2.0)
RANDOM_SLANT = (0.5, 1.5)
# strided_conv goes polyphase (space-to-depth, stride 1) on the CPU up to this many input channels per group:
# the widest group where that form was faster, forward + backward, in `benchmark.py --conv-forms`
# (BENCHMARKS.md, "Where the time goes"); the dense second block's 27 inputs per group are faster direct.
POLYPHASE_MAX_GROUP_INPUTS = 9
# glibc malloc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
# mmap and gives it back when freed (and trims the heap's free top), so each forward pass page-faults its
# activations in again: about 35 MiB per CIFAR batch of 128, a third to half of the forward on 2 cores
# (BENCHMARKS.md, "Where the time goes"). A ScatteringBlock therefore sets, once per process, a fixed
# threshold and a high trim limit (keep_freed_memory). mallopt parameter numbers from glibc's malloc.h;
# 32 MiB is the largest threshold it accepts on 64-bit.
GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2 ** 20
KEEP_FREED_BYTES = 2 ** 30  # freed memory kept for reuse before glibc returns it to the system
# Set to 0 to keep glibc's own policy (the process then returns freed memory at once, and runs slower).
KEEP_FREED_MEMORY_ENV = "SCATTERING_KEEP_FREED_MEMORY"
# Grid of the zero-padded FFT that locates a K x K filter's spectral peak: 2*pi/256 ~ 0.025 rad/sample
# resolution, ten times finer than the frequency shifts that training produces (docs/EXPERIMENTS.md).
FFT_SIZE = 256


def mixing_groups(in_channels, mixing_horizon, what=None):
    """Number of groups of the wavelet convolutions for a mixing horizon.

    ``None`` or ``in_channels <= mixing_horizon``: 1 (dense). Otherwise
    ``in_channels // mixing_horizon``, which must divide exactly (``what``
    names the channels in the error; default ``in_channels=<n>``).
    """
    if mixing_horizon is None:
        return 1
    if not isinstance(mixing_horizon, int) or mixing_horizon < 1:
        raise ValueError(f"mixing_horizon must be a positive integer or None, got {mixing_horizon!r}")
    if in_channels <= mixing_horizon:
        return 1
    if in_channels % mixing_horizon:
        valid = [h for h in range(1, in_channels + 1) if in_channels % h == 0]
        raise ValueError(f"mixing_horizon={mixing_horizon} does not divide {what or f'in_channels={in_channels}'}; "
                         f"valid values: {valid} (or any value >= {in_channels} for dense)")
    return in_channels // mixing_horizon


def morlet_horizon(learn, mixing_horizon):
    """The mixing horizon a block uses: ``mixing_horizon``, or 1 for learn='morlet' (each Morlet wavelet sees
    one input channel); ValueError for an explicit other horizon with 'morlet'."""
    if learn != "morlet":
        return mixing_horizon
    if mixing_horizon not in (None, 1):
        raise ValueError(f"learn='morlet' filters each input channel on its own: mixing_horizon must be 1 (or "
                         f"unset), got {mixing_horizon!r}")
    return 1


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


def output_orders(in_orders, L, max_order=None, lowpass_only=False):
    """Channels per path order after one block, from ``in_orders`` (channels per order, order 0 first).

    The order of a channel is the number of band-pass filters on its path.
    Order k of the output holds the low-pass of the order-k inputs and the L
    wavelet responses of each order-(k-1) input, if k-1 < max_order (None: no
    limit). With max_order=2 and n blocks this gives 1 + nL + L^2 n(n-1)/2
    channels per input channel, kymatio's path count at J=n.
    """
    if lowpass_only:
        return tuple(in_orders)
    n = [*in_orders, 0]
    out = [n[0]] + [n[k] + (L * n[k - 1] if max_order is None or k - 1 < max_order else 0) for k in range(1, len(n))]
    return tuple(out[:-1] if out[-1] == 0 else out)


def wavelet_inputs(in_orders, max_order=None):
    """How many input channels (the leading ones, sorted by order) get wavelets: those of order < max_order."""
    return sum(in_orders if max_order is None else in_orders[:max_order])


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


@functools.cache
def keep_freed_memory():
    """Make glibc malloc keep freed blocks up to 32 MiB for reuse instead of unmapping them, once per process.

    Every ScatteringBlock calls it when built, so a script that only imports
    the model runs at the training scripts' speed. Returns True when set;
    False without glibc (macOS, Windows, musl) or when the environment sets
    SCATTERING_KEEP_FREED_MEMORY=0. Its one effect on the process: freed
    memory (up to 1 GiB of it) stays mapped for the next allocation instead
    of going back to the system, so the resident size stays near its peak.
    """
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(GLIBC_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def strided_conv(x, weight, padding, groups):
    """``F.conv2d(x, weight, stride=2, padding=padding, groups=groups)`` for an even k x k kernel, in the
    faster of two forms: ``polyphase_conv`` on the CPU for groups of at most POLYPHASE_MAX_GROUP_INPUTS
    inputs and more than one output; the direct strided convolution on CUDA (cuDNN's own stride-2
    kernels; not measured otherwise), for wider groups, and for one output per group (the low-pass
    alone, oneDNN's depthwise kernel). ``benchmark.py --conv-forms`` times both forms. A frozen
    per-channel weight with the same filters for every channel runs as one ungrouped convolution
    (``shared_filter_conv``)."""
    if x.device.type != "cpu" or weight.shape[1] > POLYPHASE_MAX_GROUP_INPUTS or weight.shape[0] == groups:
        return F.conv2d(x, weight, stride=2, padding=padding, groups=groups)
    if groups == x.shape[1] and shares_filters(weight, groups):
        return shared_filter_conv(x, weight[:weight.shape[0] // groups], padding)
    return polyphase_conv(x, weight, padding, groups)


def shares_filters(weight, groups):
    """True when a per-channel weight (groups = input channels) that does not train holds the same filters for
    every channel (the fixed transform: one Morlet bank repeated). A check of the values: not under compile."""
    if weight.requires_grad or torch.compiler.is_compiling():
        return False
    per_group = weight.view(groups, -1, *weight.shape[1:])  # (g*O, 1, k, k) -> (g, O, 1, k, k)
    return bool((per_group == per_group[:1]).all())


def shared_filter_conv(x, weight, padding):
    """The per-channel stride-2 convolution when every channel has the same filters ``weight`` (O, 1, k, k):
    one ungrouped convolution over the B*C single-channel images, whose (B*C, O, h, w) output is already the
    grouped layout (B, C*O, h, w). oneDNN runs it faster than the grouped form: the fixed transform's forward
    is 1.27x faster with it (BENCHMARKS.md, "Where the time goes")."""
    B, C, H, W = x.shape
    y = polyphase_conv(x.reshape(B * C, 1, H, W), weight, padding, 1, memory_format=torch.contiguous_format)
    return y.reshape(B, C * weight.shape[0], *y.shape[-2:])  # (B*C, O, h, w) -> (B, C*O, h, w)


def polyphase_conv(x, weight, padding, groups, memory_format=torch.channels_last):
    """The stride-2 convolution as a stride-1 one of the input's four phases (space-to-depth).

    With x' the padded input and u = 2p + a, v = 2q + b (a, b in {0, 1}),

        y[i, j] = sum_{u,v} w[u, v] x'[2i + u, 2j + v]
                = sum_{a,b} sum_{p,q} w[2p + a, 2q + b] x'_ab[i + p, j + q],   x'_ab[m, n] = x'[2m + a, 2n + b],

    a stride-1 convolution of the four phases x'_ab (``pixel_unshuffle``)
    with (k/2) x (k/2) kernels: the same multiply-adds, but oneDNN's stride-1
    kernels, and above all their input gradient (a stride-1 transposed
    convolution instead of a stride-2 one), run up to 2.4x faster on this
    project's shapes (BENCHMARKS.md, "Where the time goes"). The phases go
    channels_last by default, the layout those kernels are fastest in for
    grouped convolutions; the result stays so (the same values; ``reshape``,
    not ``view``, reads it).
    """
    k = weight.shape[-1]
    H, W = x.shape[-2:]
    rows, cols = (H + 2 * padding - k) // 2 + 1, (W + 2 * padding - k) // 2 + 1  # the strided convolution's output
    # pad to an even size: a row or column past the last kept window changes no kept output
    x = F.pad(x, (padding, padding + (W + 2 * padding) % 2, padding, padding + (H + 2 * padding) % 2))
    phases = F.pixel_unshuffle(x, 2)  # (B, C, H', W') -> (B, 4C, H'/2, W'/2), channel 4c + 2a + b
    O, I = weight.shape[:2]
    h = k // 2
    weight = weight.reshape(O, I, h, 2, h, 2).permute(0, 1, 3, 5, 2, 4)  # (O, I, k, k) -> (O, I, a, b, p, q)
    y = F.conv2d(phases.contiguous(memory_format=memory_format), weight.reshape(O, 4 * I, h, h),
                 groups=groups)  # (O, I, a, b, p, q) -> (O, 4I, k/2, k/2): input channel 4i + 2a + b
    return y[..., :rows, :cols]


def safe_modulus(re, im):
    """sqrt(re^2 + im^2) with gradient 0 (not NaN) where both are 0.

    The clamp at the dtype's smallest normal number only changes moduli below
    ~1e-19 (fp32); below it the clamp passes no gradient, which is the
    subgradient 0 at the cone's tip.
    """
    squared = re * re + im * im
    return torch.sqrt(torch.clamp(squared, min=torch.finfo(squared.dtype).tiny))


class LowpassAndModulus(torch.autograd.Function):
    """``cat(S0, safe_modulus(re, im))`` from a grouped convolution's output, in one pass each way.

    y: (B, g*(n0 + 2*n1), H, W), per group the n0 low-pass outputs, then n1
    real and n1 imaginary parts (any memory layout). Returns (B, g*(n0 + n1),
    H, W): the g*n0 low-pass channels, then the g*n1 moduli.

    Autograd through the composed version (split, square, add, clamp, sqrt,
    reshape, cat) records seven steps, each backward with a full-size
    temporary, and returns a gradient in another layout than the
    convolution's output (one more copy). Here the backward is the modulus's
    own derivative, d|z|/d re = re / |z|, taken as 0 where |z| = 0 (the
    subgradient at the cone's tip, as ``safe_modulus``), written in place into
    a gradient laid out as y. First derivatives only.
    """

    @staticmethod
    def forward(ctx, y, groups, n_lowpass, n_wavelet):
        B, _, H, W = y.shape
        S0, re, im = split_groups(y, groups, [n_lowpass, n_wavelet, n_wavelet])
        modulus = torch.addcmul(re * re, im, im).sqrt_()  # (B, g, n1, H, W), in y's layout
        out = torch.cat([S0.reshape(B, -1, H, W), modulus.reshape(B, -1, H, W)], dim=1)  # -> (B, g*n0 + g*n1, H, W)
        ctx.save_for_backward(y, out)
        ctx.sizes = groups, n_lowpass, n_wavelet
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        y, out = ctx.saved_tensors
        groups, n_lowpass, n_wavelet = ctx.sizes
        B, _, H, W = y.shape
        C = groups * n_lowpass
        sizes = [n_lowpass, n_wavelet, n_wavelet]
        _, re, im = split_groups(y, groups, sizes)
        d_y = torch.empty_like(y)  # in y's memory layout, which the convolution's backward reads without a copy
        d_lowpass, d_re, d_im = split_groups(d_y, groups, sizes)
        d_lowpass.copy_(grad_out[:, :C].reshape(B, groups, n_lowpass, H, W))  # (B, C, H, W) -> (B, g, n0, H, W)
        modulus = out[:, C:].reshape(B, groups, n_wavelet, H, W).clamp_min(torch.finfo(y.dtype).tiny)
        d_modulus = grad_out[:, C:].reshape(B, groups, n_wavelet, H, W)  # (B, CL, H, W) -> (B, g, n1, H, W)
        # re / |z| <= 1 first: no overflow where |z| is tiny and the incoming gradient large
        d_re.copy_(re).div_(modulus).mul_(d_modulus)
        d_im.copy_(im).div_(modulus).mul_(d_modulus)
        return d_y, None, None, None


def pad_input(x, kernel_size, padding_mode):
    """(x, padding) for a 'same' K x K convolution: zeros are left to the convolution (no copy of the input)."""
    p = kernel_size // 2
    if padding_mode == "zeros":
        return x, p
    return F.pad(x, (p, p, p, p), mode=padding_mode), 0


class MorletBank(nn.Module):
    r"""A block's K x K filters generated from learnable Morlet parameters (``learn='morlet'``).

    Parameters, one per orientation l and shared by every input channel (as
    in Gauthier et al., "Parametric Scattering Networks", CVPR 2022):
    ``theta`` (L,) in radians, ``xi`` (L,) in radians per sample,
    ``log_sigma`` (L,) and ``log_slant`` (L,); and ``log_phi_sigma`` (), the
    low-pass width. Widths are stored as logarithms so that no optimiser
    step can make them negative. ``kernels()`` evaluates, in torch and on
    the parameters' device, the formulas of ``wavelet_kernels``: with
    :math:`a = u_1\cos\theta + u_2\sin\theta` (along) and
    :math:`b = -u_1\sin\theta + u_2\cos\theta` (across),

    .. math::

        g(u) = \frac{\text{slant}}{2\pi\sigma^2} e^{-(a^2 + \text{slant}^2 b^2)/2\sigma^2} e^{i\xi a},
        \qquad \psi = g_\xi - \beta g_0, \quad \beta = \textstyle\sum g_\xi / \sum g_0,
        \qquad \phi \propto e^{-|u|^2 / 2\sigma_\phi^2}, \ \textstyle\sum \phi = 1,

    which is ``morlet_2d`` (:math:`u^\top R D R^\top u = a^2 + \text{slant}^2 b^2`)
    and ``filter_bank``'s low-pass. Initialised to ``filter_bank(L, K)``'s
    parameters, it generates that bank exactly (to float rounding).
    """

    def __init__(self, L, kernel_size, lowpass_only=False):
        super().__init__()
        bank = wavelet_kernels.filter_bank(L, kernel_size)
        dtype = torch.get_default_dtype()
        self.L, self.kernel_size, self.lowpass_only = L, kernel_size, lowpass_only
        self.register_buffer("grid", torch.as_tensor(wavelet_kernels.centred_grid(kernel_size), dtype=dtype),
                             persistent=False)  # (2, K, K): u_1, u_2
        self.log_phi_sigma = nn.Parameter(torch.tensor(math.log(wavelet_kernels.SIGMA_0), dtype=dtype))
        if not lowpass_only:  # a low-pass-only block has no wavelet parameters (none that would get no gradient)
            self.theta = nn.Parameter(torch.as_tensor(bank["theta"], dtype=dtype))
            self.xi = nn.Parameter(torch.full((L,), bank["xi"], dtype=dtype))
            self.log_sigma = nn.Parameter(torch.full((L,), math.log(bank["sigma"]), dtype=dtype))
            self.log_slant = nn.Parameter(torch.full((L,), math.log(bank["slant"]), dtype=dtype))
        self._cache = (None, None)

    @torch.no_grad()
    def reset_random(self):
        """Draw every orientation's parameters over RANDOM_THETA, RANDOM_XI, RANDOM_SIGMA (log), RANDOM_SLANT;
        the low-pass keeps its width (the random control is about the wavelets)."""
        if self.lowpass_only:
            return
        self.theta.uniform_(*RANDOM_THETA)
        self.xi.uniform_(*RANDOM_XI)
        self.log_sigma.uniform_(*(math.log(s) for s in RANDOM_SIGMA))
        self.log_slant.uniform_(*RANDOM_SLANT).log_()

    @torch.no_grad()
    def parameter_table(self):
        """Per orientation {theta, xi, sigma, slant} (radians, rad/sample, pixels, ratio), and the low-pass sigma."""
        table = {"phi_sigma": float(self.log_phi_sigma.exp())}
        if not self.lowpass_only:
            values = {"theta": self.theta, "xi": self.xi, "sigma": self.log_sigma.exp(), "slant": self.log_slant.exp()}
            table["orientations"] = [{k: float(v[l]) for k, v in values.items()} for l in range(self.L)]
        return table

    def kernels(self):
        """{'phi': (1, K, K), 'psi_real': (L, K, K), 'psi_imag': (L, K, K)} from the current parameters (no psi_*
        when lowpass_only).

        Kept while no parameter changes and no gradient is wanted (frozen
        blocks, evaluation): the filters are then made once, not every batch.
        """
        params = list(self.parameters())
        cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        if cacheable and not torch.compiler.is_compiling():
            key = tuple((p.data_ptr(), p._version, p.dtype) for p in (*params, self.grid))
            if self._cache[0] != key:
                self._cache = (key, self._generate())
            return self._cache[1]
        return self._generate()

    def _generate(self):
        u1, u2 = self.grid[0], self.grid[1]  # (K, K) each
        phi = torch.exp(-(u1 ** 2 + u2 ** 2) / (2 * self.log_phi_sigma.exp() ** 2))
        if self.lowpass_only:
            return {"phi": (phi / phi.sum())[None]}
        theta, xi = self.theta[:, None, None], self.xi[:, None, None]  # (L,) -> (L, 1, 1)
        sigma, slant = self.log_sigma.exp()[:, None, None], self.log_slant.exp()[:, None, None]
        along = u1 * theta.cos() + u2 * theta.sin()  # (L, K, K)
        across = -u1 * theta.sin() + u2 * theta.cos()
        envelope = slant / (2 * math.pi * sigma ** 2) * torch.exp(-(along ** 2 + (slant * across) ** 2) / (2 * sigma ** 2))
        gabor_real, gabor_imag = envelope * torch.cos(xi * along), envelope * torch.sin(xi * along)
        total = envelope.sum((-2, -1), keepdim=True)  # beta = sum(g_xi) / sum(g_0), real and imaginary parts
        beta_real, beta_imag = gabor_real.sum((-2, -1), keepdim=True) / total, gabor_imag.sum((-2, -1), keepdim=True) / total
        return {"phi": (phi / phi.sum())[None], "psi_real": gabor_real - beta_real * envelope,
                "psi_imag": gabor_imag - beta_imag * envelope}


class GeneratedConv:
    """A per-channel K x K convolution whose kernels a MorletBank makes: the parts of an ``nn.Conv2d`` that
    ScatteringBlock reads (``weight``, ``in_channels``, ``out_channels``, ``groups``, calling it), with no
    weight of its own (the bank's parameters are the block's)."""

    def __init__(self, bank, part, in_channels, padding_mode):
        self.bank, self.part, self.padding_mode = bank, part, padding_mode
        self.in_channels = self.groups = in_channels
        self.out_channels = in_channels * (1 if part == "phi" else bank.L)

    @property
    def weight(self):
        """(C*P, 1, K, K): output c*P + p holds kernel p on input channel c."""
        return self.weight_from(self.bank.kernels())

    def weight_from(self, kernels):
        """``weight`` from ``kernels``, a MorletBank.kernels() already made (one generation for all parts)."""
        kernels = kernels[self.part]  # (P, K, K)
        P, K = kernels.shape[0], kernels.shape[-1]
        return kernels.expand(self.in_channels, P, K, K).reshape(self.out_channels, 1, K, K)  # (C, P, K, K) -> (C*P, 1, K, K)

    def __call__(self, x):
        x, padding = pad_input(x, self.bank.kernel_size, self.padding_mode)
        return F.conv2d(x, self.weight, padding=padding, groups=self.groups)



class ScatteringBlock(nn.Module):
    """Single-scale (J=1) scattering with 2x downsampling; see the module docstring.

    ``forward`` (one fused strided convolution) and ``reference_forward`` (the
    data flow one step at a time) compute the same output.

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
    max_order : int or None
        Apply the wavelets only to input channels of order < max_order, and
        return the channels sorted by order; None: every channel, today's layout.
    in_orders : tuple of int or None
        Input channels per path order, order 0 first (sum: in_channels);
        used with max_order. None: every input channel is of order 0.
    modulus_resolution : {'half', 'subsample', 'full'}
        Take the modulus after the 2 x 2 mean (the default), of the response at
        every other pixel (the wavelet pooling starts as one tap), or at full
        resolution before the 2 x 2 mean.
    learn : {'taps', 'morlet'}
        What the K x K filters are: free taps (nn.Conv2d weights), or Morlet
        wavelets generated from learnable parameters (``self.morlet``, a
        MorletBank), per input channel (mixing_horizon must be None or 1), with
        the 2 x 2 poolings fixed averages (buffers, not parameters).
    """

    def __init__(self, in_channels, L=8, kernel_size=7, modulus_type="complex_modulus", learnable=True,
                 mixing_horizon=None, lowpass_only=False, padding_mode="zeros", max_order=None, in_orders=None,
                 modulus_resolution="half", learn="taps"):
        super().__init__()
        self._check_options(in_channels, modulus_type, padding_mode, max_order, in_orders, modulus_resolution, learn)
        keep_freed_memory()  # once per process: activations reused, not page-faulted in on every call
        mixing_horizon = morlet_horizon(learn, mixing_horizon)
        bank = wavelet_kernels.filter_bank(L, kernel_size)
        self.in_channels, self.L, self.kernel_size = in_channels, L, kernel_size
        self.modulus_type, self.lowpass_only, self.padding_mode = modulus_type, lowpass_only, padding_mode
        self.mixing_horizon, self.max_order, self.modulus_resolution = mixing_horizon, max_order, modulus_resolution
        self.learn = learn
        self.in_orders = tuple(in_orders or (in_channels,))
        self.out_orders = output_orders(self.in_orders, L, max_order, lowpass_only)
        self.out_channels = sum(self.out_orders)
        self._order_slices = self._slices_by_order() if max_order is not None and not lowpass_only else None
        C = in_channels
        P = self.wavelet_inputs = C if lowpass_only else wavelet_inputs(self.in_orders, max_order)
        self.groups = mixing_groups(C, mixing_horizon)
        self.psi_groups = mixing_groups(P, mixing_horizon, f"the {P} input channels of order < {max_order}")

        if learn == "morlet":
            self.morlet = MorletBank(L, kernel_size, lowpass_only)
            self.phi_conv = GeneratedConv(self.morlet, "phi", C, padding_mode)
        else:
            self.phi_conv = self._wavelet_conv(C, bank["phi"][None], self.groups)
        self.phi_pool = self._avg_pool_conv(C)
        if not lowpass_only:
            if learn == "morlet":
                self.psi_real = GeneratedConv(self.morlet, "psi_real", P, padding_mode)
                self.psi_imag = GeneratedConv(self.morlet, "psi_imag", P, padding_mode)
            else:
                self.psi_real = self._wavelet_conv(P, bank["psi"].real, self.psi_groups)
                self.psi_imag = self._wavelet_conv(P, bank["psi"].imag, self.psi_groups)
            self.psi_pool = self._avg_pool_conv(P * L)
            if modulus_resolution == "subsample":
                with torch.no_grad():
                    self.psi_pool.weight.zero_()[(..., *SUBSAMPLE_TAP)] = 1.0
            if modulus_type == "phase_relu":
                self.phase_collapse = nn.Conv2d(N_PHASES * P * L, P * L, 1, groups=P * L, bias=False)
                nn.init.constant_(self.phase_collapse.weight, PHASE_COLLAPSE_INIT)
        if learn == "morlet":  # the poolings stay averages: each path stays a Morlet wavelet, then a mean
            for pool in (self.phi_pool, getattr(self, "psi_pool", None)):
                if pool is not None:
                    fixed = pool.weight.detach()
                    del pool.weight
                    pool.register_buffer("weight", fixed)
        self.requires_grad_(learnable)

    def reset_random(self):
        """--init random: PyTorch's default (Kaiming-uniform) init of every convolution (taps), or the Morlet
        parameters drawn over RANDOM_* (morlet: the poolings and the phase collapse keep their init)."""
        if self.learn == "morlet":
            self.morlet.reset_random()
            return
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                conv.reset_parameters()

    @staticmethod
    def _check_options(in_channels, modulus_type, padding_mode, max_order, in_orders, modulus_resolution, learn):
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if modulus_type not in MODULUS_TYPES:
            raise ValueError(f"modulus_type must be one of {MODULUS_TYPES}, got {modulus_type!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if modulus_resolution not in MODULUS_RESOLUTIONS:
            raise ValueError(f"modulus_resolution must be one of {MODULUS_RESOLUTIONS}, got {modulus_resolution!r}")
        if max_order is not None and (not isinstance(max_order, int) or isinstance(max_order, bool) or max_order < 1):
            raise ValueError(f"max_order must be a positive integer or None, got {max_order!r}")
        if learn not in LEARN_MODES:
            raise ValueError(f"learn must be one of {LEARN_MODES}, got {learn!r}")
        if in_orders is not None and (max_order is None or sum(in_orders) != in_channels or min(in_orders) < 0):
            raise ValueError(f"in_orders must count the {in_channels} input channels by order (with max_order), "
                             f"got {in_orders!r}")

    def filter_convs(self):
        """The K x K convolutions by name: phi_conv, and psi_real, psi_imag unless lowpass_only."""
        convs = {"phi_conv": self.phi_conv}
        if not self.lowpass_only:
            convs.update(psi_real=self.psi_real, psi_imag=self.psi_imag)
        return convs

    def _wavelet_conv(self, in_channels, kernels, groups):
        conv = nn.Conv2d(in_channels, in_channels * len(kernels), self.kernel_size, padding="same", bias=False,
                         groups=groups, padding_mode=self.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(block_diagonal_weight(kernels, in_channels, groups))
        return conv

    @staticmethod
    def _avg_pool_conv(channels):
        conv = nn.Conv2d(channels, channels, 2, stride=2, groups=channels, bias=False)
        nn.init.constant_(conv.weight, AVG_POOL_2X2)
        return conv

    @property
    def single_convolution(self):
        """True when one strided convolution computes the whole block: every input gets wavelets, modulus at half."""
        return self.lowpass_only or (self.wavelet_inputs == self.in_channels and self.modulus_resolution != "full")

    def fused_weight(self, groups=None, kernels=None):
        """The composed stride-2 kernels of [phi, psi_real, psi_imag], ordered by group (single_convolution only).

        Returns (g * (C + 2CL) / g, C/g, K+1, K+1): for grouped convolutions
        the output channels of each group must be contiguous, so the three
        filter sets are interleaved group by group. ``groups=C`` (per channel)
        keeps only each output's own input channel: equal to the block's
        convolution only while the weights are block-diagonal. ``kernels``
        (learn='morlet'): the bank's filters, made once for the whole forward.
        """
        pairs = [(self.phi_conv, self.phi_pool)]
        if not self.lowpass_only:
            pairs += [(self.psi_real, self.psi_pool), (self.psi_imag, self.psi_pool)]
        return self._grouped_weight(pairs, groups or self.groups, kernels=kernels)

    def _grouped_weight(self, pairs, groups, downsample=True, kernels=None):
        """[(conv, pool)] over the same inputs as one weight with ``groups`` groups, outputs interleaved by group.

        downsample: compose each conv with its 2 x 2 stride-2 pool (for a
        stride-2 convolution); otherwise the K x K kernels alone. kernels:
        the MorletBank's filters already made (learn='morlet'), else None.
        """
        parts = [conv.weight if kernels is None else conv.weight_from(kernels) for conv, _ in pairs]
        parts = [self._planes(conv, weight, groups) for (conv, _), weight in zip(pairs, parts)]
        if downsample:
            parts = [compose_downsampling(w, pool.weight) for w, (_, pool) in zip(parts, pairs)]
        per_group = [w.reshape(groups, -1, *w.shape[1:]) for w in parts]  # (O, I/g, k, k) -> (g, O/g, I/g, k, k)
        return torch.cat(per_group, dim=1).flatten(0, 1)  # (g, sum O/g, I/g, k, k) -> (g*sum O/g, I/g, k, k)

    def _planes(self, conv, weight, groups):
        """conv's ``weight`` (O, I/conv.groups, K, K) as the weight of a convolution with ``groups`` groups."""
        if groups == conv.groups:
            return weight
        return weight[self._own_input(conv)].unsqueeze(1)  # (O, I/g, K, K) -> (O, 1, K, K)

    @staticmethod
    def _own_input(conv):
        """Index (outputs, in-group input) of each output's own input channel: c for outputs c*P + p."""
        out = torch.arange(conv.out_channels, device=conv.weight.device)
        return out, out // (conv.out_channels // conv.in_channels) % (conv.in_channels // conv.groups)

    def is_frozen_block_diagonal(self):
        """True when no weight trains and every output sees only its own input channel (as at init).

        Then the forward pass runs per channel (groups=C): the same result for
        C/g times fewer multiply-adds. Cached until a weight changes (in-place
        updates bump a tensor's version counter; moves change its storage). Not
        under ``torch.compile``, which cannot trace a choice that depends on the
        weights' values: there the block runs its full grouped convolution (the
        same result, more multiply-adds).
        """
        convs = list(self.filter_convs().values())
        if all(conv.groups == conv.in_channels for conv in convs) or any(c.weight.requires_grad for c in convs):
            return False
        if torch.compiler.is_compiling():  # a data-dependent choice of shapes: compiled, the block runs as it is
            return False
        key = tuple((c.weight.data_ptr(), c.weight._version) for c in convs)
        if getattr(self, "_diagonal_cache", (None,))[0] != key:
            self._diagonal_cache = (key, all(self._off_diagonal_is_zero(c) for c in convs))
        return self._diagonal_cache[1]

    def _off_diagonal_is_zero(self, conv):
        off_diagonal = torch.ones(conv.weight.shape[:2], dtype=torch.bool, device=conv.weight.device)
        off_diagonal[self._own_input(conv)] = False
        return not bool(conv.weight[off_diagonal].any())

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ScatteringBlock expects input of shape (B, {self.in_channels}, M, N), "
                             f"got {tuple(x.shape)}")
        if min(x.shape[-2:]) < 2:
            raise ValueError(f"ScatteringBlock needs spatial size >= 2 to downsample, got {tuple(x.shape[-2:])}")

    def forward(self, x):
        self._check_input(x)
        x, padding = pad_input(x, self.kernel_size, self.padding_mode)
        per_channel = self.is_frozen_block_diagonal()
        g = self.in_channels if per_channel else self.groups
        kernels = self.morlet.kernels() if self.learn == "morlet" else None  # once, not once per part
        if self.single_convolution:
            y = strided_conv(x, self.fused_weight(g, kernels), padding, g)
            if self.lowpass_only:
                return y
            C, CL = self.in_channels, self.in_channels * self.L
            if self.modulus_type == "complex_modulus":
                return LowpassAndModulus.apply(y, g, C // g, CL // g)
            S0, re, im = split_groups(y, g, [C // g, CL // g, CL // g])
            B, _, H, W = y.shape
            return torch.cat([S0.reshape(B, C, H, W), self.phase_modulus(re, im)], dim=1)  # S0: (B, g, C/g, H, W)
        S0 = strided_conv(x, self._grouped_weight([(self.phi_conv, self.phi_pool)], g, kernels=kernels), padding, g)
        return self._by_order(S0, self._band_pass(x, padding, per_channel, kernels))

    def _band_pass(self, x, padding, per_channel, kernels=None):
        """S1 of the input channels of order < max_order: (B, P*L, M/2, N/2), P = wavelet_inputs."""
        P = self.wavelet_inputs
        g = P if per_channel else self.psi_groups
        pairs = [(self.psi_real, self.psi_pool), (self.psi_imag, self.psi_pool)]
        x = x[:, :P]  # (B, C, M, N) -> (B, P, M, N): the channels of order < max_order
        full = self.modulus_resolution == "full"  # stride-1 responses, pooled after the modulus
        weight = self._grouped_weight(pairs, g, downsample=not full, kernels=kernels)
        y = F.conv2d(x, weight, padding=padding, groups=g) if full else strided_conv(x, weight, padding, g)
        S1 = self.phase_modulus(*split_groups(y, g, [P * self.L // g] * 2))
        return self.psi_pool(S1) if full else S1

    def _by_order(self, S0, S1):
        """cat(S0, S1) with the channels sorted by order (max_order) or as cat(S0, S1) (no limit)."""
        if self.max_order is None:
            return torch.cat([S0, S1], dim=1)
        sources = (S0, S1)
        return torch.cat([sources[i][:, start:end] for i, start, end in self._order_slices], dim=1)

    def _slices_by_order(self):
        """(source, start, end) of each output piece in order: source 0 is S0, 1 is S1 (built once)."""
        starts = np.cumsum([0, *self.in_orders]).tolist()
        pieces = []
        for k in range(len(self.out_orders)):
            if k < len(self.in_orders):  # the low-pass of the order-k inputs
                pieces.append((0, starts[k], starts[k + 1]))
            if 0 < k <= self.max_order:  # the wavelets of the order-(k-1) inputs, c*L + l
                pieces.append((1, self.L * starts[k - 1], self.L * starts[k]))
        return pieces

    def phase_modulus(self, re, im):
        """S1 (B, C*L, H, W) from the real and imaginary parts, (B, C*L, H, W) or per group (B, g, C*L/g, H, W).

        The grouped form is a view of the convolution's output: the elementwise
        operations read it in place instead of copying it to (B, C*L, H, W) first.
        """
        B, H, W = re.shape[0], *re.shape[-2:]
        if self.modulus_type == "complex_modulus":
            return safe_modulus(re, im).reshape(B, -1, H, W)  # (B, g, CL/g, H, W) -> (B, CL, H, W)
        phases = torch.stack([re, -re, im, -im], dim=-3).relu()  # (B, [g,] CL[/g], 4, H, W), contiguous per (c, l)
        # -> (B, 4CL, H, W); reshape, not view: channels_last inputs stack non-contiguously
        return self.phase_collapse(phases.reshape(B, -1, H, W))

    def reference_forward(self, x):
        """The block's data flow step by step with its own modules (docs/DESIGN.md, "The block"): no fusion,
        no per-group weights, no in-place views. ``forward`` computes the same (the tests compare them)."""
        S0 = self.phi_pool(self.phi_conv(x))
        if self.lowpass_only:
            return S0
        xw = x[:, :self.wavelet_inputs]  # (B, C, M, N) -> (B, P, M, N): the channels of order < max_order
        if self.modulus_resolution != "full":  # pool, then modulus (subsample: a one-tap pool)
            S1 = self.reference_modulus(self.psi_pool(self.psi_real(xw)), self.psi_pool(self.psi_imag(xw)))
        else:  # modulus at full resolution, then pool
            S1 = self.psi_pool(self.reference_modulus(self.psi_real(xw), self.psi_imag(xw)))
        return self._by_order(S0, S1)

    def reference_modulus(self, re, im):
        """S1 from (B, C*L, H, W) real and imaginary parts, as written in docs/DESIGN.md."""
        if self.modulus_type == "complex_modulus":
            return torch.sqrt(re ** 2 + im ** 2)
        B, CL, H, W = re.shape
        phases = torch.stack([F.relu(re), F.relu(-re), F.relu(im), F.relu(-im)], dim=2)  # (B, CL, 4, H, W)
        return self.phase_collapse(phases.reshape(B, N_PHASES * CL, H, W))  # -> (B, 4CL, H, W)

    @torch.no_grad()
    def diagonal_filters(self):
        """What each output sees of its own input channel, as NumPy arrays.

        Returns {'phi': (C, K, K), 'psi': (P, L, K, K) complex = psi_real + i psi_imag}
        (P = wavelet_inputs; no 'psi' when lowpass_only). At init these are the
        Morlet filter bank repeated per channel; after training the planes that
        mix channels are left out (filter_delta_* in engine.py measures the whole weights).
        """
        out = {"phi": self.phi_conv.weight[self._own_input(self.phi_conv)].double().cpu().numpy()}
        if not self.lowpass_only:
            K = self.kernel_size
            planes = [conv.weight[self._own_input(conv)].double().cpu().numpy().reshape(-1, self.L, K, K)
                      for conv in (self.psi_real, self.psi_imag)]  # (P*L, K, K) -> (P, L, K, K)
            out["psi"] = planes[0] + 1j * planes[1]
        return out

    def extra_repr(self):
        orders = (f", max_order={self.max_order}, in_orders={self.in_orders}" if self.max_order is not None else "")
        return (f"in_channels={self.in_channels}, L={self.L}, kernel_size={self.kernel_size}, "
                f"modulus_type={self.modulus_type!r}, groups={self.groups}, lowpass_only={self.lowpass_only}, "
                f"padding_mode={self.padding_mode!r}, modulus_resolution={self.modulus_resolution!r}{orders}, "
                f"learn={self.learn!r}")


def split_groups(y, groups, sizes):
    """Split a grouped convolution's output by filter set, as views: (B, g*sum(sizes), H, W) -> [(B, g, size, H, W)]."""
    B, _, H, W = y.shape
    return y.view(B, groups, sum(sizes), H, W).split(sizes, dim=2)  # (B, g*n, H, W) -> (B, g, n, H, W)


def wavelet_parameter_count(in_channels, L, kernel_size, mixing_horizon=None, lowpass_only=False, wavelet_inputs=None,
                            learn="taps"):
    """Weights of phi_conv + psi_real + psi_imag, as docs/DESIGN.md's mixing-horizon table counts them
    (learn='morlet': the MorletBank's parameters, MORLET_PARAMS per orientation and the low-pass width).

    wavelet_inputs: the input channels that get wavelets (max_order); default all.
    """
    if learn == "morlet":
        return 1 + (0 if lowpass_only else len(MORLET_PARAMS) * L)
    C, P = in_channels, in_channels if wavelet_inputs is None else wavelet_inputs
    n = C * (C // mixing_groups(C, mixing_horizon)) * kernel_size ** 2
    if not lowpass_only:
        n += 2 * P * L * (P // mixing_groups(P, mixing_horizon)) * kernel_size ** 2
    return n


def block_parameter_count(in_channels, L, kernel_size, modulus_type="complex_modulus", mixing_horizon=None,
                          lowpass_only=False, wavelet_inputs=None, learn="taps"):
    """All parameters of a ScatteringBlock, computed without building it."""
    P = in_channels if wavelet_inputs is None else wavelet_inputs
    n = wavelet_parameter_count(in_channels, L, kernel_size, mixing_horizon, lowpass_only, P, learn)
    pools = learn != "morlet"  # 'morlet' keeps the poolings as fixed buffers
    n += in_channels * 4 * pools  # phi_pool: depthwise 2 x 2
    if not lowpass_only:
        n += P * L * 4 * pools  # psi_pool: depthwise 2 x 2
        if modulus_type == "phase_relu":
            n += P * L * N_PHASES  # phase_collapse: grouped 1 x 1
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
