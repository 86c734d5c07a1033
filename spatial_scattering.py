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
- ``modulus_resolution='subsample'``: the 2 x 2 wavelet pooling starts as
  "keep the top-left pixel" instead of the mean, so the modulus is taken of
  the response itself at every other pixel. The 2-tap mean passes only
  cos(3 pi / 8) ~ 0.38 of the Morlet carrier (3 pi / 4 rad/sample) along an
  axis; a single tap passes all of it. Same fused convolution, same cost.
"""
import math

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
    """

    def __init__(self, in_channels, L=8, kernel_size=7, modulus_type="complex_modulus", learnable=True,
                 mixing_horizon=None, lowpass_only=False, padding_mode="zeros", max_order=None, in_orders=None,
                 modulus_resolution="half"):
        super().__init__()
        self._check_options(in_channels, modulus_type, padding_mode, max_order, in_orders, modulus_resolution)
        bank = wavelet_kernels.filter_bank(L, kernel_size)
        self.in_channels, self.L, self.kernel_size = in_channels, L, kernel_size
        self.modulus_type, self.lowpass_only, self.padding_mode = modulus_type, lowpass_only, padding_mode
        self.mixing_horizon, self.max_order, self.modulus_resolution = mixing_horizon, max_order, modulus_resolution
        self.in_orders = tuple(in_orders or (in_channels,))
        self.out_orders = output_orders(self.in_orders, L, max_order, lowpass_only)
        self.out_channels = sum(self.out_orders)
        self._order_slices = self._slices_by_order() if max_order is not None and not lowpass_only else None
        C = in_channels
        P = self.wavelet_inputs = C if lowpass_only else wavelet_inputs(self.in_orders, max_order)
        self.groups = mixing_groups(C, mixing_horizon)
        self.psi_groups = mixing_groups(P, mixing_horizon, f"the {P} input channels of order < {max_order}")

        self.phi_conv = self._wavelet_conv(C, bank["phi"][None], self.groups)
        self.phi_pool = self._avg_pool_conv(C)
        if not lowpass_only:
            self.psi_real = self._wavelet_conv(P, bank["psi"].real, self.psi_groups)
            self.psi_imag = self._wavelet_conv(P, bank["psi"].imag, self.psi_groups)
            self.psi_pool = self._avg_pool_conv(P * L)
            if modulus_resolution == "subsample":
                with torch.no_grad():
                    self.psi_pool.weight.zero_()[(..., *SUBSAMPLE_TAP)] = 1.0
            if modulus_type == "phase_relu":
                self.phase_collapse = nn.Conv2d(N_PHASES * P * L, P * L, 1, groups=P * L, bias=False)
                nn.init.constant_(self.phase_collapse.weight, PHASE_COLLAPSE_INIT)
        self.requires_grad_(learnable)

    @staticmethod
    def _check_options(in_channels, modulus_type, padding_mode, max_order, in_orders, modulus_resolution):
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

    def fused_weight(self, groups=None):
        """The composed stride-2 kernels of [phi, psi_real, psi_imag], ordered by group (single_convolution only).

        Returns (g * (C + 2CL) / g, C/g, K+1, K+1): for grouped convolutions
        the output channels of each group must be contiguous, so the three
        filter sets are interleaved group by group. ``groups=C`` (per channel)
        keeps only each output's own input channel: equal to the block's
        convolution only while the weights are block-diagonal.
        """
        pairs = [(self.phi_conv, self.phi_pool)]
        if not self.lowpass_only:
            pairs += [(self.psi_real, self.psi_pool), (self.psi_imag, self.psi_pool)]
        return self._grouped_weight(pairs, groups or self.groups)

    def _grouped_weight(self, pairs, groups, downsample=True):
        """[(conv, pool)] over the same inputs as one weight with ``groups`` groups, outputs interleaved by group.

        downsample: compose each conv with its 2 x 2 stride-2 pool (for a
        stride-2 convolution); otherwise the K x K kernels alone.
        """
        parts = [self._planes(conv, groups) for conv, _ in pairs]
        if downsample:
            parts = [compose_downsampling(w, pool.weight) for w, (_, pool) in zip(parts, pairs)]
        per_group = [w.reshape(groups, -1, *w.shape[1:]) for w in parts]  # (O, I/g, k, k) -> (g, O/g, I/g, k, k)
        return torch.cat(per_group, dim=1).flatten(0, 1)  # (g, sum O/g, I/g, k, k) -> (g*sum O/g, I/g, k, k)

    def _planes(self, conv, groups):
        """conv's weight (O, I/conv.groups, K, K) as the weight of a convolution with ``groups`` groups."""
        if groups == conv.groups:
            return conv.weight
        return conv.weight[self._own_input(conv)].unsqueeze(1)  # (O, I/g, K, K) -> (O, 1, K, K)

    @staticmethod
    def _own_input(conv):
        """Index (outputs, in-group input) of each output's own input channel: c for outputs c*P + p."""
        out = torch.arange(conv.out_channels, device=conv.weight.device)
        return out, out // (conv.out_channels // conv.in_channels) % (conv.in_channels // conv.groups)

    def is_frozen_block_diagonal(self):
        """True when no weight trains and every output sees only its own input channel (as at init).

        Then the forward pass runs per channel (groups=C): the same result for
        C/g times fewer multiply-adds. Cached until a weight changes (in-place
        updates bump a tensor's version counter; moves change its storage).
        """
        convs = list(self.filter_convs().values())
        if all(conv.groups == conv.in_channels for conv in convs) or any(c.weight.requires_grad for c in convs):
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

    def _pad(self, x):
        p = self.kernel_size // 2
        if self.padding_mode == "zeros":
            return x, p  # let the convolution pad: no copy of the input
        return F.pad(x, (p, p, p, p), mode=self.padding_mode), 0

    def forward(self, x):
        self._check_input(x)
        x, padding = self._pad(x)
        per_channel = self.is_frozen_block_diagonal()
        g = self.in_channels if per_channel else self.groups
        if self.single_convolution:
            y = F.conv2d(x, self.fused_weight(g), stride=2, padding=padding, groups=g)
            if self.lowpass_only:
                return y
            C, CL = self.in_channels, self.in_channels * self.L
            S0, re, im = split_groups(y, g, [C // g, CL // g, CL // g])
            B, _, H, W = y.shape
            return torch.cat([S0.reshape(B, C, H, W), self.phase_modulus(re, im)], dim=1)  # S0: (B, g, C/g, H, W)
        S0 = F.conv2d(x, self._grouped_weight([(self.phi_conv, self.phi_pool)], g), stride=2, padding=padding,
                      groups=g)
        return self._by_order(S0, self._band_pass(x, padding, per_channel))

    def _band_pass(self, x, padding, per_channel):
        """S1 of the input channels of order < max_order: (B, P*L, M/2, N/2), P = wavelet_inputs."""
        P = self.wavelet_inputs
        g = P if per_channel else self.psi_groups
        pairs = [(self.psi_real, self.psi_pool), (self.psi_imag, self.psi_pool)]
        x = x[:, :P]  # (B, C, M, N) -> (B, P, M, N): the channels of order < max_order
        full = self.modulus_resolution == "full"  # stride-1 responses, pooled after the modulus
        weight = self._grouped_weight(pairs, g, downsample=not full)
        y = F.conv2d(x, weight, stride=1 if full else 2, padding=padding, groups=g)
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
                f"padding_mode={self.padding_mode!r}, modulus_resolution={self.modulus_resolution!r}{orders}")


def split_groups(y, groups, sizes):
    """Split a grouped convolution's output by filter set, as views: (B, g*sum(sizes), H, W) -> [(B, g, size, H, W)]."""
    B, _, H, W = y.shape
    return y.view(B, groups, sum(sizes), H, W).split(sizes, dim=2)  # (B, g*n, H, W) -> (B, g, n, H, W)


def wavelet_parameter_count(in_channels, L, kernel_size, mixing_horizon=None, lowpass_only=False, wavelet_inputs=None):
    """Weights of phi_conv + psi_real + psi_imag, as docs/DESIGN.md's mixing-horizon table counts them.

    wavelet_inputs: the input channels that get wavelets (max_order); default all.
    """
    C, P = in_channels, in_channels if wavelet_inputs is None else wavelet_inputs
    n = C * (C // mixing_groups(C, mixing_horizon)) * kernel_size ** 2
    if not lowpass_only:
        n += 2 * P * L * (P // mixing_groups(P, mixing_horizon)) * kernel_size ** 2
    return n


def block_parameter_count(in_channels, L, kernel_size, modulus_type="complex_modulus", mixing_horizon=None,
                          lowpass_only=False, wavelet_inputs=None):
    """All parameters of a ScatteringBlock, computed without building it."""
    P = in_channels if wavelet_inputs is None else wavelet_inputs
    n = wavelet_parameter_count(in_channels, L, kernel_size, mixing_horizon, lowpass_only, P)
    n += in_channels * 4  # phi_pool: depthwise 2 x 2
    if not lowpass_only:
        n += P * L * 4  # psi_pool: depthwise 2 x 2
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
