"""Timing helpers shared by the benchmarks: median wall time (CUDA events on GPU), copy-bandwidth anchor,
and a plain-text table with ratios against anchors measured in the same run."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call of fn (CUDA events on GPU, so only device time counts)."""
    if device == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(fn: Callable[[], object], device: str, warmup: int = 3, iters: int = 10,
          min_time: float = 0.0) -> float:
    """Median seconds per call of fn over `iters` timed calls (after `warmup`), at least min_time in total."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - start_all) < min_time:
        times.append(_time_call(fn, device))
        if len(times) >= 10 * iters:
            break
    return statistics.median(times)


def bench_group(fns: dict[str, Callable[[], object]], device: str, warmup: int = 2,
                iters: int = 10) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin: every round calls each fn once (the order
    rotates from round to round), so load that comes and goes on a shared machine hits all variants alike and
    the ratios between them stay meaningful even when the absolute times swing. Timing one variant's
    iterations in a block and then the next's turned a 1.3x win into a 0.8x loss under such load."""
    names = list(fns)
    for _ in range(warmup):
        for nm in names:
            fns[nm]()
    sync(device)
    times: dict[str, list[float]] = {nm: [] for nm in names}
    for it in range(iters):
        shift = it % len(names)
        for nm in names[shift:] + names[:shift]:
            times[nm].append(_time_call(fns[nm], device))
    return {nm: statistics.median(ts) for nm, ts in times.items()}


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), the anchor for memory-bound kernels."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * n * 4 / t


def read_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Bytes/s of reading a large buffer once (a sum over it, every thread): the ceiling of a weight-bound decode
    step on this machine (STREAM-like; on CUDA the copy bandwidth counts read + write)."""
    if device == "cuda":
        return copy_bandwidth(device, nbytes)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times[1:])


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when a GPU is visible)")
    p.add_argument("--quick", action="store_true", help="small shapes and few iterations (smoke run)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per case")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    return p


class Table:
    """Rows of (case, impl, seconds, extra) printed with the ratio anchor_time / time (>1 = faster)."""

    def __init__(self, title: str, device: str):
        self.title, self.device, self.rows = title, device, []

    def add(self, case: str, impl: str, seconds: float, anchor: str | None = None, **extra):
        self.rows.append(dict(case=case, impl=impl, seconds=seconds, anchor=anchor, **extra))

    def ratio(self, row) -> float | None:
        if not row["anchor"]:
            return None
        base = next((r for r in self.rows if r["case"] == row["case"] and r["impl"] == row["anchor"]), None)
        return None if base is None else base["seconds"] / row["seconds"]

    def print(self):
        print(f"\n== {self.title} — {machine_name(self.device)}, torch {torch.__version__}")
        print(f"{'case':44s} {'impl':28s} {'time':>11s}  {'speed-up':>16s}  extra")
        for r in self.rows:
            rt = self.ratio(r)
            sp = f"{rt:6.2f}x vs {r['anchor']}" if rt is not None else ""
            extra = "  ".join(f"{k}={v}" for k, v in r.items()
                              if k not in ("case", "impl", "seconds", "anchor"))
            print(f"{r['case']:44s} {r['impl']:28s} {r['seconds'] * 1e3:9.3f}ms  {sp:>16s}  {extra}")

    def dump(self, path: str | None):
        if not path:
            return
        rows = [dict(r, ratio=self.ratio(r)) for r in self.rows]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(title=self.title, machine=machine_name(self.device), torch=torch.__version__,
                           rows=rows), f, indent=1)


# ------------------------------------------------------------------ variants in child processes
def run_child(script: str, variant: str, argv: list[str], env: dict | None = None) -> dict:
    """Run `python script --variant VARIANT *argv` and return the JSON dict its last stdout line holds.
    Each variant gets its own process so that peak memory is its own and no state (patched ops, allocator
    caches, imported libraries) leaks between variants. A failing child raises with the tail of its stderr."""
    cmd = [sys.executable, script, "--variant", variant, *argv]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"variant {variant!r} failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


_TIMED = "@@timed "  # marks the lines of the paired_timings protocol in a child's stdout (libraries print too)


def serve_timed_calls(call: Callable[[], float]) -> None:
    """The child's side of paired_timings: says it is ready, then answers each "run" line on stdin with what call()
    returns (its seconds), until stdin closes."""
    print(_TIMED + "ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(_TIMED + json.dumps(call()), flush=True)


def _timed_reply(variant: str, proc: subprocess.Popen, err, timeout_s: float) -> str:
    # a child that stops answering is killed after timeout_s: its stdout then ends and it fails like one that died
    watchdog = threading.Timer(timeout_s, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith(_TIMED):
                return line[len(_TIMED):].strip()
    finally:
        watchdog.cancel()
    proc.wait()
    err.seek(0)
    hung = f", killed after {timeout_s:g} s without an answer" if proc.returncode == -signal.SIGKILL else ""
    raise RuntimeError(f"variant {variant!r} failed (rc {proc.returncode}{hung}):\n{err.read()[-3000:]}")


def paired_timings(script: str, variants: list[str], argv: list[str], rounds: int,
                   timeout_s: float = 1800.0, ready_timeout_s: float | None = None) -> dict[str, list[float]]:
    """Each variant in a process of its own (`python script --variant VARIANT *argv`, a child that prepares its work
    and then serves it with serve_timed_calls), all alive at once and asked in turn for one timed call each, `rounds`
    rounds, the order reversed every other round: {variant: [seconds per round]}. On a shared machine whose speed
    drifts within a minute, calls of adjacent turns run under the same conditions, while each keeps its own process
    (heap, allocator, patched ops), as run_child gives it. The children start one after another (each prepared before
    the next starts) and are ended when done. A failing child raises with the tail of its stderr, and so does one that
    gives no answer (a call's seconds within timeout_s; ready, after its imports and preparation, within
    ready_timeout_s, default timeout_s): it is killed rather than waited for forever."""
    procs = {}
    try:
        for v in variants:
            err = tempfile.TemporaryFile(mode="w+")
            procs[v] = (subprocess.Popen([sys.executable, script, "--variant", v, *argv], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True), err)
            _timed_reply(v, *procs[v], timeout_s if ready_timeout_s is None else ready_timeout_s)  # ready
        times = {v: [] for v in variants}
        for r in range(rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                proc, err = procs[v]
                proc.stdin.write("run\n")
                proc.stdin.flush()
                times[v].append(float(json.loads(_timed_reply(v, proc, err, timeout_s))))
        return times
    finally:
        for proc, err in procs.values():
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            err.close()


def host_rss_high_water() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_memory(device: str) -> int:
    """Start a peak-memory measurement; returns the baseline that peak_memory() subtracts on CPU (the RSS high
    water mark so far: interpreter and imported libraries, which differ between variants)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0
    return host_rss_high_water()


def peak_memory(device: str, baseline: int) -> int:
    """Bytes: peak CUDA allocation since reset_peak_memory(), or on CPU the growth of the RSS high water mark
    over the baseline (what the variant allocated beyond its imports)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return host_rss_high_water() - baseline
