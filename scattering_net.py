"""ScatteringNet: J stacked ScatteringBlocks, BatchNorm, optional global pooling, linear classifier.

    python scattering_net.py --n-blocks 5 --L 6 --in-spatial 224 --nb-classes 1000 --global-avg-pool --lowpass-last
    # prints the per-block table and parameter counts without allocating any weight

Block j maps (B, C_j, S/2^j, S/2^j) to (B, C_j(1+L), S/2^(j+1), S/2^(j+1)), so
C_j = C_0 (1+L)^j: the cascade computes scattering paths of order <= J at
scale 2^J (SPEC.md, "Connection to Fast Wavelet Transform and Scattering").
"""
import argparse
from dataclasses import dataclass

import numpy as np
import torch.nn as nn

from utils import die
from wavelet_kernels import check_kernel_size
from spatial_scattering import (MODULUS_TYPES, PADDING_MODES, ScatteringBlock, block_parameter_count,
                                filter_movement, mixing_groups, wavelet_parameter_count)


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

    def describe(self):
        mixing = "dense" if self.groups == 1 else f"grouped ({self.groups} groups of {self.in_channels // self.groups})"
        path = ", low-pass only" if self.lowpass_only else ""
        return (f"block {self.index}: {self.in_channels:,} -> {self.out_channels:,} channels, "
                f"{self.in_spatial}x{self.in_spatial} -> {self.out_spatial}x{self.out_spatial}, "
                f"{self.params:,} params ({self.wavelet_params:,} wavelet), {mixing}{path}")


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def plan_blocks(n_blocks, in_channels, in_spatial, L=8, kernel_size=7, modulus_type="complex_modulus",
                mixing_horizon=None, lowpass_last=False, padding_mode="zeros"):
    """Per-block plans of a ScatteringNet configuration; ValueError if it is impossible.

    Each block halves the resolution, rounding down like a 2 x 2 stride-2
    pooling (224 -> 112 -> 56 -> 28 -> 14 -> 7 -> 3 for SPEC.md's 6-block
    ImageNet run), so every block needs at least 2 x 2 input; 'reflect'
    padding also needs more input pixels than the kernel's half-width.
    """
    for name, value in (("n_blocks", n_blocks), ("in_channels", in_channels), ("in_spatial", in_spatial), ("L", L)):
        _positive_int(name, value)
    check_kernel_size(kernel_size)
    smallest = in_spatial // 2 ** (n_blocks - 1)  # the last block's input size
    if smallest < 2:
        raise ValueError(f"in_spatial={in_spatial} is too small for n_blocks={n_blocks}: the last block would get "
                         f"{smallest}x{smallest} input (each block halves the resolution, rounding down)")
    if padding_mode == "reflect" and smallest <= kernel_size // 2:
        raise ValueError(f"padding_mode='reflect' needs every block's input larger than kernel_size // 2 = "
                         f"{kernel_size // 2}, but the last block gets {smallest}x{smallest}")
    if modulus_type not in MODULUS_TYPES:
        raise ValueError(f"modulus_type must be one of {MODULUS_TYPES}, got {modulus_type!r}")
    plans, channels, spatial = [], in_channels, in_spatial
    for j in range(n_blocks):
        lowpass_only = lowpass_last and j == n_blocks - 1
        out = channels if lowpass_only else channels * (1 + L)
        plans.append(BlockPlan(
            j, channels, out, spatial, spatial // 2, mixing_groups(channels, mixing_horizon), lowpass_only,
            wavelet_parameter_count(channels, L, kernel_size, mixing_horizon, lowpass_only),
            block_parameter_count(channels, L, kernel_size, modulus_type, mixing_horizon, lowpass_only)))
        channels, spatial = out, spatial // 2
    return plans


def count_parameters(n_blocks, in_channels, in_spatial, nb_classes, L=8, kernel_size=7,
                     modulus_type="complex_modulus", mixing_horizon=None, global_avg_pool=False,
                     lowpass_last=False, padding_mode="zeros"):
    """Parameter counts of a configuration, computed analytically (no weight is allocated).

    Returns a dict: ``blocks`` (list of BlockPlan), ``classifier_channels``,
    ``classifier_spatial``, ``classifier_in``, ``n_params_classifier``
    (Linear), ``n_params_head`` (BatchNorm + Linear), ``n_params_extractor``,
    ``n_params_total``.
    """
    _positive_int("nb_classes", nb_classes)
    blocks = plan_blocks(n_blocks, in_channels, in_spatial, L, kernel_size, modulus_type, mixing_horizon,
                         lowpass_last, padding_mode)
    channels = blocks[-1].out_channels
    spatial = 1 if global_avg_pool else blocks[-1].out_spatial
    classifier_in = channels * spatial * spatial
    linear = classifier_in * nb_classes + nb_classes
    head = linear + 2 * channels  # BatchNorm2d: weight and bias per channel
    extractor = sum(b.params for b in blocks)
    return {"blocks": blocks, "classifier_channels": channels, "classifier_spatial": spatial,
            "classifier_in": classifier_in, "n_params_classifier": linear, "n_params_head": head,
            "n_params_extractor": extractor, "n_params_total": extractor + head}


def describe_plan(plan):
    """The start-up table of a configuration (count_parameters' dict): one line per block, classifier, total."""
    return [b.describe() for b in plan["blocks"]] + [
        f"classifier: {plan['classifier_channels']:,} channels x {plan['classifier_spatial']}x"
        f"{plan['classifier_spatial']} = {plan['classifier_in']:,} inputs, {plan['n_params_classifier']:,} params",
        f"total: {plan['n_params_total']:,} params ({plan['n_params_extractor']:,} extractor)"]


class ScatteringNet(nn.Module):
    """Stacked scattering blocks followed by BatchNorm2d, optional AdaptiveAvgPool2d(1), Flatten, Linear.

    ``features(x)`` is the last block's output; ``extractor_parameters()``
    and ``head_parameters()`` split the parameters for two-phase training.
    """

    def __init__(self, n_blocks, in_channels, in_spatial, nb_classes, L=8, kernel_size=7, learnable=True,
                 modulus_type="complex_modulus", mixing_horizon=None, global_avg_pool=False, lowpass_last=False,
                 padding_mode="zeros"):
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.plan = count_parameters(n_blocks, in_channels, in_spatial, nb_classes, L, kernel_size, modulus_type,
                                     mixing_horizon, global_avg_pool, lowpass_last, padding_mode)
        self.in_channels, self.in_spatial = in_channels, in_spatial
        self.blocks = nn.Sequential(*[
            ScatteringBlock(b.in_channels, L, kernel_size, modulus_type, learnable, mixing_horizon, b.lowpass_only,
                            padding_mode) for b in self.plan["blocks"]])
        channels = self.plan["classifier_channels"]
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1) if global_avg_pool else nn.Identity()
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(self.plan["classifier_in"], nb_classes)

    def features(self, x):
        """Scattering coefficients: (B, C_0, S, S) -> (B, C_J, S/2^J, S/2^J)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.in_spatial,) * 2:
            raise ValueError(f"ScatteringNet expects input of shape (B, {self.in_channels}, {self.in_spatial}, "
                             f"{self.in_spatial}), got {tuple(x.shape)}")
        return self.blocks(x)

    def head(self, features):
        """Logits from scattering coefficients: BN, optional pooling, flatten, linear."""
        return self.classifier(self.flatten(self.pool(self.bn(features))))

    def forward(self, x):
        return self.head(self.features(x))

    def extractor_parameters(self):
        return self.blocks.parameters()

    def head_parameters(self):
        return [*self.bn.parameters(), *self.classifier.parameters()]

    def filter_movement(self, fft_size=64):
        """Per block with wavelets: how far they moved from their Morlet init (spatial_scattering.filter_movement).

        Returns one dict per block: ``relative_l2``, ``frequency_shift`` (rad/sample)
        and ``angle_shift_deg``, each the mean over orientations of its absolute
        value, and ``orientations``, the per-orientation rows.
        """
        summary = []
        for j, block in enumerate(self.blocks):
            if block.lowpass_only:
                continue
            rows = filter_movement(block, fft_size)
            angle_shift = [abs((r["peak_angle_deg"] - r["init_angle_deg"] + 180) % 360 - 180) for r in rows]
            summary.append({"block": j, "relative_l2": float(np.mean([r["relative_l2"] for r in rows])),
                            "frequency_shift": float(np.mean([abs(r["peak_frequency"] - r["init_frequency"])
                                                              for r in rows])),
                            "angle_shift_deg": float(np.mean(angle_shift)), "orientations": rows})
        return summary

    def describe(self):
        """One line per block, then the head and the totals (used by the scripts' start-up log)."""
        p = self.plan
        lines = [b.describe() for b in p["blocks"]]
        pooled = ", global average pool" if p["classifier_spatial"] == 1 else ""
        lines.append(f"head: BatchNorm2d({p['classifier_channels']:,}){pooled} -> Linear({p['classifier_in']:,} -> "
                     f"{self.classifier.out_features}), {p['n_params_head']:,} params")
        trainable = sum(q.numel() for q in self.parameters() if q.requires_grad)
        lines.append(f"total: {p['n_params_total']:,} params ({p['n_params_extractor']:,} extractor, "
                     f"{trainable:,} trainable)")
        return lines


def get_args_parser():
    parser = argparse.ArgumentParser(description="Print a ScatteringNet's per-block table without building it.")
    parser.add_argument("--n-blocks", type=int, default=2, help="stacked blocks (default: %(default)s)")
    parser.add_argument("--in-channels", type=int, default=3, help="input channels (default: %(default)s)")
    parser.add_argument("--in-spatial", type=int, default=32, help="input height = width (default: %(default)s)")
    parser.add_argument("--nb-classes", type=int, default=10, help="classes (default: %(default)s)")
    parser.add_argument("--L", type=int, default=8, help="orientations (default: %(default)s)")
    parser.add_argument("--kernel-size", type=int, default=7, help="odd kernel size (default: %(default)s)")
    parser.add_argument("--modulus-type", default="complex_modulus", choices=MODULUS_TYPES,
                        help="(default: %(default)s)")
    parser.add_argument("--mixing-horizon", type=int, default=None, help="(default: dense)")
    parser.add_argument("--global-avg-pool", action="store_true", help="pool to 1x1 before the classifier")
    parser.add_argument("--lowpass-last", action="store_true", help="last block keeps only its low-pass path")
    parser.add_argument("--padding-mode", default="zeros", choices=PADDING_MODES, help="border handling")
    return parser


def main(args):
    try:
        plan = count_parameters(args.n_blocks, args.in_channels, args.in_spatial, args.nb_classes, args.L,
                                args.kernel_size, args.modulus_type, args.mixing_horizon, args.global_avg_pool,
                                args.lowpass_last, args.padding_mode)
    except ValueError as e:
        die(e)
    print("\n".join(describe_plan(plan)))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
