"""LLaMA-Adapter fine-tuning loop: optimizer, schedule, accumulation, clipping, AMP, checkpoints, resume, DDP.

Defaults follow the official LLaMA-Adapter v1 recipe (AdamW betas (0.9, 0.95), weight decay 0.02 on prompts
and not on gates, lr = blr * effective_batch / 256 with blr 9e-3, linear warmup for 2 epochs then half-cycle
cosine, stepped every optimizer step); every value is a field of ``TrainConfig``. Those defaults are made for 52K
examples at large batches; `lladapter finetune` fills the options a run does not give from a measured recipe
instead (lladapter_ext.recipe, docs/recipe.md), which ``recipe.train_values`` gives Python callers too.

Loss normalisation: the loss of an optimizer step is the mean over *all* its loss tokens (every micro-batch of
the accumulation, every process). Each micro-batch contributes sum(token losses) / n_tokens_of_the_whole_step, so
the gradient does not depend on how the step is split into micro-batches or processes: 2 processes x micro-batch
2 give the same update as 1 process x micro-batch 4 or 1 process x 2 accumulation steps x micro-batch 2.

Distributed runs (torchrun; data parallel or FSDP2) set up and communicate through lladapter_ext.distributed;
rank 0 writes logs, checkpoints and the plot. Checkpoints, the step log and every other file of the run are
lladapter_ext.checkpoint's (atomic writes, resume with fallback to the newest readable checkpoint). At the end
``out_dir/adapter.safetensors``, the step log ``out_dir/log.jsonl`` and the plot ``out_dir/loss.png`` sit next to
each other.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from collections.abc import Callable

import torch
import torch.distributed as dist

from .adapter import first_non_finite, is_dtensor
from .checkpoint import (ADAPTER_FILE, CHECKPOINT_DIR, CONFIG_FILE, LOG_FILE, PLOT_FILE, STATE_FILE,  # noqa: F401
                         CheckpointCorruptError, CheckpointManager, CheckpointWriteError, atomic_write_bytes,
                         changed_config, clean_stale_temporaries, latest_checkpoint, plot_history, read_log, rng_state,
                         save_adapter_atomic, set_rng_state, truncate_log, writing)
from .batching import Batches
from .data import IGNORE_INDEX, DataChangedError, TokenizedDataset
from .distributed import (all_reduce_step, apply_fsdp, broadcast_adapter, dist_info,  # noqa: F401
                          finish_distributed, init_distributed, scalar)
from .host_heap import keep_freed_heap
from .model import enable_activation_checkpointing  # noqa: F401  (part of this module's API)
from .nn import gemm_route
from .schedule import LossProgress, lr_at, resolve_lr, schedule_warnings, total_steps  # noqa: F401  (API: lr_at,
# resolve_lr)

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _knob(default, help: str):
    return field(default=default, metadata={"help": help})


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_bad_steps`` optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteAdapterError(NonFiniteLossError):
    """An optimizer update left an adapter tensor with NaN or inf values (the learning rate is far too high or
    the run diverged); the run stops before such an adapter is written anywhere."""


@dataclass
class TrainConfig:
    """Every knob of a fine-tuning run (defaults: the official LLaMA-Adapter v1 recipe where it has one). Each
    field's help text is in its metadata; `lladapter finetune` builds its options from these fields."""
    out_dir: str = field(metadata={"help": "output dir: checkpoints, adapter, log.jsonl, loss plot"})
    epochs: float = _knob(5.0, "schedule length in epochs (fractions allowed)")
    max_steps: int | None = _knob(None, "schedule length in optimizer steps (overrides epochs)")
    micro_batch_size: int = _knob(4, "micro-batch rows per process (one forward/backward)")
    grad_accum_steps: int = _knob(1, "micro-batches per optimizer step")
    lr: float | None = _knob(None, "absolute learning rate (default: blr * effective batch / 256)")
    blr: float = _knob(9e-3, "base learning rate")
    min_lr: float = _knob(0.0, "learning rate at the end of the cosine")
    warmup_epochs: float = _knob(2.0, "linear warmup length in epochs")
    warmup_steps: int | None = _knob(None, "warmup in optimizer steps (overrides warmup epochs)")
    weight_decay: float = _knob(0.02, "AdamW weight decay on prompts (and other matrices), never on gates")
    betas: tuple[float, float] = _knob((0.9, 0.95), "AdamW betas")
    adam_eps: float = _knob(1e-8, "AdamW eps")
    clip_grad_norm: float | None = _knob(None, "max global gradient norm (default: no clipping, the official "
                                               "recipe's)")
    precision: str = _knob("fp32", "fp32, or bf16 / fp16 autocast (CUDA only; fp16 uses a GradScaler)")
    activation_checkpointing: bool = _knob(False, "recompute activations in backward (less memory)")
    compile: bool = _knob(False, "torch.compile the training forward and backward: faster steps after a first "
                                 "step that compiles (minutes on a CPU; docs/benchmarks.md); not with fsdp")
    seed: int = _knob(0, "data order and torch RNG seed (the CLI also seeds the adapter's initial values)")
    group_by_length: bool = _knob(True, "batch rows of similar length together")
    save_every: int = _knob(0, "checkpoint every N optimizer steps (0: at the end only)")
    keep_checkpoints: int = _knob(2, "newest checkpoint directories kept")
    max_bad_steps: int = _knob(5, "stop after this many non-finite steps in a row")
    resume: bool = _knob(False, "continue from the newest checkpoint in the output dir")
    progress: bool = _knob(True, "progress bar on rank 0")
    plot: bool = _knob(True, "loss/lr PNG at the end")
    fsdp: bool = _knob(False, "with torchrun: shard base weights and adapter over the processes (FSDP2)")
    allow_data_change: bool = _knob(False, "with resume: continue even though the training data's content differs "
                                           "from the checkpoint's (otherwise refused)")
    sources: dict = field(default_factory=dict, metadata={"help": "where a field's value came from, by field name "
                                                                  "(e.g. 'recipe default', '--lr'), for the printed "
                                                                  "schedule"})

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        for name in ("micro_batch_size", "grad_accum_steps", "max_bad_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        _check_number("epochs", self.epochs, low=0.0, open_low=self.max_steps is None)
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 or None, got {self.warmup_steps}")
        if self.lr is not None:
            _check_number("lr", self.lr, low=0.0, open_low=True)
        _check_number("blr", self.blr, low=0.0, open_low=True)
        _check_number("min_lr", self.min_lr, low=0.0)
        _check_number("warmup_epochs", self.warmup_epochs, low=0.0)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_number("adam_eps", self.adam_eps, low=0.0, open_low=True)
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas!r}")
        for i, b in enumerate(self.betas):
            _check_number(f"betas[{i}]", b, low=0.0, high=1.0, open_high=True)
        if self.clip_grad_norm is not None:
            _check_number("clip_grad_norm", self.clip_grad_norm, low=0.0, open_low=True, what="or None")
        if self.fsdp and self.compile:
            raise ValueError("fsdp=True with compile=True is not supported (the sharded model is not compiled); "
                             "train sharded without compile, or compile without fsdp")
        if self.fsdp and self.precision == "fp16":
            raise ValueError("fsdp=True with precision='fp16' is not supported (the fp16 GradScaler does not "
                             "handle sharded gradients); use precision='bf16'")
        self.betas = tuple(self.betas)

    # fields that may change between a run and its resumption without changing the result
    _RESUME_FREE = ("out_dir", "resume", "progress", "plot", "save_every", "keep_checkpoints", "max_bad_steps",
                    "allow_data_change", "sources")


def _check_number(name: str, value, *, low: float | None = None, high: float | None = None, open_low: bool = False,
                  open_high: bool = False, what: str = "") -> None:
    """Raise ValueError unless ``value`` is a finite real number in the range (naming ``name`` and the range)."""
    rng = []
    if low is not None:
        rng.append(f"{'>' if open_low else '>='} {low:g}")
    if high is not None:
        rng.append(f"{'<' if open_high else '<='} {high:g}")
    want = f"a finite number{' ' + ' and '.join(rng) if rng else ''}{' ' + what if what else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Schedule and optimizer


def adapter_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: "decay" (prompts and other matrices) and "no_decay" (gates,
    vectors). Checks that the trainable set is exactly ``model.adapter_parameters()``: a trainable tensor that
    save_adapter does not write would make checkpoints incomplete."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adapter_ids = {id(p) for p in model.adapter_parameters()}
    stray = [n for n, p in named if id(p) not in adapter_ids]
    if stray:
        raise ValueError(f"trainable parameters outside model.adapter_parameters() (not saved by save_adapter, so "
                         f"not resumable): {stray[:5]}")
    if len(named) != len(adapter_ids):
        frozen = [n for n, p in model.named_parameters() if id(p) in adapter_ids and not p.requires_grad]
        raise ValueError(f"adapter parameters with requires_grad=False: {frozen[:5]}")
    if not named:
        raise ValueError("the model has no trainable (adapter) parameters")
    decay = [(n, p) for n, p in named if "gate" not in n and p.ndim >= 2]
    no_decay = [(n, p) for n, p in named if not ("gate" not in n and p.ndim >= 2)]
    groups = [{"name": "decay", "params": [p for _, p in decay], "param_names": [n for n, _ in decay],
               "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay],
               "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, lr: float, *, weight_decay: float = 0.02,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the adapter parameters with weight decay on prompts only (see ``adapter_param_groups``)."""
    groups = adapter_param_groups(model, weight_decay)
    for g in groups:
        g.pop("param_names")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


# ----------------------------------------------------------------------------------------------------------------
# Trainer


@dataclass
class TrainResult:
    out_dir: str
    adapter_path: str
    log_path: str
    plot_path: str | None
    steps: int                          # optimizer steps done (including skipped ones)
    losses: list[float]                 # per step, from step 1 (also across a resume); see history[i]['skipped']
    n_bad_steps: int
    elapsed_s: float
    tokens_per_s: float
    history: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        """One human-readable paragraph: steps, loss first -> last, where the files are, speed."""
        good = [h["loss"] for h in self.history if not h["skipped"]]

        def mean(xs):
            return sum(xs) / len(xs) if xs else float("nan")
        k = max(1, min(5, len(good) // 4))
        size = os.path.getsize(self.adapter_path) if os.path.exists(self.adapter_path) else 0
        lines = [f"trained {self.steps} steps ({self.n_bad_steps} skipped as non-finite) in {self.elapsed_s:.1f}s, "
                 f"{self.tokens_per_s:.0f} tokens/s",
                 f"loss: first {k} steps {mean(good[:k]):.4f} -> last {k} steps {mean(good[-k:]):.4f}",
                 f"adapter: {self.adapter_path} ({size / 1024:.1f} KiB)",
                 f"log: {self.log_path}"]
        if self.plot_path:
            lines.append(f"plot: {self.plot_path}")
        return "\n".join(lines)


class Trainer:
    """Fine-tunes the adapter of ``model`` on ``dataset`` as ``config`` says; ``train()`` runs to the end.

    ``on_step(record)`` is called on every process after each optimizer step with that step's log record;
    an exception it raises ends the run there (what a kill does, for tests).
    """

    def __init__(self, model: torch.nn.Module, dataset: TokenizedDataset, config: TrainConfig, *,
                 on_step: Callable[[dict], None] | None = None):
        self.model = model
        self.config = config
        self.on_step = on_step
        self.dist = dist_info()
        self.fsdp = config.fsdp and self.dist.world_size > 1
        if config.fsdp and not self.fsdp:
            log.info("fsdp=True with one process: nothing to shard, training unsharded")
        if config.activation_checkpointing:  # before sharding: FSDP then wraps the checkpointed blocks
            enable_activation_checkpointing(model)
        if config.fsdp and getattr(model, "quantization", None):
            raise ValueError("fsdp=True with a quantized base is not supported (FSDP shards float parameters; the "
                             "quantized codes are buffers): train with DDP, or load the base without quantize")
        if self.fsdp:
            comm_device = torch.device("cuda", self.dist.local_rank) if dist.get_backend() == "nccl" else \
                torch.device("cpu")
            broadcast_adapter(model, comm_device)  # rank 0's adapter everywhere, before sharding
            apply_fsdp(model, comm_device)
        # The training forward (the loss and its backward): the model itself, or the model compiled. Saving, loading
        # and evaluation keep using self.model, so the state dict's names and every other caller are unchanged.
        self.forward = compiled_forward(model) if config.compile else model
        self.device = next(model.parameters()).device
        self.amp_dtype = PRECISIONS[config.precision]
        if self.amp_dtype is not None and self.device.type != "cuda":
            raise ValueError(f"precision={config.precision!r} (autocast) needs the model on a CUDA device; it is on "
                             f"{self.device}. Use precision='fp32' on CPU")
        self.batches = Batches(dataset, config.micro_batch_size, grad_accum_steps=config.grad_accum_steps,
                               world_size=self.dist.world_size, rank=self.dist.rank, seed=config.seed,
                               group_by_length=config.group_by_length)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = total_steps(len(dataset), self.batches.effective_batch, config.epochs, config.max_steps)
        warmup = config.warmup_steps if config.warmup_steps is not None else round(
            config.warmup_epochs * self.steps_per_epoch)
        self.warmup_steps = min(max(0, warmup), self.total_steps)
        self.effective_batch = self.batches.effective_batch
        self.base_lr = resolve_lr(config.lr, config.blr, self.effective_batch)
        self.schedule_warnings = schedule_warnings(
            base_lr=self.base_lr, lr_given=config.lr is not None, blr=config.blr,
            effective_batch=self.effective_batch, total_steps=self.total_steps, warmup_steps=self.warmup_steps)
        self.loss_progress = LossProgress(self.total_steps)
        if config.min_lr > self.base_lr:
            raise ValueError(f"min_lr ({config.min_lr:g}) must be <= the learning rate ({self.base_lr:g}): the cosine "
                             "decays from the learning rate to min_lr")
        self.optimizer = build_optimizer(model, self.base_lr, weight_decay=config.weight_decay,
                                         betas=config.betas, eps=config.adam_eps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        names = {id(p): n for n, p in model.named_parameters()}
        self.param_names = [names.get(id(p), f"param{i}") for i, p in enumerate(self.params)]
        self.non_finite_param: str | None = None  # set by a step whose update made an adapter tensor non-finite
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.step = 0
        self.bad_in_a_row = 0
        self.n_bad_total = 0
        self.history: list[dict] = []
        self.out_dir = config.out_dir
        self.checkpoints = CheckpointManager(self.out_dir, keep=config.keep_checkpoints)
        self.log_path = os.path.join(self.out_dir, LOG_FILE)

    # -- state ---------------------------------------------------------------------------------------------------

    def _config_dict(self) -> dict:
        return dataclasses.asdict(self.config)

    def _state(self, rng_states: list[dict], optimizer_state: dict) -> dict:
        return {"format": 1, "step": self.step, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "base_lr": self.base_lr,
                "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "data": self.batches.state_dict(), "rng": rng_states, "world_size": self.dist.world_size,
                "bad_in_a_row": self.bad_in_a_row, "n_bad_total": self.n_bad_total,
                "config": json.dumps(self._config_dict(), sort_keys=True)}

    def save_checkpoint(self) -> str | None:
        """Write checkpoint step-<step> (rank 0 writes; every rank must call it). Returns its path on rank 0."""
        rng = rng_state()
        if self.dist.world_size > 1:
            gathered: list = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        adapter_state = optimizer_state = None
        if self.fsdp:  # collectives: every rank gathers, rank 0 writes
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            adapter_state = self.model.adapter_state_dict()
            optimizer_state = get_optimizer_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # never write a non-finite adapter (every rank sees the same tensors: all decide alike)
        bad = first_non_finite(adapter_state if self.fsdp else self.model.adapter_state_dict())
        if bad is not None:
            raise NonFiniteAdapterError(
                f"step {self.step}: adapter tensor {bad} is not finite (NaN or inf); checkpoint not written, "
                f"{self.checkpoints.latest_note()}")
        path = None
        if self.dist.is_main:
            state = self._state(rng_states, optimizer_state if self.fsdp else self.optimizer.state_dict())
            if self.fsdp:
                save = lambda p: self.model.save_adapter(p, state_dict=adapter_state)  # noqa: E731
            else:
                save = self.model.save_adapter
            path = self.checkpoints.write(self.step, state, save)
        if self.dist.world_size > 1:
            dist.barrier()
        return path

    def _resume(self) -> bool:
        main = self.dist.is_main
        found = self.checkpoints.read_newest(warn=main)
        if found is None:
            if main:
                log.warning("resume: no checkpoint in %s; starting from step 0", self.checkpoints.root)
            return False
        path, state, adapter = found
        changed = changed_config(state["config"], self._config_dict(), TrainConfig, TrainConfig._RESUME_FREE)
        if changed:
            raise ValueError(f"cannot resume {path}: the run's config differs from the checkpoint's "
                             f"(key: (checkpoint, now)): {changed}")
        if state["total_steps"] != self.total_steps or state["base_lr"] != self.base_lr:
            raise ValueError(f"cannot resume {path}: schedule differs (total_steps {state['total_steps']} vs "
                             f"{self.total_steps}, base_lr {state['base_lr']} vs {self.base_lr}); the data set or "
                             "world size changed")
        try:
            self.batches.load_state_dict(state["data"], allow_data_change=self.config.allow_data_change)
        except DataChangedError as e:
            raise DataChangedError(f"cannot resume {path}: {e}. Resume on the original data, or pass "
                                   "--allow-data-change (TrainConfig.allow_data_change=True) to continue on the "
                                   "changed data anyway") from None
        if self.config.allow_data_change and state["data"].get("data_sha256") not in (None, self.batches.fingerprint) \
                and main:
            log.warning("resume: the training data changed since %s was written; continuing on the new data "
                        "(allow_data_change)", path)
        self.model.load_adapter(adapter)  # (sharded models: each rank keeps its shard)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if state["world_size"] == self.dist.world_size:
            set_rng_state(state["rng"][self.dist.rank])
        else:
            log.warning("resume: world size changed (%d -> %d); RNG states not restored",
                        state["world_size"], self.dist.world_size)
        self.step = int(state["step"])
        self.bad_in_a_row = int(state["bad_in_a_row"])
        self.n_bad_total = int(state["n_bad_total"])
        if self.dist.is_main:
            self.history = truncate_log(self.log_path, self.step)
        if self.dist.world_size > 1:
            dist.barrier()
            if not self.dist.is_main:
                self.history = read_log(self.log_path, warn=False)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # -- the loop ------------------------------------------------------------------------------------------------

    def _forward_backward(self, micro_batches, n_global: int) -> torch.Tensor:
        """Backward of every micro-batch with loss (sum of its token losses) / n_global; returns the summed token
        losses of this process (float64 scalar)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for mb in micro_batches:
            n_local = int((mb["labels"][:, 1:] != IGNORE_INDEX).sum())
            if n_local == 0 and not self.fsdp:
                continue  # (only possible on one rank of a step; its zero gradient still joins the reduce)
            # (FSDP runs it anyway, with weight 0: every rank must join the same all-gathers and reduce-scatters)
            mb = {k: v.to(self.device, non_blocking=True) for k, v in mb.items()}
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = self.forward(**mb)
            token_loss_sum = out.loss.float() * n_local
            scaled = token_loss_sum / n_global
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
            loss_sum += token_loss_sum.detach().double()
        return loss_sum

    def _non_finite_param(self) -> str | None:
        """The name of the first adapter parameter holding a NaN or inf (one device sync; under FSDP each rank
        checks its shard and the flags are combined, so every rank gets the same answer)."""
        with torch.no_grad():
            flags = torch.stack([~torch.isfinite(p.to_local() if is_dtensor(p) else p).all() for p in self.params])
            if self.fsdp:
                flags = flags.float()
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad = flags.nonzero().flatten().tolist()
        return self.param_names[bad[0]] if bad else None

    def schedule_summary(self) -> str:
        """The resolved schedule, each number with where it came from (a TrainConfig default, or set)."""
        cfg = self.config
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

        def src(name):
            if name in cfg.sources:
                return cfg.sources[name]
            return "default" if getattr(cfg, name) == defaults[name] else "set"
        length = (f"max_steps {cfg.max_steps}" if cfg.max_steps else
                  f"epochs {cfg.epochs:g} ({src('epochs')}) x {self.steps_per_epoch} steps")
        warmup = (f"warmup_steps {cfg.warmup_steps} ({src('warmup_steps')})" if cfg.warmup_steps is not None else
                  f"warmup_epochs {cfg.warmup_epochs:g} ({src('warmup_epochs')})")
        lr = (f"lr, {cfg.sources.get('lr', 'set')}" if cfg.lr is not None else
              f"blr {cfg.blr:g} ({src('blr')}) x effective batch {self.effective_batch} / 256")
        return (f"schedule: {self.total_steps} optimizer steps ({length}) of {self.effective_batch} rows (micro-batch "
                f"{cfg.micro_batch_size} ({src('micro_batch_size')}) x accumulation {cfg.grad_accum_steps} x "
                f"{self.dist.world_size} process(es)); "
                f"warmup {self.warmup_steps} steps ({warmup}); peak lr {self.base_lr:.3g} ({lr}), cosine to "
                f"{cfg.min_lr:g}")

    def train(self) -> TrainResult:
        cfg = self.config
        if self.dist.is_main:
            with writing("the output directory", self.out_dir):
                os.makedirs(self.out_dir, exist_ok=True)
            stale = clean_stale_temporaries(self.out_dir)
            if stale:
                log.warning("removed %d temporary file(s) left in %s by an earlier run that failed or was killed: %s",
                            len(stale), self.out_dir, ", ".join(os.path.relpath(p, self.out_dir) for p in stale))
        if self.dist.world_size > 1:
            dist.barrier()  # (the others look for checkpoints next)
        if cfg.resume:
            self._resume()
        elif latest_checkpoint(self.out_dir) is not None:  # out_dir must be visible to every process
            raise FileExistsError(f"{self.out_dir} already holds a checkpoint ({latest_checkpoint(self.out_dir)}); "
                                  "pass resume=True to continue it, or choose another out_dir")
        if self.step == 0:
            torch.manual_seed(cfg.seed)
            if self.dist.is_main and os.path.exists(self.log_path):
                os.remove(self.log_path)
        if self.dist.world_size > 1 and self.step == 0 and not self.fsdp:  # (FSDP: before sharding, in __init__)
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=0)
        if self.dist.is_main:
            atomic_write_bytes(os.path.join(self.out_dir, CONFIG_FILE),
                                json.dumps({**self._config_dict(), "total_steps": self.total_steps,
                                            "warmup_steps": self.warmup_steps, "base_lr": self.base_lr,
                                            "effective_batch": self.effective_batch,
                                            "world_size": self.dist.world_size}, indent=1).encode())
        if self.dist.is_main:
            if cfg.progress or cfg.sources:  # a CLI run (sources set) always says where its numbers came from
                print(self.schedule_summary(), flush=True)
            for message in self.schedule_warnings:
                log.warning("finetune: %s", message)
        bar = None
        if cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune", unit="step", dynamic_ncols=True)
        if self.device.type == "cpu":
            keep_freed_heap()  # (every step frees and allocates the same activations: no page faults per step)
        was_training = self.model.training
        self.model.train()
        started = time.perf_counter()
        tokens_done = 0
        log_file = None
        if self.dist.is_main:
            with writing("the step log", self.log_path):
                log_file = open(self.log_path, "a", encoding="utf-8")
        try:
            while self.step < self.total_steps:
                record = self._train_step()
                tokens_done += record["tokens"]
                self.history.append(record)
                if log_file is not None:
                    with writing("the step log", self.log_path):
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                stalled = self.loss_progress.update(record["loss"], record["lr"])
                if stalled and self.dist.is_main:
                    log.warning("finetune: %s", stalled)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                if self.non_finite_param is not None:  # after logging; nothing of this step is saved
                    raise NonFiniteAdapterError(
                        f"stopping at step {self.step}: the optimizer update made adapter tensor "
                        f"{self.non_finite_param} non-finite (NaN or inf), so it is not saved and "
                        f"{self.checkpoints.latest_note()}. Lower the learning rate (now {record['lr']:.3g}) or set "
                        "clip_grad_norm")
                if self.bad_in_a_row >= cfg.max_bad_steps:  # after logging, so the bad steps are in the log
                    raise NonFiniteLossError(
                        f"stopping: the loss or gradient was non-finite for {self.bad_in_a_row} optimizer steps in "
                        f"a row (steps {self.step - self.bad_in_a_row + 1}-{self.step}; max_bad_steps="
                        f"{cfg.max_bad_steps}). The adapter was not updated on those steps. Lower the learning "
                        f"rate (now {record['lr']:.3g}), set clip_grad_norm, or use precision='fp32'/'bf16' "
                        "instead of 'fp16'")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(record)
            self.save_checkpoint()
        finally:
            if log_file is not None:
                try:
                    log_file.close()
                except OSError:  # (a full disk: the write that failed has already said so)
                    pass
            if bar is not None:
                bar.close()
            self.model.train(was_training)
        elapsed = time.perf_counter() - started
        adapter_path = os.path.join(self.out_dir, ADAPTER_FILE)
        plot_path = None
        final_state = self.model.adapter_state_dict() if self.fsdp else None  # a collective under FSDP
        if self.dist.is_main:
            save_adapter_atomic(self.model, adapter_path, final_state)
            if cfg.plot and self.history:
                plot_path = os.path.join(self.out_dir, PLOT_FILE)
                plot_history(self.history, plot_path)
        return TrainResult(self.out_dir, adapter_path, self.log_path, plot_path, self.step,
                           [h["loss"] for h in self.history], self.n_bad_total, elapsed,
                           tokens_done / elapsed if elapsed > 0 else 0.0, list(self.history))

    def _train_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        lr = lr_at(self.step, base_lr=self.base_lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                   min_lr=cfg.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.batches.next_step()
        loss_sum = self._forward_backward(batch.micro_batches, batch.n_loss_tokens_global)
        loss_sum, tokens = all_reduce_step(self.params, loss_sum, batch.n_tokens_local, sharded=self.fsdp)
        loss = loss_sum / batch.n_loss_tokens_global
        grad_norm = float("nan")
        skipped = not math.isfinite(loss)
        if not skipped:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = scalar(torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_grad_norm or float("inf")))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skips by itself on inf/nan gradients (loss scale too high)
                self.scaler.update()
            elif math.isfinite(grad_norm):
                try:
                    self.optimizer.step()
                except RuntimeError as e:  # e.g. an lr so large that AdamW's step size overflows float32
                    if "overflow" not in str(e):
                        raise
                    raise NonFiniteAdapterError(
                        f"stopping at step {self.step + 1}: the optimizer update overflows ({e}); the learning rate "
                        f"({lr:.3g}) is far too high. Nothing of this step is saved and "
                        f"{self.checkpoints.latest_note()}") from e
            else:
                skipped = True
            if not skipped:
                self.non_finite_param = self._non_finite_param()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if skipped:
            self.bad_in_a_row += 1
            self.n_bad_total += 1
            log.warning("step %d: non-finite %s (%s); step skipped (%d in a row, %d total)", self.step,
                        "loss" if not math.isfinite(loss) else "gradient norm",
                        loss if not math.isfinite(loss) else grad_norm, self.bad_in_a_row, self.n_bad_total)
        else:
            self.bad_in_a_row = 0
        dt = time.perf_counter() - t0
        return {"step": self.step, "epoch": batch.epoch + (batch.index + 1) / self.steps_per_epoch,
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "loss_tokens": batch.n_loss_tokens_global,
                "tokens": tokens, "tokens_per_s": tokens / dt if dt > 0 else 0.0, "step_s": dt,
                "skipped": skipped}


def compiled_forward(model: torch.nn.Module) -> Callable:
    """``model`` under torch.compile, as a training step calls it (TrainConfig.compile). dynamic=True: batches vary
    in length (and the last one in rows), and one graph with symbolic shapes compiles once, where specialised
    graphs recompile for each new shape until torch marks them dynamic anyway (on a 2-core CPU: one ~2 min compile
    against ~4 min over three recompiles, steps equally fast; docs/benchmarks.md). Compiled code caches on disk
    (torch's inductor cache), so a later run of the same model compiles faster."""
    log.info("compile=True: the first training step compiles the model (torch.compile), which takes a while")
    gemm_route()  # chosen before compiling: the compiled graph takes the route chosen (nn.openblas_route_takes)
    return torch.compile(model, dynamic=True)


def finetune(model: torch.nn.Module, dataset: TokenizedDataset, config: TrainConfig, *,
             on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune the adapter of ``model`` on ``dataset``; see ``TrainConfig`` and ``Trainer``."""
    return Trainer(model, dataset, config, on_step=on_step).train()
