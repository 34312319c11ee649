"""The learning-rate schedule of a fine-tuning run, and the checks that say when a run is set up to go nowhere.

Schedule (the official LLaMA-Adapter v1 recipe's shape): lr = blr * effective_batch / 256 unless given, linear
warmup, then half-cycle cosine to min_lr. The checks (issue 16): a schedule that is all or mostly warmup, a peak
learning rate that the batch scaling made tiny, and a loss that has not fallen after a quarter of the schedule each
print a warning naming the likely cause and the option to change.
"""
from __future__ import annotations

import math

# Below this peak learning rate the adapter's prompts barely move in a short run: the default recipe's rate is
# 5e-2 (docs/recipe.md), the official 9e-3 at batch 256; blr scaling gives 1.4e-4 at batch 4.
TINY_LR = 1e-3


def resolve_lr(lr: float | None, blr: float, effective_batch: int) -> float:
    """The absolute learning rate: ``lr`` when given, else ``blr * effective_batch / 256``."""
    if lr is not None:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be > 0 and finite, got {lr}")
        return float(lr)
    if not (blr > 0 and math.isfinite(blr)):
        raise ValueError(f"blr must be > 0 and finite, got {blr}")
    return blr * effective_batch / 256


def total_steps(n_rows: int, effective_batch: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a schedule: max_steps, else epochs x the whole steps of an epoch (the rows that do not
    fill a step are dropped: batching.Batches), at least 1."""
    return max_steps or max(1, round(epochs * (n_rows // effective_batch)))


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warmup ``base_lr * (step + 1) / warmup_steps`` for step < warmup_steps (no step runs at lr 0, the
    last warmup step runs at base_lr), then half-cycle cosine from base_lr towards min_lr:
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2`` with ``p = (step - warmup_steps) / (total_steps -
    warmup_steps)``; steps at or past total_steps get min_lr.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    p = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def schedule_warnings(*, base_lr: float, lr_given: bool, blr: float, effective_batch: int, total_steps: int,
                      warmup_steps: int) -> list[str]:
    """What is wrong with a schedule before it runs: all or most of it warmup, or a tiny peak learning rate."""
    out = []
    if warmup_steps >= total_steps:
        out.append(f"the whole schedule ({total_steps} steps) is warmup ({warmup_steps} steps): the learning rate "
                   "never reaches its peak and never decays. Shorten it (--warmup-steps, e.g. "
                   f"{max(1, total_steps // 10)}) or train longer (--epochs, --max-steps)")
    elif warmup_steps > total_steps / 2:
        out.append(f"{warmup_steps} of the {total_steps} steps are warmup: most of the run is spent below the peak "
                   f"learning rate. Shorten it (--warmup-steps, e.g. {max(1, total_steps // 10)})")
    if not lr_given and base_lr < TINY_LR:
        out.append(f"the peak learning rate {base_lr:.3g} is blr {blr:g} x effective batch {effective_batch} / 256: "
                   "the official recipe's scaling, made for batches of 64 and more, leaves small batches almost "
                   "no step size. Give it directly (--lr, e.g. 2e-2 to 5e-2) or use a larger batch (--blr scales "
                   "it too)")
    return out


class LossProgress:
    """Watches the training loss and says, once, when it has not fallen: after `share` of the schedule (and at
    least `min_steps` steps), the mean loss of the latest `window` steps against that of the first `window`."""

    def __init__(self, total_steps: int, share: float = 0.25, min_steps: int = 20, min_drop: float = 0.02):
        self.check_at = max(min_steps, math.ceil(share * total_steps))
        self.window = max(5, self.check_at // 5)
        self.min_drop = min_drop
        self.losses: list[float] = []
        self.warned = False

    def update(self, loss: float, lr: float) -> str | None:
        """Record one step's loss; a warning message the first time the loss is found not falling, else None."""
        if math.isfinite(loss):
            self.losses.append(loss)
        if self.warned or len(self.losses) < self.check_at or self.check_at < 2 * self.window:
            return None
        first = sum(self.losses[:self.window]) / self.window
        latest = sum(self.losses[-self.window:]) / self.window
        if latest > first * (1 - self.min_drop):
            self.warned = True
            return (f"the loss has not fallen after {len(self.losses)} steps (mean of the first {self.window}: "
                    f"{first:.4f}, of the last {self.window}: {latest:.4f}) at learning rate {lr:.3g}: too low a "
                    "learning rate (--lr) or too little warmup progress is the usual cause; too high a rate can "
                    "also stall it")
        return None
