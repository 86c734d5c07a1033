"""The GPU path, checked in one command: tests, speed, training throughput, a real run, multi-GPU.

    make gpu-check                      # = python gpu_check.py: about 8 minutes on one H100
    python gpu_check.py --quick         # the same code in a small form: what CI runs on CPU (~1 minute)

Writes <out>/gpu_check.json and <out>/gpu_check.md (default out: runs/gpu-check-<timestamp>):

1. the CUDA-marked tests (pytest -m cuda);
2. benchmark.py's speed table on the device: ours (fixed per-channel, dense, phase_relu) against
   kymatio and pytorch_wavelets where installed, CIFAR and ImageNet sizes, forward and
   forward+backward, peak memory;
3. training throughput of Phase A (frozen blocks) and Phase B (everything) on CIFAR-shaped
   synthetic data, batch 512: DataLoader fp32 -> fast path -> + bf16 -> + channels_last ->
   + torch.compile, images/s, and the Phase B step's achieved TFLOP/s against the card's bf16 peak;
   then whole training steps of learnt Morlet, the WRN-16-8 head on scattering and the CNN alone
   (benchmark.py --steps: fp32, bf16, channels_last; the Morlet filters' share of a step);
4. train.py on full Fashion-MNIST (2 blocks, L=8, phase_relu, 15 + 15 epochs): wall time per
   phase and accuracies;
5. where several GPUs are visible, the same run under torchrun on all of them (NCCL).

Without a GPU it runs in --quick form on the CPU (small sizes, synthetic data) and exits 0.
"""
import argparse
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import torch

import benchmark
import data
from engine import train_one_epoch
from scattering_net import ModelConfig, ScatteringNet
from utils import die, write_json

ROOT = os.path.dirname(os.path.abspath(__file__))
# Dense bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name() (vendor data sheets).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}
# Full size and --quick size of the steps.
SIZES = {"full": {"images": 50_000, "batch": 512, "steps": 60, "cases": ["cifar", "imagenet2"], "batches": [128],
                  "step_models": list(benchmark.STEP_MODELS),
                  "train": ["--dataset", "fashion-mnist", "--epochs", "15"]},
         "quick": {"images": 1_024, "batch": 64, "steps": 3, "cases": ["cifar"], "batches": [8],
                   "step_models": ["learnt Morlet + linear", "WRN-16-2 alone"],
                   "train": ["--dataset", "synthetic", "--train-size", "400", "--n-blocks", "1", "--L", "2",
                             "--epochs", "1", "--global-batch-size", "50"]}}
# The training-throughput ladder: each row adds one speed feature to the one before.
LADDER = [("DataLoader, fp32", dict(fast_path=False)), ("fast path, fp32", dict()), ("+ bf16", dict(amp=True)),
          ("+ channels_last", dict(amp=True, channels_last=True)),
          ("+ torch.compile", dict(amp=True, channels_last=True, compile=True))]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (the form CI runs; forced without a GPU)")
    parser.add_argument("--out", default=None, help="output folder; default: runs/gpu-check-<timestamp>")
    parser.add_argument("--data-dir", default="./data", help="where Fashion-MNIST is looked for (step 4)")
    return parser


# ----------------------------------------------------------------------------- the steps

def cuda_tests():
    """Step 1: pytest -m cuda; the counts from its summary line."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", summary)}
    return {"ok": proc.returncode in (0, 5), "summary": summary, **counts}  # 5: nothing collected


def speed_table(device, size):
    """Step 2: benchmark.py's speed rows for the systems installed here."""
    systems = ["ours"] + [s for s, module in (("kymatio", "kymatio"), ("pytorch_wavelets", "pytorch_wavelets"))
                          if importlib.util.find_spec(module)]
    args = argparse.Namespace(cases=size["cases"], systems=systems, batch_sizes=size["batches"],
                              min_seconds=0.0 if size is SIZES["quick"] else 1.0)
    return benchmark.speed_rows(args, device)


def new_mode_steps(device, size):
    """Step 3, second part: benchmark.py --steps for the models of this form (its training batch; --quick: its
    speed-table batch, small enough for a CPU)."""
    quick = size is SIZES["quick"]
    args = argparse.Namespace(batch_sizes=size["batches"] if quick else [size["batch"]], min_seconds=0.0 if quick else 1.0)
    return benchmark.step_rows(args, device, {name: benchmark.STEP_MODELS[name] for name in size["step_models"]})


def synthetic_loader(images, labels, batch, device, fast_path):
    info = data.INFO["synthetic"]
    if fast_path:
        return data.TensorLoader(images, labels, info, batch, device, True)
    dataset = data.TensorImageDataset(images, labels, data.torchvision_transforms(info, train=True))
    return data.EpochDataLoader(dataset, batch, True, min(8, os.cpu_count() or 1), device)


def throughput(device, size):
    """Step 3: images/s of Phase A and Phase B steps along LADDER, and Phase B's TFLOP/s."""
    images, labels = data.synthetic_textures(size["images"], seed=0)
    rows = []
    for label, flags in LADDER:
        if flags.get("amp") and device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported():
            rows.append({"setting": label, "skipped": "no bf16 on this CPU"})
            continue
        loader = synthetic_loader(images, labels, size["batch"], device, flags.get("fast_path", True))
        row = {"setting": label}
        for phase, learnable in (("phase_a", False), ("phase_b", True)):
            model = ScatteringNet(ModelConfig(modulus_type="phase_relu", learnable=learnable)).to(device)
            if flags.get("channels_last"):
                model = model.to(memory_format=torch.channels_last)
            runner = torch.compile(model, dynamic=False) if flags.get("compile") else model  # as runner.wrap_model
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            stats = train_one_epoch(runner, limited(loader, size["steps"]), optimizer, device, 1, flags.get("amp", False),
                                    flags.get("channels_last", False), print_freq=0)
            row[f"{phase}_img_per_s"] = stats["img_per_s"]
        rows.append(row)
    return {"rows": rows, **phase_b_flops(device, size)}


class limited:
    """The first n batches of a loader (after one batch of warm-up, which is not timed)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __iter__(self):
        batches = iter(self.loader)
        next(batches)  # warm-up: kernels chosen, workers started, compile traced
        for i, batch in enumerate(batches):
            if i == self.n:
                return
            yield batch


def phase_b_flops(device, size):
    """FLOPs of one Phase B training step (FlopCounterMode), its bf16 TFLOP/s and the share of the card's peak."""
    from torch.utils.flop_counter import FlopCounterMode
    model = ScatteringNet(ModelConfig(modulus_type="phase_relu")).to(device, memory_format=torch.channels_last)
    x = torch.randn(size["batch"], 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (size["batch"],), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with FlopCounterMode(display=False) as counter:
        step()
    seconds, _ = benchmark.time_calls(step, device, 0.0 if size is SIZES["quick"] else 1.0)
    tflops = counter.get_total_flops() / seconds / 1e12
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()),
                None)
    return {"phase_b_step_gflop": counter.get_total_flops() / 1e9, "phase_b_tflops": tflops,
            "bf16_peak_tflops": peak, "share_of_peak": tflops / peak if peak else None}


def train_run(device, size, out, data_dir, n_gpus=1):
    """Steps 4 and 5: train.py (under torchrun on n_gpus when > 1); wall time per phase and accuracies."""
    save_dir = os.path.join(out, f"train_{n_gpus}gpu")
    flags = [*size["train"], "--modulus-type", "phase_relu", "--seed", "0", "--print-freq", "0", "--device",
             device.type, "--data-dir", data_dir, "--save-dir", save_dir]
    launcher = [sys.executable] if n_gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={n_gpus}"]
    start = time.perf_counter()
    proc = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *flags], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        return {"ok": False, "exit_code": proc.returncode, "error": proc.stderr.strip()[-300:], "wall_seconds": wall}
    results = json.load(open(glob.glob(os.path.join(save_dir, "results_*.json"))[0]))["results"]
    keys = ("head_acc", "finetune_acc", "phase_a_seconds", "phase_b_seconds", "actual_train_samples")
    return {"ok": True, "gpus": n_gpus, "wall_seconds": wall, **{k: results[k] for k in keys}}


# ----------------------------------------------------------------------------- report

def markdown(report):
    lines = [f"# gpu_check on {report['device_name']} ({report['form']} form), {report['date']}", "",
             f"1. CUDA tests: {report['cuda_tests']['summary']}", "", "2. Speed (features only):", "",
             benchmark.markdown_table(report["speed"]), "", "3. Training throughput (images/s):", "",
             "| setting | Phase A | Phase B |", "|---|---:|---:|"]
    for r in report["throughput"]["rows"]:
        cells = [r["skipped"], ""] if "skipped" in r else [f"{r['phase_a_img_per_s']:,.0f}", f"{r['phase_b_img_per_s']:,.0f}"]
        lines.append(f"| {r['setting']} | {cells[0]} | {cells[1]} |")
    t = report["throughput"]
    share = f", {100 * t['share_of_peak']:.1f} % of the {t['bf16_peak_tflops']:.0f} TFLOP/s bf16 peak" \
        if t["share_of_peak"] else ""
    lines += ["", f"Phase B step: {t['phase_b_step_gflop']:.1f} GFLOP, {t['phase_b_tflops']:.2f} TFLOP/s{share}.", "",
              "Training steps of the new modes (images/s):", "", "| model | bf16 | channels_last | images/s | "
              "Morlet filters' share |", "|---|---|---|---:|---:|"]
    for r in report["steps"]:
        share = f"{100 * r['morlet_share']:.1f} %" if "morlet_share" in r else "-"
        lines.append(f"| {r['model']} | {r['amp']} | {r['channels_last']} | {r['img_per_s']:,.0f} | {share} |")
    lines.append("")
    for run in report["train_runs"]:
        lines.append(f"4/5. train.py: {json.dumps(run)}")
    return "\n".join(lines) + "\n"


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    form = "quick" if args.quick or device.type == "cpu" else "full"
    out = args.out or os.path.join("runs", f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(os.path.join(out, "gpu_check.json")):
        die(f"{out}/gpu_check.json already exists: choose another --out (nothing was overwritten)")
    os.makedirs(out, exist_ok=True)
    size = SIZES[form]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"gpu_check ({form} form) on {name}, writing to {out}", flush=True)
    report = {"form": form, "device_name": name, "date": time.strftime("%Y-%m-%d"), "machine": benchmark.machine()}
    report["cuda_tests"] = cuda_tests()
    print(f"1. CUDA tests: {report['cuda_tests']['summary']}", flush=True)
    report["speed"] = speed_table(device, size)
    report["throughput"] = throughput(device, size)
    print(f"3. Phase B step: {report['throughput']['phase_b_tflops']:.3f} TFLOP/s", flush=True)
    report["steps"] = new_mode_steps(device, size)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    report["train_runs"] = [train_run(device, size, out, args.data_dir)]
    if gpus > 1:
        report["train_runs"].append(train_run(device, size, out, args.data_dir, gpus))
    write_json(os.path.join(out, "gpu_check.json"), report)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    failed = not report["cuda_tests"]["ok"] or not all(r["ok"] for r in report["train_runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
