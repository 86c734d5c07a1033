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

from utils import all_reduce_min_positive, all_reduce_sum, format_seconds


def _to_device(images, labels, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


# Top-k accuracy reported beside top-1 (ImageNet's and CIFAR-100's second number).
TOP_K = 5
# The loss is checked for NaN/inf every this many steps and at the end of an epoch: each check
# waits for the device (and, under DDP, all ranks), so checking every step would stall a GPU's queue.
FINITE_CHECK_EVERY = 32


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; ``step`` is the first such batch of the epoch (1-based)."""

    def __init__(self, step):
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


def _global_means(loss_sum, correct, count, correct_k=None):
    parts = [loss_sum, correct, count] + ([correct_k] if correct_k is not None else [])
    totals = all_reduce_sum(torch.stack(parts).double()).tolist()
    n = max(totals[2], 1)
    means = {"loss": totals[0] / n, "acc": 100.0 * totals[1] / n, "samples": int(totals[2])}
    if correct_k is not None:
        means["top5"] = 100.0 * totals[3] / n
    return means


def _raise_if_diverged(first_bad):
    """NonFiniteLoss with the earliest bad step of any rank (a collective call: every rank raises together)."""
    step = int(all_reduce_min_positive(first_bad.clone()))
    if step:
        raise NonFiniteLoss(step)


def top_k_correct(logits, labels, k=TOP_K):
    """How many labels are among the k largest logits (k capped at the number of classes)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (B, k)
    return (top == labels[:, None]).any(dim=1).sum()


def train_one_epoch(model, loader, optimizer, device, epoch, amp=False, channels_last=False, print_freq=50,
                    log=None, penalty=None, scheduler=None):
    """One pass over ``loader``; returns {'loss', 'acc', 'img_per_s', 'seconds', 'samples'} (global averages).

    amp: bf16 autocast (no loss scaling needed). log: a print-like callable for
    progress every ``print_freq`` batches, or None (non-main ranks).
    penalty: a callable returning a scalar added to the loss (L2-SP), or None;
    'loss' reports the cross-entropy alone. scheduler: stepped after every
    optimizer step (per-step schedules), or None. Raises NonFiniteLoss, naming
    the first bad step, at the next check after the loss turns NaN or infinite
    (every FINITE_CHECK_EVERY steps and at the epoch's end): the model may have
    stepped on it by then, so the caller keeps its last epoch's checkpoint.
    """
    model.train()
    device = torch.device(device)
    loss_sum, correct, count = (torch.zeros((), device=device) for _ in range(3))
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # first step with a non-finite loss, 0: none
    start, n_batches = time.perf_counter(), len(loader)
    for i, (images, labels) in enumerate(loader):
        images, labels = _to_device(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        objective = loss + penalty() if penalty else loss
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(objective.detach()), i + 1, first_bad)
        if (i + 1) % FINITE_CHECK_EVERY == 0 or i + 1 == n_batches:
            _raise_if_diverged(first_bad)
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        if scheduler:
            scheduler.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
        if log and print_freq and (i + 1) % print_freq == 0:
            elapsed = time.perf_counter() - start
            log(f"epoch {epoch} [{i + 1}/{n_batches}] loss {loss_sum.item() / count.item():.4f} "
                f"acc {100 * correct.item() / count.item():.2f}% {count.item() / elapsed:.0f} img/s "
                f"eta {format_seconds(elapsed / (i + 1) * (n_batches - i - 1))}")
    seconds = time.perf_counter() - start
    means = _global_means(loss_sum, correct, count)
    return {**means, "img_per_s": means["samples"] / seconds, "seconds": seconds}


@torch.no_grad()
def evaluate(model, loader, device, amp=False, channels_last=False):
    """Loss, top-1 and top-5 accuracy over ``loader``; returns {'loss', 'acc', 'top5', 'samples', 'seconds'} (global)."""
    model.eval()
    device = torch.device(device)
    loss_sum, correct, correct_k, count = (torch.zeros((), device=device) for _ in range(4))
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = _to_device(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        correct_k += top_k_correct(logits, labels)
        count += len(labels)
    return {**_global_means(loss_sum, correct, count, correct_k), "seconds": time.perf_counter() - start}


class EarlyStopping:
    """The selected epoch: the best score so far, stopping after ``patience`` epochs without a new best.

    patience None (--select last): no stopping, and the latest epoch is
    always the selected one whatever its score (the fixed-budget protocol).
    """

    def __init__(self, patience):
        self.patience, self.best, self.best_epoch, self.bad_epochs = patience, float("-inf"), 0, 0

    def step(self, value, epoch):
        """Record an epoch's score; True when the epoch becomes the selected one."""
        if self.patience is None or value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self):
        return self.patience is not None and self.bad_epochs >= self.patience

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
