"""A fine-tuning run's files: checkpoints (one CheckpointManager per run directory), the step log, atomic writes
that say what failed and where, stale temporaries, RNG state. The loop that calls these is lladapter_ext.training.

Checkpoints (``out_dir/checkpoints/step-NNNNNNNN/``): ``adapter.safetensors`` (model.save_adapter) and
``trainer_state.pt`` (optimizer, grad scaler, step, data position, RNG states of every process, counters),
written to a temporary directory that is renamed into place, then ``checkpoints/latest`` is replaced
atomically; a kill at any moment leaves the previous checkpoint intact. ``trainer_state.pt`` holds only tensors
and plain containers and is loaded with ``weights_only=True``. Resuming reads the checkpoint ``latest`` names,
falling back to the newest earlier one that reads back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable

import torch

from .adapter import first_non_finite

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_DIR", "ADAPTER_FILE", "STATE_FILE", "LOG_FILE", "PLOT_FILE", "CONFIG_FILE",
           "CheckpointWriteError", "CheckpointCorruptError", "CheckpointManager", "writing", "atomic_write_bytes",
           "save_adapter_atomic", "clean_stale_temporaries", "latest_checkpoint", "rng_state", "set_rng_state",
           "read_log", "truncate_log", "changed_config"]

CHECKPOINT_DIR = "checkpoints"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
CONFIG_FILE = "train_config.json"


class CheckpointWriteError(OSError):
    """Writing a checkpoint, the adapter, the step log or another output file failed. The message names the file
    and says "no space left on device" when that is the cause (errno is then ENOSPC)."""


class CheckpointCorruptError(ValueError):
    """A checkpoint whose files cannot be read back (truncated, corrupt, non-finite adapter)."""


# what a write that came up short looks like: ENOSPC from Python, torch's zip writer (inline_container.cc:
# "unexpected pos", "file write failed"), safetensors' Rust io error
_SHORT_WRITE_MARKERS = ("no space left on device", "unexpected pos", "file write failed", "storagefull",
                        "os error 28", "errno 28")


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e).lower()
    return any(m in text for m in _SHORT_WRITE_MARKERS)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


@contextlib.contextmanager
def writing(what: str, path: str, *, cleanup: tuple = (), note: str = ""):
    """Run a write of ``what`` to ``path``: on failure remove the ``cleanup`` paths (temporaries); an OSError or a
    failed/short write (e.g. torch's "unexpected pos") becomes a CheckpointWriteError that names the path and says
    "no space left on device" when that is the cause; other exceptions pass through unchanged."""
    try:
        yield
    except BaseException as e:
        for c in cleanup:
            _remove(c)
        if isinstance(e, CheckpointWriteError) or not isinstance(e, Exception):
            raise
        full = _is_disk_full(e)
        if not (full or isinstance(e, OSError)):
            raise
        detail = " ".join(str(e).split()) or type(e).__name__
        msg = f"cannot write {what} {path}: " + (f"no space left on device ({detail})" if full else detail)
        err = CheckpointWriteError(msg + (f"; {note}" if note else ""))
        err.errno = errno.ENOSPC if full else getattr(e, "errno", None)
        err.path = path  # (not .filename: OSError.__str__ would then ignore the message)
        raise err from e


def atomic_write_bytes(path: str, data: bytes, what: str = "file") -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with writing(what, path, cleanup=(tmp,)):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter_atomic(model: torch.nn.Module, path: str, state_dict: dict | None = None) -> None:
    """model.save_adapter to a temporary file in the same directory, then os.replace onto ``path``. ``state_dict``:
    the (gathered) adapter tensors to write instead of the model's own parameters (FSDP)."""
    tmp = f"{path}.tmp-{os.getpid()}.safetensors"
    with writing("the adapter", path, cleanup=(tmp,)):
        if state_dict is None:
            model.save_adapter(tmp)
        else:
            model.save_adapter(tmp, state_dict=state_dict)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


# temporaries this module writes (name.tmp-PID[.ext] next to the file; checkpoints/.tmp-step-N-PID while a
# checkpoint is written; checkpoints/step-N.old-PID while a checkpoint of the same step is replaced)
_STALE_FILE = re.compile(r"^({})\.tmp-\d+(\.safetensors|\.png)?$".format(
    "|".join(re.escape(n) for n in (LOG_FILE, CONFIG_FILE, ADAPTER_FILE, PLOT_FILE))))
_STALE_CKPT = re.compile(r"^(\.tmp-step-\d+-\d+|latest\.tmp-\d+)$")
_OLD_CKPT = re.compile(r"^(step-\d+)\.old-\d+$")


def clean_stale_temporaries(out_dir: str) -> list[str]:
    """Remove the temporaries that an earlier run in ``out_dir`` left when it failed or was killed mid-write
    (partial checkpoint directories, half-written log, config, adapter or plot files). A checkpoint that was
    being replaced by a re-save of the same step (step-N.old-PID with no step-N) is put back, never deleted.
    Returns the paths removed or restored."""
    done = []
    if os.path.isdir(out_dir):
        for n in sorted(os.listdir(out_dir)):
            if _STALE_FILE.match(n):
                _remove(os.path.join(out_dir, n))
                done.append(os.path.join(out_dir, n))
    root = os.path.join(out_dir, CHECKPOINT_DIR)
    if os.path.isdir(root):
        for n in sorted(os.listdir(root)):
            path = os.path.join(root, n)
            old = _OLD_CKPT.match(n)
            if old:
                final = os.path.join(root, old.group(1))
                if os.path.exists(final):
                    _remove(path)  # the replacement was completed; this is the superseded copy
                else:
                    os.replace(path, final)  # killed between the two renames: the old copy is the good one
                done.append(path)
            elif _STALE_CKPT.match(n):
                _remove(path)
                done.append(path)
    return done


def latest_checkpoint(out_dir: str) -> str | None:
    """The directory that ``out_dir/checkpoints/latest`` names, or None when there is no checkpoint."""
    pointer = os.path.join(out_dir, CHECKPOINT_DIR, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(out_dir, CHECKPOINT_DIR, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {name!r}, which does not exist")
    return path


def find_adapter_file(path: str | os.PathLike) -> str:
    """An adapter file as given, or the adapter a fine-tuning output directory holds: its final
    adapter.safetensors, else the newest checkpoint's adapter (a run still going or stopped early)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    final = os.path.join(path, ADAPTER_FILE)
    if os.path.isfile(final):
        return final
    ck = latest_checkpoint(path) if os.path.isdir(path) else None
    if ck:
        for f in sorted(os.listdir(ck)):
            if f.endswith(".safetensors"):
                return os.path.join(ck, f)
    raise FileNotFoundError(f"{path}: no adapter .safetensors file found there")


def plot_history(history: list[dict], path: str) -> None:
    """Loss and lr against the optimizer step (skipped steps marked), written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's matplotlib backend alone

    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True)
    good = [h for h in history if not h["skipped"]]
    ax_loss.plot([h["step"] for h in good], [h["loss"] for h in good], lw=1.2, label="train loss")
    bad = [h["step"] for h in history if h["skipped"]]
    if bad:
        ax_loss.scatter(bad, [min(h["loss"] for h in good) if good else 0.0] * len(bad), marker="x", color="red",
                        label=f"skipped (non-finite): {len(bad)}")
    ax_loss.set_ylabel("loss (mean over answer tokens)")
    ax_loss.legend(loc="upper right")
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([h["step"] for h in history], [h["lr"] for h in history], color="tab:orange", lw=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    with writing("the loss plot", path, cleanup=(tmp,)):
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["cached"]))


class CheckpointManager:
    """The checkpoints of one run directory: ``out_dir/checkpoints/step-NNNNNNNN/`` directories, the newest
    ``keep`` of them kept, and the ``latest`` pointer. Every write is atomic (see the module docstring)."""

    def __init__(self, out_dir: str, keep: int):
        self.out_dir = out_dir
        self.root = os.path.join(out_dir, CHECKPOINT_DIR)
        self.keep = keep

    def latest_note(self) -> str:
        """Where the run stands, for an error message: the latest good checkpoint, or none."""
        try:
            latest = latest_checkpoint(self.out_dir)
        except OSError:
            latest = None
        return (f"the latest good checkpoint is still {latest}" if latest else
                "there is no earlier checkpoint")

    def write(self, step: int, state: dict, save_adapter: Callable[[str], None]) -> str:
        """Write checkpoint step-<step>: ``state`` to trainer_state.pt, the adapter through ``save_adapter(path)``;
        then point ``latest`` at it and prune older ones. Returns its directory."""
        name = f"step-{step:08d}"
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, f".tmp-{name}-{os.getpid()}")
        note = self.latest_note()
        with writing(f"checkpoint {name}:", tmp, cleanup=(tmp,), note=note):
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        for f in (ADAPTER_FILE, STATE_FILE):
            with writing(f"checkpoint {name}:", os.path.join(tmp, f), cleanup=(tmp,), note=note):
                if f == STATE_FILE:
                    torch.save(state, os.path.join(tmp, f))
                else:
                    save_adapter(os.path.join(tmp, f))
                with open(os.path.join(tmp, f), "rb+") as fh:
                    os.fsync(fh.fileno())
        with writing(f"checkpoint {name}:", final, cleanup=(tmp,), note=note):
            if os.path.exists(final):  # re-saving the same step (a resumed run that ends where it resumed)
                old = f"{final}.old-{os.getpid()}"
                os.replace(final, old)
                try:
                    os.replace(tmp, final)
                except BaseException:
                    os.replace(old, final)
                    raise
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            fsync_dir(self.root)
        atomic_write_bytes(os.path.join(self.root, "latest"), (name + "\n").encode(), what="the checkpoint pointer")
        self.prune(keep=name)
        return final

    def prune(self, keep: str) -> None:
        names = sorted(n for n in os.listdir(self.root) if n.startswith("step-") and ".old-" not in n)
        for n in names[:-self.keep]:
            if n != keep:
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    def candidates(self) -> tuple[list[str], list[str]]:
        """(checkpoint directories to try, newest first: the one `latest` names, then the older step-* ones;
        problems already found, e.g. `latest` naming a missing directory)."""
        pointer = os.path.join(self.root, "latest")
        if not os.path.exists(pointer):
            return [], []
        problems = []
        with open(pointer, encoding="utf-8", errors="replace") as f:
            name = f.read().strip()
        named = os.path.join(self.root, name)
        steps = sorted((n for n in os.listdir(self.root) if re.fullmatch(r"step-\d+", n)), reverse=True)
        if re.fullmatch(r"step-\d+", name) and os.path.isdir(named):
            return [named] + [os.path.join(self.root, n) for n in steps if n < name], problems
        problems.append(f"{pointer} names {name!r}, which is not a checkpoint directory")
        return [os.path.join(self.root, n) for n in steps], problems

    @staticmethod
    def read(path: str) -> tuple[dict, dict]:
        """(trainer state, adapter tensors) of checkpoint directory ``path``; CheckpointCorruptError naming the
        file when one cannot be read back."""
        from safetensors.torch import load_file
        state_file = os.path.join(path, STATE_FILE)
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read it back means the file is unusable
            raise CheckpointCorruptError(f"{state_file} is unreadable ({type(e).__name__}: "
                                         f"{' '.join(str(e).split())[:300]})") from e
        need = ("step", "total_steps", "base_lr", "optimizer", "data", "rng", "world_size", "config")
        missing = [k for k in need if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointCorruptError(f"{state_file} is not a trainer state (missing {missing})")
        adapter_file = os.path.join(path, ADAPTER_FILE)
        try:
            adapter = load_file(adapter_file)
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(f"{adapter_file} is unreadable ({type(e).__name__}: "
                                         f"{' '.join(str(e).split())[:300]})") from e
        bad = first_non_finite(adapter)
        if bad is not None:
            raise CheckpointCorruptError(f"{adapter_file}: tensor {bad} is not finite")
        return state, adapter

    def read_newest(self, warn: bool = True) -> tuple[str, dict, dict] | None:
        """(path, trainer state, adapter tensors) of the newest checkpoint that reads back, None when there is no
        checkpoint; CheckpointCorruptError when none reads back. Falling back past an unreadable one is logged."""
        candidates, problems = self.candidates()
        if not candidates and not problems:
            return None
        for cand in candidates:
            try:
                state, adapter = self.read(cand)
            except CheckpointCorruptError as e:
                problems.append(str(e))
                continue
            if problems and warn:
                log.warning("resume: %s; falling back to the newest readable checkpoint, %s", "; ".join(problems),
                            cand)
            return cand, state, adapter
        raise CheckpointCorruptError(f"cannot resume from {self.root}: no readable checkpoint ("
                                     + "; ".join(problems) + ")")


def changed_config(saved_json: str, current: dict, config_type, free: frozenset) -> dict:
    """{key: (checkpoint's value, current value)} of the config fields that differ between a checkpoint's config
    (JSON) and the current one, except the fields in ``free``. A field added after the checkpoint was written
    counts as its default."""
    saved = {**{f.name: f.default for f in dataclasses.fields(config_type) if f.default is not dataclasses.MISSING},
             **json.loads(saved_json)}
    return {k: (saved.get(k), current[k]) for k in current
            if k not in free and json.dumps(saved.get(k)) != json.dumps(current[k])}


def read_log(path: str, warn: bool = True) -> list[dict]:
    """The step records of a step log (log.jsonl). A line that is not a step record (corrupt, e.g. by a crash or
    an editor) is skipped with a warning naming the file and line; a partial last line (a kill in the middle of
    writing it) is dropped silently."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        except json.JSONDecodeError:
            ok = False
        if ok:
            records.append(record)
        elif warn and k != len(lines) - 1:
            log.warning("%s:%d: skipping a corrupt log line (not a step record): %.80r", path, lineno,
                        line.rstrip("\n"))
    return records


def truncate_log(path: str, step: int) -> list[dict]:
    """Keep the step log's records of steps <= ``step`` (later ones are redone after a resume); returns them."""
    kept = [r for r in read_log(path) if r["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept
