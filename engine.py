"""One training epoch, one evaluation pass, early stopping and the filter-delta metrics.

Functions take explicit arguments (never the scripts' ``args``) and return
dicts of metrics averaged over every sample of every rank.

A frozen feature extractor costs one forward pass: autograd records an
operation only when one of its inputs requires grad, and neither the images
nor frozen filters do, so no graph is built or kept for the blocks.
"""
import time

import torch
import torch.nn.functional as F

from utils import all_reduce_sum, format_seconds


def _to_device(images, labels, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _global_means(loss_sum, correct, count):
    totals = all_reduce_sum(torch.stack([loss_sum, correct, count]).double())
    loss_sum, correct, count = totals.tolist()
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1), int(count)


def train_one_epoch(model, loader, optimizer, device, epoch, amp=False, channels_last=False, print_freq=50,
                    log=None):
    """One pass over ``loader``; returns {'loss', 'acc', 'img_per_s', 'seconds', 'samples'} (global averages).

    amp: bf16 autocast (no loss scaling needed). log: a print-like callable for
    progress every ``print_freq`` batches, or None (non-main ranks).
    """
    model.train()
    device = torch.device(device)
    loss_sum, correct, count = (torch.zeros((), device=device) for _ in range(3))
    start, n_batches = time.perf_counter(), len(loader)
    for i, (images, labels) in enumerate(loader):
        images, labels = _to_device(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
        if log and print_freq and (i + 1) % print_freq == 0:
            elapsed = time.perf_counter() - start
            log(f"epoch {epoch} [{i + 1}/{n_batches}] loss {loss_sum.item() / count.item():.4f} "
                f"acc {100 * correct.item() / count.item():.2f}% {count.item() / elapsed:.0f} img/s "
                f"eta {format_seconds(elapsed / (i + 1) * (n_batches - i - 1))}")
    seconds = time.perf_counter() - start
    loss, acc, samples = _global_means(loss_sum, correct, count)
    return {"loss": loss, "acc": acc, "img_per_s": samples / seconds, "seconds": seconds, "samples": samples}


@torch.no_grad()
def evaluate(model, loader, device, amp=False, channels_last=False):
    """Loss and top-1 accuracy over ``loader``; returns {'loss', 'acc', 'samples', 'seconds'} (global)."""
    model.eval()
    device = torch.device(device)
    loss_sum, correct, count = (torch.zeros((), device=device) for _ in range(3))
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    loss, acc, samples = _global_means(loss_sum, correct, count)
    return {"loss": loss, "acc": acc, "samples": samples, "seconds": time.perf_counter() - start}


class EarlyStopping:
    """Stop when validation accuracy has not improved for ``patience`` epochs."""

    def __init__(self, patience):
        self.patience, self.best, self.best_epoch, self.bad_epochs = patience, float("-inf"), 0, 0

    def step(self, value, epoch):
        """Record an epoch's validation accuracy; True when it is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self):
        return self.bad_epochs >= self.patience

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


def filter_deltas(initial, current):
    """How far the filters moved: ||W - W0||_2 and ||W - W0||_2 / ||W0||_2 over all of them together.

    initial, current: {name: tensor} as ScatteringNet.wavelet_weights returns them.
    """
    delta_sq = sum(float((current[k] - initial[k]).pow(2).sum()) for k in initial)
    init_sq = sum(float(initial[k].pow(2).sum()) for k in initial)
    l2 = delta_sq ** 0.5
    return {"filter_delta_l2": l2, "filter_delta_relative": l2 / init_sq ** 0.5 if init_sq else 0.0}
