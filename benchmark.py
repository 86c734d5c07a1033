"""Speed and accuracy of ScatteringNet against kymatio and pytorch_wavelets, in one process.

    pip install -r requirements-bench.txt
    python benchmark.py --device cpu --threads 2 --cases cifar --batch-sizes 128
    # 2 CPU cores (BENCHMARKS.md): fixed per-channel ScatteringNet forward ~17x kymatio's throughput
    python benchmark.py --device cpu --threads 2 --training     # quick_check epoch: fast path vs DataLoader
    python benchmark.py --device cpu --threads 2 --compile-gain --batch-sizes 128   # torch.compile, steady state
    python benchmark.py --device cpu --threads 2 --conv-forms --batch-sizes 128     # strided conv: direct or polyphase
    python benchmark.py --device cpu --threads 2 --accuracy     # same head on full Fashion-MNIST, both transforms
    python benchmark.py --device cpu --threads 2 --accuracy --dataset folder --data-dir data/cifar10-sample

Speed rows: images/s and ms per batch (median of repeated calls after warm-up),
peak memory on CUDA, and the ratio of images/s to kymatio's for the same case,
batch and pass. Every system computes scattering features only (no classifier):
ScatteringNet.features, kymatio's Scattering2D(J, shape, L=8), and a cascade of
J pytorch_wavelets ScatLayer (DTCWT, 6 orientations). Results also go to --json.
kymatio computes the paths of order <= 2 (its default max_order=2); the
``-order2`` rows of ScatteringNet compute the same set (--max-order 2), the
others every order up to J.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import data
import quick_check
import runner
from scattering_net import ModelConfig, ScatteringNet, count_parameters
from spatial_scattering import MODULUS_RESOLUTIONS, keep_freed_memory, polyphase_conv
from utils import die, write_json

# (channels, spatial size, J): the shapes of CIFAR-10, Fashion-MNIST and ImageNet.
CASES = {"cifar": (3, 32, 2), "fmnist": (1, 28, 2), "imagenet2": (3, 224, 2), "imagenet4": (3, 224, 4)}
# ScatteringNet configurations (ModelConfig fields beyond the case's shape; the rest are the defaults, K=7).
FIXED = dict(learnable=False, modulus_type="complex_modulus", mixing_horizon=1)
OURS = {"ours-fixed-per-channel": FIXED,
        "ours-fixed-per-channel-order2": dict(FIXED, max_order=2),
        "ours-fixed-subsample": dict(FIXED, modulus_resolution="subsample"),
        "ours-fixed-full-resolution": dict(FIXED, modulus_resolution="full"),
        "ours-dense": dict(learnable=True, modulus_type="complex_modulus"),
        "ours-phase_relu": dict(learnable=True, modulus_type="phase_relu"),
        "ours-morlet": dict(learnable=True, learn="morlet")}
# --steps: whole training steps (forward, loss, backward, AdamW) on a CIFAR batch: ModelConfig fields.
STEP_MODELS = {"learnt Morlet + linear": dict(learn="morlet"),
               "learnt taps + linear (default)": {},
               "fixed Morlet + WRN-16-8": dict(learn="morlet", learnable=False, head="cnn"),
               "learnt Morlet + WRN-16-8": dict(learn="morlet", head="cnn"),
               "WRN-16-2 alone": dict(n_blocks=0, head="cnn", head_width=2)}
# --conv-forms: the stride-2 convolutions of this project's blocks on a CIFAR batch, (channels, spatial size, groups,
# outputs per group); each timed direct (F.conv2d) and polyphase (spatial_scattering.polyphase_conv).
CONV_FORM_SHAPES = {"per channel, block 1": (3, 32, 3, 17), "per channel, block 2": (27, 16, 27, 17),
                    "low-pass alone, block 2": (27, 16, 27, 1), "dense, block 1": (3, 32, 1, 51),
                    "mixing horizon 9, block 2": (27, 16, 3, 153), "dense, block 2": (27, 16, 1, 459)}
# --compile-gain: (ModelConfig fields, what is timed); the whole classifier on a CIFAR batch.
COMPILE_MODELS = {"fixed per-channel": (FIXED, "forward"),
                  "dense": (dict(learnable=True), "training step"),
                  "phase_relu": (dict(learnable=True, modulus_type="phase_relu"), "training step")}
L_ORIENTATIONS = 8
# The yardstick of GFLOP/s (matmul_peak): a MATMUL_SIZE square product in each of these dtypes.
MATMUL_SIZE = 1024  # 2048 gives the same fp32 rate here; bf16 without hardware support takes 2 s a product
PEAK_DTYPES = (torch.float32, torch.bfloat16)
# Also timed as a library user runs it (library_user_measure): the forward pass of this system.
LIBRARY_USER_SYSTEM = "ours-fixed-per-channel"
# A weight tensor beyond this many parameters is not worth timing (the dense 4-block net has billions).
MAX_PARAMS = 50_000_000
# Timing: at least MIN_REPEATS calls and about --min-seconds of them, after WARMUP calls; one call when a
# call takes longer than SLOW_CALL_SECONDS (the big CPU rows).
WARMUP, MIN_REPEATS, MAX_REPEATS, SLOW_CALL_SECONDS = 2, 3, 30, 5.0


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--batch-sizes", default="1,128,512", help="comma-separated")
    parser.add_argument("--systems", default="ours,kymatio,pytorch_wavelets",
                        help="comma-separated: ours, kymatio, pytorch_wavelets")
    parser.add_argument("--training", action="store_true",
                        help="instead: one quick_check.py epoch on Fashion-MNIST, fast path vs DataLoader path")
    parser.add_argument("--steps", action="store_true",
                        help="instead: training steps (forward, backward, AdamW) of learnt Morlet and the CNN heads, "
                             "fp32 / --amp / --channels-last, and the Morlet bank's share of a step")
    parser.add_argument("--conv-forms", action="store_true",
                        help="instead: the blocks' stride-2 convolutions direct and polyphase, forward and backward")
    parser.add_argument("--compile-gain", action="store_true",
                        help="instead: steady-state speed under torch.compile against eager (fixed forward, dense "
                             "and phase_relu training steps)")
    parser.add_argument("--accuracy", action="store_true",
                        help="instead: fixed ScatteringNet vs kymatio, same BN + linear head, full Fashion-MNIST")
    parser.add_argument("--epochs", type=int, default=30, help="--accuracy: epochs for each model")
    parser.add_argument("--dataset", default="fashion-mnist", choices=data.DATASETS, help="--accuracy: the data")
    parser.add_argument("--data-dir", default="./data", help="--accuracy: its folder (as train.py's --data-dir)")
    parser.add_argument("--workers", type=int, default=2, help="--training: DataLoader workers")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="speed: time each row for about this long")
    parser.add_argument("--json", default="benchmark_results.json", help="where to write the rows")
    return parser


# ----------------------------------------------------------------------------- the systems

def kymatio_scattering(J, spatial):
    # kymatio 0.3.0: `import kymatio.torch` also loads the 3-D frontend, which needs SciPy's
    # removed sph_harm; the 2-D torch frontend alone does not.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=J, shape=(spatial, spatial), L=L_ORIENTATIONS)


def dtcwt_cascade(J):
    from pytorch_wavelets import ScatLayer

    return nn.Sequential(*[ScatLayer() for _ in range(J)])


class Features(nn.Module):
    """ScatteringNet.features as a module (no BN, no classifier)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.features(x)


def systems_for(case, names):
    """[(name, build function, learnable)] for one case; builders run lazily (big models are skipped first)."""
    channels, spatial, J = CASES[case]
    systems = []
    if "kymatio" in names:
        systems.append(("kymatio", lambda: kymatio_scattering(J, spatial), False))
    if "pytorch_wavelets" in names:
        systems.append(("pytorch_wavelets", lambda: dtcwt_cascade(J), False))
    if "ours" in names:
        for name in OURS:
            config = ours_config(name, case)
            systems.append((name, lambda c=config: Features(ScatteringNet(c)), config.learnable))
    return systems


def ours_config(name, case):
    channels, spatial, J = CASES[case]
    return ModelConfig(n_blocks=J, in_channels=channels, in_spatial=spatial, L=L_ORIENTATIONS, **OURS[name])


def too_large(name, case):
    if not name.startswith("ours"):
        return None
    n = count_parameters(ours_config(name, case))["n_params_extractor"]
    return f"{n:,} parameters" if n > MAX_PARAMS else None


# ----------------------------------------------------------------------------- timing

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, device, min_seconds):
    """Median seconds of one call of fn (and the number of timed calls)."""
    times = []
    for i in range(WARMUP + MAX_REPEATS):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if i == 0 and elapsed > SLOW_CALL_SECONDS:
            return elapsed, 1
        if i >= WARMUP:
            times.append(elapsed)
            if len(times) >= MIN_REPEATS and sum(times) >= min_seconds:
                break
    return statistics.median(times), len(times)


def measure(module, x, backward, device, min_seconds, peak_flops=None):
    """One row's numbers: ms per batch, images/s, calls, peak CUDA memory (GiB, None on CPU); with
    ``peak_flops``, also the GFLOP/s the call reaches (multiply-adds of the convolutions and products,
    counted by PyTorch's FlopCounterMode; elementwise work is not counted) and their share of it."""
    if backward:
        x = x.detach().requires_grad_(True)  # so that every system back-propagates, learnable or not

        def call():
            module(x).sum().backward()
    else:
        def call():
            with torch.no_grad():
                module(x)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, calls = time_calls(call, device, min_seconds)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    row = {"ms_per_batch": 1000 * seconds, "img_per_s": len(x) / seconds, "calls": calls, "peak_mem_gib": peak}
    if peak_flops:
        # the forward's count, and for the backward one more forward's for the input gradient and, when the
        # module learns, one for the weights' (FlopCounterMode, torch 2.14, counts a grouped convolution's
        # weight gradient once per group: up to 27x too many here)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(x)
        learns = any(p.requires_grad for p in module.parameters())
        row["gflop_per_s"] = counter.get_total_flops() * (1 + backward * (1 + learns)) / seconds / 1e9
        row["peak_gflop_per_s"], row["share_of_peak"] = peak_flops / 1e9, row["gflop_per_s"] * 1e9 / peak_flops
    return row


def matmul_peak(device, dtype, min_seconds):
    """FLOP/s of a large square matrix product: what this device reaches in practice (the yardstick)."""
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype) for _ in range(2))
    seconds, _ = time_calls(lambda: torch.mm(a, b), device, min_seconds)
    return 2 * MATMUL_SIZE ** 3 / seconds


def library_user_measure(case, batch, device, min_seconds):
    """``measure`` of the LIBRARY_USER_SYSTEM forward in a fresh process that only builds the model and calls
    it, with none of this script's set-up: the speed a user's own script gets from ``import scattering_net``."""
    code = ("import json, sys, torch, benchmark\n"
            "case, batch, device, threads, min_seconds = json.loads(sys.argv[1])\n"
            "torch.set_num_threads(threads)\n"
            "channels, spatial, _ = benchmark.CASES[case]\n"
            "module = benchmark.Features(benchmark.ScatteringNet(benchmark.ours_config(benchmark.LIBRARY_USER_SYSTEM,"
            " case))).to(device)\n"
            "x = torch.randn(batch, channels, spatial, spatial, device=device)\n"
            "print(json.dumps(benchmark.measure(module, x, False, torch.device(device), min_seconds)))\n")
    settings = json.dumps([case, batch, str(device), torch.get_num_threads(), min_seconds])
    done = subprocess.run([sys.executable, "-c", code, settings], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode != 0:
        raise RuntimeError(f"the fresh process failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout)


def speed_rows(args, device):
    peaks = {str(dtype).split(".")[1]: matmul_peak(device, dtype, args.min_seconds) for dtype in PEAK_DTYPES}
    print("matrix product, the device's practical peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s"
                                                                       for k, v in peaks.items()), flush=True)
    rows = []
    for case in args.cases:
        channels, spatial, _ = CASES[case]
        for name, build, learnable in systems_for(case, args.systems):
            reason = too_large(name, case)
            module = None if reason else build().to(device)
            for batch in args.batch_sizes:
                for backward in (False, True):
                    row = {"case": case, "system": name, "batch": batch,
                           "pass": "forward+backward" if backward else "forward"}
                    if reason:
                        rows.append({**row, "skipped": reason})
                        continue
                    x = torch.randn(batch, channels, spatial, spatial, device=device)
                    try:
                        rows.append({**row, **measure(module, x, backward, device, args.min_seconds,
                                                      peaks["float32"] if name.startswith("ours") else None)})
                        if name == LIBRARY_USER_SYSTEM and not backward:
                            print(format_row(rows[-1]), flush=True)
                            rows.append({**row, "system": f"{name} (library user)",
                                         **library_user_measure(case, batch, device, args.min_seconds)})
                    except (torch.OutOfMemoryError, RuntimeError) as e:  # CPU allocation failures are RuntimeError
                        rows.append({**row, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"})
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    print(format_row(rows[-1]), flush=True)
    add_ratios(rows)
    return rows


def add_ratios(rows):
    """ratio_to_kymatio: images/s over kymatio's for the same case, batch and pass."""
    kymatio = {(r["case"], r["batch"], r["pass"]): r["img_per_s"] for r in rows
               if r["system"] == "kymatio" and "img_per_s" in r}
    for r in rows:
        reference = kymatio.get((r["case"], r["batch"], r["pass"]))
        r["ratio_to_kymatio"] = r["img_per_s"] / reference if reference and "img_per_s" in r else None


def rate(img_per_s):
    return f"{img_per_s:,.0f}" if img_per_s >= 100 else f"{img_per_s:.3g}"


def format_row(r):
    if "skipped" in r:
        return f"{r['case']:<10} {r['system']:<24} {r['batch']:>5} {r['pass']:<17} skipped: {r['skipped']}"
    peak = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "-"
    return (f"{r['case']:<10} {r['system']:<24} {r['batch']:>5} {r['pass']:<17} {rate(r['img_per_s']):>10} img/s "
            f"{r['ms_per_batch']:>10.2f} ms  {peak}  {flop_rate(r)}")


def flop_rate(r):
    return f"{r['gflop_per_s']:.0f} GFLOP/s ({100 * r['share_of_peak']:.0f} %)" if "gflop_per_s" in r else "-"


def markdown_table(rows):
    lines = ["| case | system | batch | pass | images/s | ms/batch | peak mem | vs kymatio | GFLOP/s (of matmul peak) |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | {r['system']} | {r['batch']} | {r['pass']} | skipped: {r['skipped']} "
                         f"| | | | |")
            continue
        peak = f"{r['peak_mem_gib']:.2f} GiB" if r["peak_mem_gib"] is not None else "-"
        ratio = f"{r['ratio_to_kymatio']:.2f}x" if r["ratio_to_kymatio"] else "-"
        lines.append(f"| {r['case']} | {r['system']} | {r['batch']} | {r['pass']} | {rate(r['img_per_s'])} | "
                     f"{r['ms_per_batch']:.2f} | {peak} | {ratio} | {flop_rate(r)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training side

def quick_check_args(*flags, dataset="fashion-mnist", data_dir="./data"):
    return quick_check.get_args_parser().parse_args(["--dataset", dataset, "--data-dir", data_dir, "--seed", "0",
                                                     *flags])


def training_rows(args, device):
    """One quick_check.py epoch (fixed 2-block L=8, dense) with each data path; train images/s and seconds."""
    rows = []
    for label, flags in (("fast path", ["--fast-path"]), ("DataLoader", ["--no-fast-path", "--workers",
                                                                          str(args.workers)])):
        with tempfile.TemporaryDirectory() as save_dir:
            run = quick_check.main(quick_check_args("--epochs", "1", "--print-freq", "0", "--device", str(device),
                                                    "--save-dir", save_dir, *flags))
        epoch = run["curves"][0]
        rows.append({"data_path": label, "train_img_per_s": epoch["img_per_s"],
                     "train_seconds": 60_000 / epoch["img_per_s"], "epoch_seconds_with_eval": epoch["seconds"]})
        print(f"{label:<11} {epoch['img_per_s']:,.0f} img/s, {rows[-1]['train_seconds']:.1f} s per training epoch")
    print(f"fast path / DataLoader: {rows[0]['train_img_per_s'] / rows[1]['train_img_per_s']:.2f}x")
    return rows



# ----------------------------------------------------------------------------- training steps

def training_step(model, runner, x, y, amp=False):
    """One step as train.py takes it: ``runner`` (the model, or it compiled) forward, cross-entropy,
    backward, AdamW on ``model``'s trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(runner(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def step_rows(args, device, models=None):
    """images/s of whole training steps (``models``, default STEP_MODELS) at the first --batch-sizes, fp32, bf16
    autocast (--amp) and channels_last; for learnt Morlet, how long making its filters takes within a step."""
    batch, rows = args.batch_sizes[0], []
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for name, fields in (models or STEP_MODELS).items():
        for amp, channels_last in ((False, False), (True, False), (False, True)):
            model = ScatteringNet(ModelConfig(**fields)).to(device)
            inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            seconds, calls = time_calls(training_step(model, model, inputs, y, amp), device, args.min_seconds)
            row = {"model": name, "batch": batch, "amp": amp, "channels_last": channels_last,
                   "img_per_s": batch / seconds, "ms_per_step": 1000 * seconds, "calls": calls}
            banks = [b.morlet for b in model.blocks if b.learn == "morlet" and b.morlet.theta.requires_grad]
            if banks:  # each training step makes each block's filters once, and takes their backward
                made, _ = time_calls(lambda: sum(k.sum() for b in banks for k in b.kernels().values()).backward(),
                                     device, args.min_seconds)
                row["morlet_share"] = made / seconds
            rows.append(row)
            share = f", Morlet filters {100 * row['morlet_share']:.1f} % of it" if "morlet_share" in row else ""
            print(f"{name:<32} amp={amp!s:<5} channels_last={channels_last!s:<5} {rate(row['img_per_s']):>8} img/s, "
                  f"{row['ms_per_step']:.1f} ms per step{share}", flush=True)
    return rows

def conv_form_rows(args, device):
    """ms per call of each CONV_FORM_SHAPES convolution (8 x 8 kernel, padding 3) in both forms: forward,
    backward to the input (a frozen block), backward to the input and the weights (a learning one)."""
    batch, rows = args.batch_sizes[0], []
    for name, (channels, spatial, groups, outputs) in CONV_FORM_SHAPES.items():
        x = torch.randn(batch, channels, spatial, spatial, device=device)
        weight = torch.randn(groups * outputs, channels // groups, 8, 8, device=device)
        for grads in ((), ("input",), ("input", "weights")):
            x.requires_grad_("input" in grads)
            weight.requires_grad_("weights" in grads)
            row = {"shape": name, "batch": batch, "pass": "+".join(("forward", *grads))}
            for form, conv in (("direct", lambda: nn.functional.conv2d(x, weight, stride=2, padding=3, groups=groups)),
                               ("polyphase", lambda: polyphase_conv(x, weight, 3, groups))):
                def call():
                    with torch.set_grad_enabled(bool(grads)):
                        y = conv()
                    if grads:
                        y.sum().backward()
                row[f"{form}_ms"] = 1000 * time_calls(call, device, args.min_seconds)[0]
            row["polyphase_speedup"] = row["direct_ms"] / row["polyphase_ms"]
            rows.append(row)
            print(f"{name:<26} {row['pass']:<24} direct {row['direct_ms']:7.2f} ms, polyphase "
                  f"{row['polyphase_ms']:7.2f} ms ({row['polyphase_speedup']:.2f}x)", flush=True)
    return rows


def compile_rows(args, device):
    """Steady-state images/s of COMPILE_MODELS eager and under ``torch.compile(dynamic=False)`` (inductor, as
    train.py --compile), at the first --batch-sizes; the first call (tracing and code generation) apart."""
    batch, rows = args.batch_sizes[0], []
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for name, (fields, kind) in COMPILE_MODELS.items():
        for compiled in (False, True):
            torch._dynamo.reset()
            model = ScatteringNet(ModelConfig(**fields)).to(device)
            runner = torch.compile(model, dynamic=False) if compiled else model
            if kind == "forward":
                def call():
                    with torch.no_grad():
                        runner(x)
            else:
                call = training_step(model, runner, x, y)
            start = time.perf_counter()
            call()
            synchronize(device)
            first = time.perf_counter() - start
            seconds, calls = time_calls(call, device, args.min_seconds)
            rows.append({"model": name, "pass": kind, "compiled": compiled, "batch": batch, "img_per_s": batch / seconds,
                         "ms_per_call": 1000 * seconds, "calls": calls, "first_call_s": first})
        eager, fast = rows[-2]["img_per_s"], rows[-1]["img_per_s"]
        rows[-1]["speedup"] = fast / eager
        print(f"{name:<20} {kind:<14} eager {rate(eager):>7} img/s, compiled {rate(fast):>7} img/s "
              f"({fast / eager:.2f}x; first call {rows[-1]['first_call_s']:.1f} s)", flush=True)
    return rows


# ----------------------------------------------------------------------------- accuracy

class KymatioNet(nn.Module):
    """kymatio's Scattering2D followed by the same head as ScatteringNet (BN over channels, linear)."""

    def __init__(self, J, in_channels, spatial, nb_classes):
        super().__init__()
        self.scattering = kymatio_scattering(J, spatial)
        channels = in_channels * (1 + J * L_ORIENTATIONS + L_ORIENTATIONS ** 2 * J * (J - 1) // 2)
        self.bn = nn.BatchNorm2d(channels)
        self.classifier = nn.Linear(channels * (spatial // 2 ** J) ** 2, nb_classes)

    def forward(self, x):
        S = self.scattering(x)  # (B, C, P, H, W), P scattering paths per input channel
        S = S.flatten(1, 2)  # (B, C, P, H, W) -> (B, C*P, H, W)
        return self.classifier(self.bn(S).flatten(1))


def accuracy_rows(args, device):
    """Every transform frozen, the same head, loop, data, epochs and seed (quick_check.py's training).

    ScatteringNet (2 blocks, L=8, per channel) with each --modulus-resolution
    (half: the design's order, docs/DESIGN.md), and kymatio's Scattering2D(J=2, L=8).
    """
    rows = []
    run_args = quick_check_args("--epochs", str(args.epochs), "--print-freq", "0", "--device", str(device),
                                "--mixing-horizon", "1", "--lr", "5e-3", "--select", "last", dataset=args.dataset,
                                data_dir=args.data_dir)
    env = runner.setup(run_args, run_args.batch_size, lock_save_dir=False)  # it saves to temporary folders
    info = env.data.info
    models = []
    if "ours" in args.systems:
        for resolution in MODULUS_RESOLUTIONS:
            config = ModelConfig.from_args(run_args, info)
            models.append((f"ScatteringNet (fixed, 2 blocks, L=8, --modulus-resolution {resolution})",
                           lambda c=config, r=resolution: runner.build_model(
                               replace(c, modulus_resolution=r), run_args.seed, env.device)))
    if "kymatio" in args.systems:
        models.append(("kymatio Scattering2D(J=2, L=8)", lambda: kymatio_net(run_args, info, env.device)))
    for name, build in models:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as save_dir:
            model = build()
            final, epoch, curves = quick_check.fit_single_phase(name, model, env, run_args, save_dir)
        best = max(r["test_acc"] for r in curves)
        rows.append({"model": name, "test_acc": final, "select": "last", "epochs": len(curves),
                     "best_test_acc_optimistic": best, "seconds": time.perf_counter() - start, "dataset": args.dataset,
                     "head_params": sum(p.numel() for p in model.parameters() if p.requires_grad)})
        print(f"{name}: test accuracy {final:.2f}% at the final epoch {epoch} (best test epoch, optimistic: "
              f"{best:.2f}%), {rows[-1]['seconds']:.0f} s", flush=True)
    for r in rows[1:]:
        print(f"{r['model']} - {rows[0]['model']}: {r['test_acc'] - rows[0]['test_acc']:+.2f} points (final epoch, "
              f"one seed)")
    return rows


def kymatio_net(run_args, info, device):
    torch.manual_seed(run_args.seed)
    return KymatioNet(run_args.n_blocks, info.in_channels, info.spatial, info.nb_classes).to(device)


# ----------------------------------------------------------------------------- main

def parse_list(flag, text, allowed=None, cast=str):
    try:
        values = [cast(v) for v in text.split(",") if v]
    except ValueError:
        die(f"{flag}: expected comma-separated values, got {text!r}")
    bad = [v for v in values if (allowed is not None and v not in allowed) or (cast is int and v < 1)]
    if bad or not values:
        die(f"{flag}: invalid value(s) {bad or text!r}" + (f"; choose from {list(allowed)}" if allowed else ""))
    return values


def machine():
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def check_writable(path):
    """Stop before measuring anything when the results file could not be written afterwards."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        die(f"--json {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        die(f"--json {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        die(f"--json {path}: the folder {folder} is not writable")


def main(args):
    check_writable(args.json)
    args.cases = parse_list("--cases", args.cases, CASES)
    args.systems = parse_list("--systems", args.systems, ("ours", "kymatio", "pytorch_wavelets"))
    args.batch_sizes = parse_list("--batch-sizes", args.batch_sizes, cast=int)
    device = runner.pick_device(args.device, 0)
    if device.type == "cpu":
        keep_freed_memory()  # for every system alike, as a ScatteringBlock does when built
    if args.threads is not None and args.threads < 1:
        die(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 1:
        die(f"--epochs must be >= 1, got {args.epochs}")
    kind = ("accuracy" if args.accuracy else "training" if args.training else "steps" if args.steps else
            "compile" if args.compile_gain else "conv-forms" if args.conv_forms else "speed")
    print(f"benchmark.py {kind} on {device}: {machine()}")
    run = {"speed": speed_rows, "training": training_rows, "steps": step_rows, "compile": compile_rows,
           "conv-forms": conv_form_rows, "accuracy": accuracy_rows}[kind]
    rows = run(args, device)
    if kind == "speed":
        print(markdown_table(rows))
    write_json(args.json, {"kind": kind, "machine": machine(), "rows": rows})
    print(f"rows written to {args.json}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
