"""Batches for training: collate (right padding, packed rows' positions and segments), the deterministic epoch
order, and ``Batches``, the resumable iteration over optimizer steps.

One epoch is a deterministic function of (seed, epoch): a shuffle, then, when grouping by length, a sort inside
windows of ``group_window`` batches (so one batch holds similar lengths and little compute goes to padding) and a
shuffle of the batch order. The order is drawn over the rows of whole optimizer steps (effective batch); each step
is cut into accumulation micro-batches and per-process slices (what DistributedSampler does), so 1 or N processes,
with or without accumulation, see the same rows per step when the effective batch is the same. The position
(epoch, index) is saved in checkpoints; loading it resumes the exact order.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from collections.abc import Iterator, Sequence

import torch

from .data import IGNORE_INDEX, DataChangedError, Example, TokenizedDataset, data_fingerprint


def collate(rows: Sequence[Example], pad_id: int, *, pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Right-pad rows into a batch: input_ids, labels (-100 on padding), attention_mask (1 = real token), and,
    when the rows are packed, position_ids (padding positions continue counting; they are masked anyway) and
    segment_ids (the index of each token's example in its row, padding one more segment; the model keeps the
    examples of a row from attending to each other)."""
    if not rows:
        raise ValueError("collate: rows is empty")
    width = max(len(r) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    packed = any(r.position_ids is not None for r in rows)
    position_ids = torch.arange(width).repeat(n, 1) if packed else None
    segment_ids = torch.zeros((n, width), dtype=torch.long) if packed else None
    for i, r in enumerate(rows):
        t = len(r)
        input_ids[i, :t] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, :t] = torch.tensor(r.labels, dtype=torch.long)
        attention_mask[i, :t] = 1
        if packed and r.position_ids is not None:
            position_ids[i, :t] = torch.tensor(r.position_ids, dtype=torch.long)
            position_ids[i, t:] = torch.arange(r.position_ids[-1] + 1, r.position_ids[-1] + 1 + width - t)
            segment_ids[i, :t] = torch.cumsum(position_ids[i, :t] == 0, 0) - 1  # a new example at each position 0
        if packed:
            segment_ids[i, t:] = int(segment_ids[i, t - 1]) + 1 if t else 0
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        batch["position_ids"] = position_ids
        batch["segment_ids"] = segment_ids
    return batch


def epoch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, *,
                group_by_length: bool = True, group_window: int = 16) -> list[list[int]]:
    """The batches of one epoch: lists of ``batch_size`` row indices (an incomplete last batch is dropped).
    A pure function of its arguments, so any process and any resumed run computes the same order.

    With ``group_by_length``: shuffle, sort by length (longest first) inside windows of ``group_window``
    batches, cut into batches, shuffle the batch order. Rows of one batch then have similar lengths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    rng = random.Random(int(seed) * 1_000_003 + int(epoch))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * max(1, group_window)
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


@dataclass
class StepBatch:
    """The data of one optimizer step on this process: ``grad_accum_steps`` local micro-batches, and the number
    of loss tokens in the whole step (all micro-batches, all processes), which normalises the loss."""
    epoch: int
    index: int  # optimizer steps of this epoch done before this one
    micro_batches: list[dict[str, torch.Tensor]]
    n_loss_tokens_global: int
    n_tokens_local: int  # real (non-padding) tokens this process runs, for tokens/s


class Batches:
    """Deterministic, resumable, sharded iteration over optimizer steps.

    The order is drawn over *step batches* of ``effective_batch = micro_batch_size * world_size *
    grad_accum_steps`` rows (``epoch_order``); a step batch is cut into ``grad_accum_steps`` micro-batches of
    ``micro_batch_size * world_size`` rows, and process ``rank`` takes its slice of each. So the rows of every
    optimizer step depend only on (seed, epoch, effective_batch): 1 process x 4 rows, 1 x 2 rows x 2
    accumulation steps and 2 processes x 2 rows train on the same data. Every epoch has the same number of
    steps (``steps_per_epoch``); the rows that do not fill a step are dropped (different rows each epoch).
    """

    def __init__(self, dataset: TokenizedDataset, micro_batch_size: int, *, grad_accum_steps: int = 1,
                 world_size: int = 1, rank: int = 0, seed: int = 0, group_by_length: bool = True,
                 group_window: int = 16, pad_to_multiple_of: int | None = None):
        for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps),
                            ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.group_by_length = group_by_length
        self.group_window = group_window
        self.pad_to_multiple_of = pad_to_multiple_of
        self.effective_batch = micro_batch_size * world_size * grad_accum_steps
        self._lengths = dataset.lengths
        self._loss_tokens = [e.n_loss_tokens for e in dataset.examples]
        self.steps_per_epoch = len(dataset) // self.effective_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data set has {len(dataset)} rows, fewer than one optimizer step needs "
                f"(micro_batch_size {micro_batch_size} x world_size {world_size} x grad_accum_steps "
                f"{grad_accum_steps} = {self.effective_batch})")
        self.epoch = 0
        self.index = 0
        self._order_cache: tuple[int, list[list[int]]] | None = None
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """``data_fingerprint`` of the data set (computed once), saved in the state so a resume can tell when the
        data changed."""
        if self._fingerprint is None:
            self._fingerprint = data_fingerprint(self.dataset)
        return self._fingerprint

    def _order(self, epoch: int) -> list[list[int]]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(self._lengths, self.effective_batch, self.seed, epoch,
                                                    group_by_length=self.group_by_length,
                                                    group_window=self.group_window))
        return self._order_cache[1]

    def step_rows(self, epoch: int, index: int) -> list[list[int]]:
        """This process's rows of each micro-batch of step ``index`` of ``epoch``."""
        rows = self._order(epoch)[index]
        micro = self.micro_batch_size * self.world_size
        b = self.micro_batch_size
        return [rows[m * micro + self.rank * b: m * micro + (self.rank + 1) * b]
                for m in range(self.grad_accum_steps)]

    def next_step(self) -> StepBatch:
        """The next optimizer step's data; advances the position."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        n_global = sum(self._loss_tokens[i] for i in self._order(self.epoch)[self.index])
        micro, n_local = [], 0
        collate_rows = getattr(self.dataset, "collate", collate)  # a data set may add tensors (e.g. image features)
        for local in self.step_rows(self.epoch, self.index):
            n_local += sum(self._lengths[i] for i in local)
            micro.append(collate_rows([self.dataset[i] for i in local], self.dataset.pad_id,
                                 pad_to_multiple_of=self.pad_to_multiple_of))
        step = StepBatch(self.epoch, self.index, micro, n_global, n_local)
        self.index += 1
        return step

    def __iter__(self) -> Iterator[StepBatch]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "effective_batch": self.effective_batch, "group_by_length": self.group_by_length,
                "group_window": self.group_window, "n_rows": len(self.dataset), "data_sha256": self.fingerprint}

    def load_state_dict(self, state: dict, *, allow_data_change: bool = False) -> None:
        """Resume at a saved position; the order's inputs must match, else the order would differ silently. The
        rows' content must match too (DataChangedError) unless ``allow_data_change``; a state saved before the
        content hash was recorded is not checked."""
        mine = self.state_dict()
        for key in ("seed", "effective_batch", "group_by_length", "group_window", "n_rows"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"cannot resume the data order: {key} was {state[key]} in the checkpoint, "
                                 f"is {mine[key]} now")
        saved = state.get("data_sha256")
        if saved is not None and saved != mine["data_sha256"] and not allow_data_change:
            raise DataChangedError(
                f"the training data changed since the checkpoint was written: the same {mine['n_rows']} rows, but "
                f"their content hash is {mine['data_sha256'][:16]} now, {saved[:16]} in the checkpoint")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


