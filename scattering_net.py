"""ScatteringNet: J stacked ScatteringBlocks, BatchNorm, optional global pooling, linear classifier.

    python scattering_net.py --n-blocks 5 --L 6 --in-spatial 224 --nb-classes 1000 --global-avg-pool --lowpass-last
    # prints the per-block table and parameter counts without allocating any weight
    python scattering_net.py --n-blocks 6 --L 6 --in-spatial 224 --nb-classes 1000 --max-order 2 --memory-batch 128
    # also builds it on the CPU and measures what one training step at that batch holds

Block j maps (B, C_j, S/2^j, S/2^j) to (B, C_j(1+L), S/2^(j+1), S/2^(j+1)), so
C_j = C_0 (1+L)^j: the cascade computes scattering paths of order <= J at
scale 2^J (docs/DESIGN.md, "The network").
With --max-order M only the paths with at most M band-pass filters are
computed: sum_{k<=M} binom(J, k) L^k per input channel, 1 + JL + L^2 J(J-1)/2
for M=2 (kymatio's Scattering2D(J, L, max_order=2) path count).
"""
import argparse
from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from wavelet_kernels import check_kernel_size
from spatial_scattering import (LEARN_MODES, MODULUS_RESOLUTIONS, MODULUS_TYPES, PADDING_MODES, ScatteringBlock,
                                block_parameter_count, filter_movement, mixing_groups, morlet_horizon, output_orders,
                                wavelet_inputs, wavelet_parameter_count)

# fp32 weight + gradient + AdamW's two moments, per trainable parameter.
TRAINING_BYTES_PER_PARAM = 16
# How the block weights start: the scattering transform's filters, or PyTorch's default initialisation.
INITS = ("wavelet", "random")
# The classifier on the last block's output: BN + linear, or a wide residual network (WideResNet).
HEADS = ("linear", "cnn")
# A wide residual network's stages (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016): the
# stem's width, each stage's width per unit of --head-width, each stage's stride, and the depth it
# counts besides its residual blocks (stem conv, final linear and the two shortcut convs: depth = 6n + 4).
WRN_STEM_WIDTH = 16
WRN_STAGE_WIDTHS = (16, 32, 64)
WRN_STAGE_STRIDES = (1, 2, 2)
WRN_EXTRA_DEPTH = 4
WRN_CONVS_PER_BLOCK = 2


@dataclass(frozen=True)
class BlockPlan:
    """Shape and size of one block, known before any weight exists."""
    index: int
    in_channels: int
    out_channels: int
    in_spatial: int
    out_spatial: int
    groups: int
    lowpass_only: bool
    wavelet_params: int
    params: int
    in_orders: tuple = ()
    wavelet_inputs: int = 0
    learn: str = "taps"

    def describe(self):
        mixing = "dense" if self.groups == 1 else f"grouped ({self.groups} groups of {self.in_channels // self.groups})"
        path = ", low-pass only" if self.lowpass_only else ""
        if not self.lowpass_only and self.wavelet_inputs < self.in_channels:  # the top order present is the limit
            path = f", wavelets on the {self.wavelet_inputs:,} channels of order < {len(self.in_orders) - 1}"
        return (f"block {self.index}: {self.in_channels:,} -> {self.out_channels:,} channels, "
                f"{self.in_spatial}x{self.in_spatial} -> {self.out_spatial}x{self.out_spatial}, "
                f"{self.params:,} params ({self.wavelet_params:,} {'Morlet' if self.learn == 'morlet' else 'wavelet'}), "
                f"{mixing}{path}")


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything that defines a ScatteringNet's shape and initialisation (keyword-only: no swapped booleans).

    Checkpoints carry ``dataclasses.asdict(config)`` under ``model_config``;
    ``from_dict`` also reads the plain flag dicts of older checkpoints.
    """
    n_blocks: int = 2
    in_channels: int = 3
    in_spatial: int = 32
    nb_classes: int = 10
    L: int = 8
    kernel_size: int = 7
    modulus_type: str = "complex_modulus"
    mixing_horizon: Optional[int] = None
    global_avg_pool: bool = False
    lowpass_last: bool = False
    padding_mode: str = "zeros"
    learnable: bool = True
    init: str = "wavelet"
    max_order: Optional[int] = None
    modulus_resolution: str = "half"
    learn: str = "taps"
    head: str = "linear"
    head_depth: int = 16
    head_width: int = 8

    @classmethod
    def from_args(cls, args, info=None):
        """From parsed flags (``add_model_args``); the input shape from a ``data.DatasetInfo`` when given."""
        flags = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        if info is not None:
            flags.update(in_channels=info.in_channels, in_spatial=info.spatial, nb_classes=info.nb_classes)
        return cls(**flags)

    @classmethod
    def from_dict(cls, saved, info=None):
        """From ``asdict(config)``, or from an older checkpoint's flag dict plus its dataset's ``info``."""
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in saved.items() if k in known})
        if info is not None and "in_spatial" not in saved:
            config = replace(config, in_channels=info.in_channels, in_spatial=info.spatial, nb_classes=info.nb_classes)
        return config


def add_model_args(parser):
    """The model flags, shared by train.py, quick_check.py and this script (defaults from ModelConfig)."""
    d = ModelConfig()
    group = parser.add_argument_group("model")
    group.add_argument("--n-blocks", type=int, default=d.n_blocks, help="stacked scattering blocks")
    group.add_argument("--L", type=int, default=d.L, help="wavelet orientations per block")
    group.add_argument("--kernel-size", type=int, default=d.kernel_size, help="wavelet kernel size (odd)")
    group.add_argument("--modulus-type", default=d.modulus_type, choices=MODULUS_TYPES)
    group.add_argument("--mixing-horizon", type=int, default=d.mixing_horizon,
                       help="max input channels per wavelet filter (grouped convolutions); default: dense")
    group.add_argument("--global-avg-pool", action="store_true", help="average-pool to 1x1 before the classifier")
    group.add_argument("--lowpass-last", action="store_true", help="the last block outputs only its low-pass path")
    group.add_argument("--padding-mode", default=d.padding_mode, choices=PADDING_MODES,
                       help="border handling of the filters")
    group.add_argument("--max-order", type=int, default=d.max_order,
                       help="compute only the paths with at most this many band-pass filters (channels sorted by "
                            "order); default: every order")
    group.add_argument("--modulus-resolution", default=d.modulus_resolution, choices=MODULUS_RESOLUTIONS,
                       help="half: 2x2 mean, then modulus (the default); subsample: modulus of the response at every "
                            "other pixel (the pooling starts as one tap); full: modulus at full resolution, then mean")
    group.add_argument("--init", default=d.init, choices=INITS,
                       help="wavelet: Morlet filters, average pooling, phase collapse 1/sqrt(2); random: PyTorch's "
                            "default (Kaiming-uniform) init of every block weight, same shapes")
    group.add_argument("--random-init", dest="init", action="store_const", const="random",
                       help="the same as --init random")
    group.add_argument("--head", default=d.head, choices=HEADS,
                       help="linear: BatchNorm + linear classifier; cnn: a wide residual network (pre-activation, "
                            "three stages) on the scattering coefficients, or on the image with --n-blocks 0 (the "
                            "CNN alone, trained with --joint)")
    group.add_argument("--head-depth", type=int, default=d.head_depth, help="--head cnn: depth 6n + 4 (WRN-d-k)")
    group.add_argument("--head-width", type=int, default=d.head_width, help="--head cnn: widening factor k")
    group.add_argument("--learn", default=d.learn, choices=LEARN_MODES,
                       help="taps: every K x K filter tap trains; morlet: each orientation's Morlet parameters "
                            "(orientation, frequency, width, slant) and the low-pass width train, the filters stay "
                            "Morlet wavelets, one per input channel (mixing horizon 1), the poolings fixed averages; "
                            "with --init random the parameters are drawn over the ranges in docs/DESIGN.md")
    return group


def plan_blocks(config):
    """Per-block plans of a ModelConfig; ValueError if it is impossible.

    Each block halves the resolution, rounding down like a 2 x 2 stride-2
    pooling (224 -> 112 -> 56 -> 28 -> 14 -> 7 -> 3 for the 6-block ImageNet
    ImageNet run), so every block needs at least 2 x 2 input; 'reflect'
    padding also needs more input pixels than the kernel's half-width.
    """
    c = config
    if c.head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {c.head!r}")
    if c.n_blocks == 0 and c.head == "cnn":  # the CNN alone: no scattering block
        return []
    if not isinstance(c.n_blocks, int) or c.n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive integer (or 0 with head='cnn': the CNN alone), got {c.n_blocks!r}")
    for name in ("in_channels", "in_spatial", "L"):
        _positive_int(name, getattr(c, name))
    check_kernel_size(c.kernel_size)
    smallest = c.in_spatial // 2 ** (c.n_blocks - 1)  # the last block's input size
    if smallest < 2:
        raise ValueError(f"in_spatial={c.in_spatial} is too small for n_blocks={c.n_blocks}: the last block would "
                         f"get {smallest}x{smallest} input (each block halves the resolution, rounding down)")
    if c.padding_mode == "reflect" and smallest <= c.kernel_size // 2:
        raise ValueError(f"padding_mode='reflect' needs every block's input larger than kernel_size // 2 = "
                         f"{c.kernel_size // 2}, but the last block gets {smallest}x{smallest}")
    if c.modulus_type not in MODULUS_TYPES:
        raise ValueError(f"modulus_type must be one of {MODULUS_TYPES}, got {c.modulus_type!r}")
    if c.padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {c.padding_mode!r}")
    if c.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {c.init!r}")
    if c.learn not in LEARN_MODES:
        raise ValueError(f"learn must be one of {LEARN_MODES}, got {c.learn!r}")
    horizon = morlet_horizon(c.learn, c.mixing_horizon)
    if c.modulus_resolution not in MODULUS_RESOLUTIONS:
        raise ValueError(f"modulus_resolution must be one of {MODULUS_RESOLUTIONS}, got {c.modulus_resolution!r}")
    if c.max_order is not None:
        _positive_int("max_order", c.max_order)
    plans, orders, spatial = [], (c.in_channels,), c.in_spatial
    for j in range(c.n_blocks):
        lowpass_only = c.lowpass_last and j == c.n_blocks - 1
        channels, out = sum(orders), output_orders(orders, c.L, c.max_order, lowpass_only)
        P = channels if lowpass_only else wavelet_inputs(orders, c.max_order)
        groups = mixing_groups(channels, horizon)
        mixing_groups(P, horizon, f"block {j}'s {P} input channels of order < {c.max_order}")
        plans.append(BlockPlan(
            j, channels, sum(out), spatial, spatial // 2, groups, lowpass_only,
            wavelet_parameter_count(channels, c.L, c.kernel_size, horizon, lowpass_only, P, c.learn),
            block_parameter_count(channels, c.L, c.kernel_size, c.modulus_type, horizon, lowpass_only, P, c.learn),
            orders, P, c.learn))
        orders, spatial = out, spatial // 2
    return plans


def wrn_blocks_per_stage(depth):
    """Residual blocks per stage of a WRN of ``depth`` = 6n + 4; ValueError otherwise."""
    n, rest = divmod(depth - WRN_EXTRA_DEPTH, len(WRN_STAGE_WIDTHS) * WRN_CONVS_PER_BLOCK) if isinstance(depth, int) \
        else (0, 1)
    if n < 1 or rest:
        raise ValueError(f"head_depth must be 6n + 4 for n >= 1 (10, 16, 22, 28, ...), got {depth!r}")
    return n


def wrn_parameter_count(in_channels, nb_classes, depth, width):
    """Parameters of WideResNet(in_channels, nb_classes, depth, width), computed without building it."""
    n, count = wrn_blocks_per_stage(depth), 2 * in_channels + 9 * in_channels * WRN_STEM_WIDTH  # input BN, stem
    channels = WRN_STEM_WIDTH
    for stage_width, stride in zip(WRN_STAGE_WIDTHS, WRN_STAGE_STRIDES):
        out = stage_width * width
        for b in range(n):
            count += 2 * channels + 9 * channels * out + 2 * out + 9 * out * out  # BN, conv, BN, conv
            if channels != out or (b == 0 and stride != 1):
                count += channels * out  # 1 x 1 shortcut
            channels = out
    return count + 2 * channels + channels * nb_classes + nb_classes  # final BN, linear


def count_parameters(config):
    """Parameter counts of a ModelConfig, computed analytically (no weight is allocated).

    Returns a dict: ``blocks`` (list of BlockPlan), ``classifier_channels``,
    ``classifier_spatial``, ``classifier_in``, ``n_params_classifier``
    (Linear; the whole WRN for head='cnn'), ``n_params_head`` (BatchNorm +
    Linear, or the WRN), ``n_params_extractor``, ``n_params_total``,
    ``nb_classes``, ``head``.
    """
    _positive_int("nb_classes", config.nb_classes)
    blocks = plan_blocks(config)
    channels = blocks[-1].out_channels if blocks else config.in_channels
    extractor = sum(b.params for b in blocks)
    if config.head == "cnn":
        for name in ("in_channels", "in_spatial", "head_width"):
            _positive_int(name, getattr(config, name))
        n_head = wrn_parameter_count(channels, config.nb_classes, config.head_depth, config.head_width)
        return {"blocks": blocks, "classifier_channels": channels, "classifier_spatial": None,
                "classifier_in": channels, "n_params_classifier": n_head, "n_params_head": n_head,
                "n_params_extractor": extractor, "n_params_total": extractor + n_head,
                "nb_classes": config.nb_classes, "head": config.head}
    spatial = 1 if config.global_avg_pool else blocks[-1].out_spatial
    classifier_in = channels * spatial * spatial
    linear = classifier_in * config.nb_classes + config.nb_classes
    head = linear + 2 * channels  # BatchNorm2d: weight and bias per channel
    return {"blocks": blocks, "classifier_channels": channels, "classifier_spatial": spatial,
            "classifier_in": classifier_in, "n_params_classifier": linear, "n_params_head": head,
            "n_params_extractor": extractor, "n_params_total": extractor + head, "nb_classes": config.nb_classes,
            "head": config.head}


def describe_plan(plan, trainable=None):
    """The start-up table of a configuration (count_parameters' dict): one line per block, head, total."""
    trains = f", {trainable:,} trainable" if trainable is not None else ""
    if plan["head"] == "cnn":
        source = "the scattering coefficients" if plan["blocks"] else "the image (no scattering block)"
        head = (f"head: wide residual network on {source} ({plan['classifier_channels']:,} channels), "
                f"{plan['n_params_head']:,} params")
    else:
        pooled = ", global average pool" if plan["classifier_spatial"] == 1 else ""
        head = (f"head: BatchNorm2d({plan['classifier_channels']:,}){pooled} -> Linear({plan['classifier_in']:,} -> "
                f"{plan['nb_classes']}), {plan['n_params_head']:,} params")
    return [b.describe() for b in plan["blocks"]] + [
        head, f"total: {plan['n_params_total']:,} params ({plan['n_params_extractor']:,} extractor{trains})"]


class WideBlock(nn.Module):
    """Pre-activation residual block of a WRN: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, plus the input (a 1 x 1
    strided convolution of it when the width or the resolution changes)."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(in_channels), nn.BatchNorm2d(out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if in_channels != out_channels or stride != 1 else None)

    def forward(self, x):
        a = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(a))))
        return y + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis, BMVC 2016) on (B, C, H, W): input BatchNorm, a 3 x 3 stem to
    WRN_STEM_WIDTH channels, three stages of (depth - 4) / 6 WideBlocks at WRN_STAGE_WIDTHS x width and strides
    WRN_STAGE_STRIDES, BN-ReLU, global average pooling, linear. On scattering coefficients it is the hybrid
    network of Oyallon et al. ("Scattering Networks for Hybrid Representation Learning", PAMI 2018); on the
    image (no block), the CNN alone. WRN-16-8 on RGB images has 10,961,376 parameters: the paper's
    10,961,370 (its "11.0M") and the input BatchNorm's 6."""

    def __init__(self, in_channels, nb_classes, depth=16, width=8):
        super().__init__()
        n = wrn_blocks_per_stage(depth)
        self.bn_in = nn.BatchNorm2d(in_channels)
        self.stem = nn.Conv2d(in_channels, WRN_STEM_WIDTH, 3, padding=1, bias=False)
        stages, channels = [], WRN_STEM_WIDTH
        for stage_width, stride in zip(WRN_STAGE_WIDTHS, WRN_STAGE_STRIDES):
            for b in range(n):
                stages.append(WideBlock(channels, stage_width * width, stride if b == 0 else 1))
                channels = stage_width * width
        self.stages = nn.Sequential(*stages)
        self.bn_out = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels, nb_classes)
        for m in self.modules():  # He et al. (ICCV 2015) for the ReLU convolutions, as the WRN paper
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        y = torch.relu(self.bn_out(self.stages(self.stem(self.bn_in(x)))))  # (B, 64k, H/4, W/4)
        return self.classifier(y.mean((-2, -1)))  # global average pool: (B, 64k, h, w) -> (B, 64k)


class ScatteringNet(nn.Module):
    """Stacked scattering blocks followed by BatchNorm2d, optional AdaptiveAvgPool2d(1), Flatten, Linear
    (head='linear'), or by a WideResNet (head='cnn'; with n_blocks=0, the WideResNet alone on the image).

    Built from a ModelConfig, ``ScatteringNet(ModelConfig(n_blocks=3, ...))``,
    or from the same fields as keywords, ``ScatteringNet(n_blocks=3, ...)``
    (one path: the keywords make the ModelConfig, with its defaults).
    ``features(x)`` is the last block's output; ``extractor_parameters()``
    and ``head_parameters()`` split the parameters for two-phase training.
    """

    def __init__(self, config=None, **fields):
        super().__init__()
        if config is None:
            config = ModelConfig(**fields)
        elif fields:
            raise TypeError(f"ScatteringNet takes a ModelConfig or keywords, not both (got {sorted(fields)} too)")
        if not isinstance(config, ModelConfig):
            raise TypeError(f"ScatteringNet takes a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.plan = count_parameters(config)
        self.blocks = nn.Sequential(*[
            ScatteringBlock(b.in_channels, config.L, config.kernel_size, config.modulus_type, config.learnable,
                            config.mixing_horizon, b.lowpass_only, config.padding_mode, config.max_order,
                            b.in_orders if config.max_order is not None else None, config.modulus_resolution,
                            config.learn)
            for b in self.plan["blocks"]])
        if config.init == "random":  # the random-init control: same shapes, no wavelet in them
            for block in self.blocks:
                block.reset_random()
        channels = self.plan["classifier_channels"]
        if config.head == "cnn":
            self.cnn = WideResNet(channels, config.nb_classes, config.head_depth, config.head_width)
        else:
            self.bn = nn.BatchNorm2d(channels)
            self.pool = nn.AdaptiveAvgPool2d(1) if config.global_avg_pool else nn.Identity()
            self.flatten = nn.Flatten()
            self.classifier = nn.Linear(self.plan["classifier_in"], config.nb_classes)

    def features(self, x):
        """Scattering coefficients: (B, C_0, S, S) -> (B, C_J, S/2^J, S/2^J)."""
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels or tuple(x.shape[-2:]) != (c.in_spatial,) * 2:
            raise ValueError(f"ScatteringNet expects input of shape (B, {c.in_channels}, {c.in_spatial}, "
                             f"{c.in_spatial}), got {tuple(x.shape)}")
        return self.blocks(x)

    def head(self, features):
        """Logits from scattering coefficients: BN, optional pooling, flatten, linear (or the WRN, head='cnn')."""
        if self.config.head == "cnn":
            return self.cnn(features)
        return self.classifier(self.flatten(self.pool(self.bn(features))))

    def forward(self, x):
        return self.head(self.features(x))

    def extractor_parameters(self):
        return self.blocks.parameters()

    def head_parameters(self):
        if self.config.head == "cnn":
            return list(self.cnn.parameters())
        return [*self.bn.parameters(), *self.classifier.parameters()]

    def wavelet_weights(self):
        """The K x K filter weights of every block (phi_conv, psi_real, psi_imag), detached float32 copies on CPU.

        Keys are state-dict names; the pooling and phase-collapse weights are
        not filters and are left out (engine.filter_deltas measures these).
        """
        weights = {}
        for j, block in enumerate(self.blocks):
            for name, conv in block.filter_convs().items():
                weights[f"blocks.{j}.{name}.weight"] = conv.weight.detach().float().cpu().clone()
        return weights

    def morlet_parameters(self):
        """The MorletBank parameters of every block (learn='morlet'; empty for 'taps')."""
        return [p for block in self.blocks if block.learn == "morlet" for p in block.morlet.parameters()]

    def morlet_table(self):
        """Per block, its Morlet parameters in natural units (MorletBank.parameter_table); None for 'taps'."""
        if self.config.learn != "morlet":
            return None
        return [{"block": j, **block.morlet.parameter_table()} for j, block in enumerate(self.blocks)]

    def filter_movement(self):
        """Per block with wavelets: how far they moved from their Morlet init (spatial_scattering.filter_movement).

        Returns one dict per block: ``relative_l2``, ``frequency_shift`` (rad/sample)
        and ``angle_shift_deg``, each the mean over orientations of its absolute
        value, and ``orientations``, the per-orientation rows.
        """
        summary = []
        for j, block in enumerate(self.blocks):
            if block.lowpass_only:
                continue
            rows = filter_movement(block)
            angle_shift = [abs((r["peak_angle_deg"] - r["init_angle_deg"] + 180) % 360 - 180) for r in rows]
            summary.append({"block": j, "relative_l2": float(np.mean([r["relative_l2"] for r in rows])),
                            "frequency_shift": float(np.mean([abs(r["peak_frequency"] - r["init_frequency"])
                                                              for r in rows])),
                            "angle_shift_deg": float(np.mean(angle_shift)), "orientations": rows})
        return summary

    def describe(self):
        """The start-up table (describe_plan) with the count of parameters that train now."""
        return describe_plan(self.plan, sum(q.numel() for q in self.parameters() if q.requires_grad))


def training_memory(config, batch_size):
    """What one fp32 training step of every parameter holds, measured on the CPU.

    Returns bytes: ``optimizer`` (weights, gradients and AdamW moments,
    TRAINING_BYTES_PER_PARAM each) and ``activations``: the tensors autograd
    saves for the backward pass (counted once per storage, through
    torch.autograd.graph.saved_tensors_hooks), measured at batch 1 and 2 and
    extrapolated to ``batch_size`` (per image, plus what does not grow with
    the batch: the fused kernels of each block). The backward pass allocates
    gradient buffers on top, at most about one block's activations at a time.
    """
    model = ScatteringNet(replace(config, learnable=True))
    one, two = (_saved_bytes(model, b) for b in (1, 2))
    params = sum(p.numel() for p in model.parameters())
    return {"optimizer": params * TRAINING_BYTES_PER_PARAM,
            "activations": (two - one) * batch_size + (2 * one - two)}


def _saved_bytes(model, batch_size):
    """Bytes of the distinct storages autograd saves for backward in one forward pass at ``batch_size``."""
    c = model.config
    x = torch.randn(batch_size, c.in_channels, c.in_spatial, c.in_spatial)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    for t in (x, *model.parameters()):  # the batch is the loader's, the weights are counted with the optimizer
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def get_args_parser():
    parser = argparse.ArgumentParser(description="Print a ScatteringNet's per-block table without building it.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ModelConfig()
    shape = parser.add_argument_group("input")
    shape.add_argument("--in-channels", type=int, default=d.in_channels, help="input channels")
    shape.add_argument("--in-spatial", type=int, default=d.in_spatial, help="input height = width")
    shape.add_argument("--nb-classes", type=int, default=d.nb_classes, help="classes")
    add_model_args(parser)
    parser.add_argument("--memory-batch", type=int, default=None, metavar="B",
                        help="also build the model on the CPU and measure a training step's memory at batch B")
    return parser


def main(args):
    from utils import die  # the command line's error line; the model itself needs only the three model modules
    try:
        config = ModelConfig.from_args(args)
        plan = count_parameters(config)
    except ValueError as e:
        die(e)
    print("\n".join(describe_plan(plan)))
    if args.memory_batch is not None:
        if args.memory_batch < 1:
            die(f"--memory-batch must be >= 1, got {args.memory_batch}")
        memory = training_memory(config, args.memory_batch)
        gib = {k: v / 2 ** 30 for k, v in memory.items()}
        print(f"training memory at batch {args.memory_batch} (fp32, every weight trained): "
              f"{gib['optimizer']:,.2f} GiB weights, gradients and AdamW state + {gib['activations']:,.2f} GiB "
              f"saved for backward = {sum(gib.values()):,.2f} GiB")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
