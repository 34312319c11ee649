"""A quantized frozen base (--quantize): memory, training step and decode speed of fp32, bf16, int8 and int4 bases,
each variant in its own process (so peak memory is its own), at the SmolLM2-135M and TinyLlama-1.1B shapes (random
weights, every layer adapted, K 10). Ratios are against the bf16 base measured in the same run (the issue's anchor)
and against fp32.

Per variant: bytes of the base's projections as stored, resident memory after loading (and its peak while loading:
a load that held the float weights would show them), median training-step time (forward + backward to the adapter,
batch x tokens as printed) with the peak resident memory of training, and greedy decode tokens/s at batch 1 with
the bytes/s of weights it reads (every projection and the LM head per token) as a fraction of the machine's read
bandwidth (_common.read_bandwidth, measured in the same run, as bench_e2e does): decode is bound by that traffic,
so 1.0 is its floor. On CUDA, a quantized base's decode is timed both ways, interleaved in its process: by the
default route (our CUDA kernel, ops.quantized_linear, for each decode row) and with DECODE_KERNEL = "none"
(dequantize + GEMM, the route before the kernel was wired in), best of 3 each; the "dequantize + GEMM" row gives
both (its time, and kernel_route) and kernel_speedup (its time / the kernel route's): below 1.00x the kernel loses
on this GPU, and quantize.CUDA_KERNEL_MAX_ROWS_BY_FORMAT should come down.

    python benchmarks/bench_quant.py [--shapes smollm2-135m,tinyllama-1.1b] [--quick] [--json OUT.json]

Two more modes compare kernels inside one process, interleaved round by round (on a shared machine, separate
processes run minutes apart and see different loads):

    python benchmarks/bench_quant.py --matmul [--rows 1,2,4,8]     # one matmul: fp32/bf16 GEMV, torch's packed
                                                                     # kernels, ours (ops.quantized_linear), dequant
    python benchmarks/bench_quant.py --decode-ab [--shapes smollm2-135m] [--rounds 5] [--device cuda]
                                     # decode ms/token: fp32, bf16, and int8/int4 with each DECODE_KERNEL
                                     # (on CUDA "torch" is dequantize + GEMM, as "none": not repeated;
                                     # --variants bf16,int8,int4 --kernels lladapter --isas avx2,avx512: fewer)
    python benchmarks/bench_quant.py --train-ab [--shapes smollm2-135m] [--acts bf16,fp32] [--rounds 5] [--threads 2]
                                     [--batch B --seq T]
                                     # training step (forward + backward to the adapter) of the float, int8 and
                                     # int4 bases with bf16 and/or fp32 activations (load_model(dtype=...)),
                                     # interleaved, median; ratios against the bf16 base's step
    python benchmarks/bench_quant.py --paths [--rows 1,8] [--threads 1]
                                     # one matmul: our CPU kernel on each path (avx2, avx512; --isas) against
                                     # F.linear in bf16 and fp32, ms and GB/s of weight bytes
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from _common import Table, common_args, host_rss_high_water, read_bandwidth, run_child  # noqa: E402

VARIANTS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
            "int4": (torch.float32, "int4")}
# (batch, tokens, timed steps, decoded tokens) per shape: the TinyLlama step is ~10 s on a 2-core CPU
SHAPES = {"smollm2-135m": (4, 128, 3, 24), "tinyllama-1.1b": (1, 64, 2, 8)}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def greedy_decode_seconds(model, prompt: torch.Tensor, new: int) -> float:
    """Seconds per token of greedy decode at batch 1 after `prompt` [1, P] with a KV cache; the first decode step is
    a warm-up, the next new - 1 are timed (synchronized on CUDA)."""
    cuda = prompt.device.type == "cuda"
    cache = model.new_cache(1, prompt.shape[1] + new + 1)
    tok = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
    tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)  # first decode step: warm-up
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(new - 1):
        tok = model(tok, cache=cache).logits[:, -1:].argmax(-1)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / max(new - 1, 1)


def child(args) -> dict:
    from lladapter_ext import quantize as Q
    from lladapter_ext.loaders import load_model
    from lladapter_ext.quantize import QuantizedLinear, is_quantizable

    dtype, fmt = VARIANTS[args.variant]
    B, T, steps, new = SHAPES[args.shape]
    if args.quick:
        B, T, steps, new = 2, 32, 1, 4
    dev = args.device
    overrides = dict(n_layers=2) if args.quick else {}
    from lladapter_ext.model import LlamaForCausalLM, config_from_preset
    # building a model on the meta device (every loader does) imports ~900 modules (~150 MiB) the first time:
    # imported here, before the baseline, so that the resident sizes compare weights, not imports
    LlamaForCausalLM(config_from_preset(args.shape, n_layers=1), device="meta")
    torch.manual_seed(0)
    base_rss = _rss()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, _ = load_model(args.shape, dtype=dtype, device=dev, quantize=fmt, adapter_len=10, adapter_layer=10**6,
                          **overrides)
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_allocated() if dev == "cuda" else host_rss_high_water() - base_rss
    after_load = torch.cuda.memory_allocated() if dev == "cuda" else _rss() - base_rss
    proj = sum(m.weight_nbytes for m in model.modules() if isinstance(m, QuantizedLinear))
    proj += sum(p.numel() * p.element_size() for n, p in model.named_parameters() if is_quantizable(n))
    # what one decode token must read: every projection and the LM head (the embeddings when tied)
    head = model.output if isinstance(model.output, QuantizedLinear) else None
    head_bytes = head.weight_nbytes if head is not None else model.lm_head_weight().nbytes
    V = model.config.vocab_size
    ids = torch.randint(0, V, (B, T), device=dev)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    # bf16 matmuls on a CPU without native bf16 run ~20x slower than fp32 (measured: 3.6 s -> 80 s per SmolLM2
    # step): one timed step there, and none for the larger shape (its memory and decode are still measured)
    slow_bf16 = dtype == torch.bfloat16 and dev == "cpu" and not args.quick
    if slow_bf16:
        steps = 0 if args.shape != "smollm2-135m" else 1
    else:
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    train_peak = torch.cuda.max_memory_allocated() if dev == "cuda" else host_rss_high_water() - base_rss
    def decode(kernel: str) -> float:
        """Seconds per token of greedy decode at batch 1 after a 16-token prompt, with quantize.DECODE_KERNEL."""
        default, Q.DECODE_KERNEL = Q.DECODE_KERNEL, kernel
        try:
            return greedy_decode_seconds(model, ids[:1, :16], new)
        finally:
            Q.DECODE_KERNEL = default

    decode_s = decode(Q.DECODE_KERNEL)  # one run, as every variant's (the ratios between variants)
    decode_kernel_s = decode_dequant_s = None
    if fmt is not None and dev == "cuda":
        # the CUDA kernel's A/B: the default route (ops.quantized_linear for the decode rows) against dequantize +
        # GEMM (DECODE_KERNEL = "none"), interleaved, best of 3 each
        ours, dequant = [decode_s], []
        for _ in range(2):
            dequant.append(decode("none"))
            ours.append(decode(Q.DECODE_KERNEL))
        dequant.append(decode("none"))
        decode_kernel_s, decode_dequant_s = min(ours), min(dequant)
    times.sort()
    return dict(load_s=load_s, load_peak=load_peak, after_load=after_load, proj_bytes=proj,
                decode_bytes=proj + head_bytes,
                step_s=times[len(times) // 2] if times else None, train_peak=train_peak, decode_s=decode_s,
                decode_kernel_s=decode_kernel_s, decode_dequant_s=decode_dequant_s, B=B, T=T)


MATMUL_SHAPES = [(1536, 576), (5632, 2048), (49152, 576)]


def _time_samples(fn, rounds: int, min_s: float = 0.02) -> list:
    """Per-call seconds of each fn (a list of callables), timed round by round in turn: one list per fn."""
    for f in fn:
        f()
    reps = []
    for f in fn:
        t = time.perf_counter()
        n = 0
        while time.perf_counter() - t < min_s:
            f()
            n += 1
        reps.append(max(1, n))
    samples = [[] for _ in fn]
    for _ in range(rounds):
        for i, f in enumerate(fn):
            t = time.perf_counter()
            for _ in range(reps[i]):
                f()
            samples[i].append((time.perf_counter() - t) / reps[i])
    return samples


def _median_time(fn, rounds: int, min_s: float = 0.02) -> list:
    """Per-call seconds of each fn, timed round by round in turn; median over rounds."""
    return [sorted(s_)[len(s_) // 2] for s_ in _time_samples(fn, rounds, min_s)]


def matmul_table(args) -> None:
    """One matmul per implementation at the model's shapes, interleaved: ms per call."""
    from lladapter_ext import ops
    from lladapter_ext import quantize as Q
    from lladapter_ext.nn import few_rows_linear

    rows_list = [int(r) for r in (args.rows or "1").split(",")]
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}; ms per call, median of {args.rounds} interleaved rounds")
    names = ["fp32 GEMV", "bf16 GEMV", "torch int8pack", "torch int4pack", "ours int8", "ours int8 Q8_0",
             "ours int4", "int8 dequant+GEMM", "int4 dequant+GEMM"]
    print("| weight [N, K], rows | " + " | ".join(names) + " |")
    print("| --- " * (len(names) + 1) + "|")
    for N, K in MATMUL_SHAPES:
        w = torch.randn(N, K) / K ** 0.5
        wb = w.bfloat16()
        q8 = Q.QuantizedLinear.from_float(w, "int8", torch.float32)
        q4 = Q.QuantizedLinear.from_float(w, "int4", torch.float32)
        c8b, s8b = Q.quantize_int8(w)  # per-block scales (Q8_0-like) from the same codes' rounding rule
        s8b = (w.view(N, K // 32, 32).abs().amax(-1) / 127).clamp_min(1e-8).half()
        c8b = torch.round(w.view(N, K // 32, 32) / s8b.float()[..., None]).clamp(-127, 127).to(torch.int8).view(N, K)
        sz4 = Q.kernel_scales_and_zeros(q4.scales, torch.float32)
        for M in rows_list:
            x = torch.randn(M, K)
            xb = x.bfloat16()

            def dequant(layer, x=x):
                with torch.no_grad():
                    return few_rows_linear(x, layer._dequantized_for_matmul(torch.float32))

            fns = [lambda: few_rows_linear(x, w), lambda: few_rows_linear(xb, wb),
                   lambda: torch._weight_int8pack_mm(x, q8.codes, q8.scales),
                   lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.codes, q4.group_size, sz4),
                   lambda: ops.quantized_linear(x, q8.codes, q8.scales),
                   lambda: ops.quantized_linear(x, c8b, s8b),
                   lambda: ops.quantized_linear(x, q4.codes, q4.scales),
                   lambda: dequant(q8), lambda: dequant(q4)]
            with torch.no_grad():
                ts = _median_time(fns, args.rounds)
            print(f"| {N} x {K}, {M} row{'s' if M > 1 else ''} | " + " | ".join(f"{t * 1e3:.3g}" for t in ts) + " |",
                  flush=True)


PATH_SHAPES = [(5632, 2048), (2048, 5632), (2048, 2048), (1536, 576), (49152, 576)]
COLD_BYTES = 640 * 2**20


def _isas(args) -> list:
    """--isas, or every path of ops.quantized_linear_cpu_isa this machine has (scalar only when asked)."""
    from lladapter_ext import ops

    want = args.isas.split(",") if args.isas else ["avx2", "avx512"]
    ok = []
    for isa in want:
        try:
            ops.quantized_linear_cpu_isa(isa)
            ok.append(isa)
        except RuntimeError as e:
            print(f"path {isa} skipped: {str(e).splitlines()[0]}")
    ops.quantized_linear_cpu_isa("auto")
    return ok


def paths_table(args) -> None:
    """ops.quantized_linear on each CPU path against F.linear (bf16, fp32) and the bf16 base's decode matmul
    (nn.few_rows_linear), interleaved: ms per call (median and best of the rounds; spread: the row's largest max -
    min as a % of the median) and GB/s of the weight's bytes as stored, at the best."""
    import torch.nn.functional as F

    from lladapter_ext import ops
    from lladapter_ext import quantize as Q
    from lladapter_ext.nn import few_rows_linear

    isas = _isas(args)
    rows_list = [int(r) for r in (args.rows or "1,8").split(",")]
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}; {'cold (from DRAM)' if args.cold else 'warm'} weights; "
          f"{args.rounds} interleaved rounds; ms per call, median / best (GB/s of "
          "the weight bytes at the best); spread = the row's largest (max - min) / median")
    names = [f"ours {fmt} {isa}" for fmt in ("int8", "int4") for isa in isas]
    names += ["bf16 F.linear", "fp32 F.linear", "bf16 few_rows_linear"]
    print("| weight [N, K], rows | " + " | ".join(names) + " | spread |")
    print("| --- " * (len(names) + 2) + "|")

    def nbytes(*ts):
        return sum(t.numel() * t.element_size() for t in ts)

    def on(isa, f):
        def g():
            ops.quantized_linear_cpu_isa(isa)
            return f()
        return g

    def cycle(items):
        it = [0]

        def nxt():
            it[0] = (it[0] + 1) % len(items)
            return items[it[0]]
        return nxt

    for N, K in PATH_SHAPES:
        w = torch.randn(N, K) / K ** 0.5
        q8 = Q.QuantizedLinear.from_float(w, "int8", torch.float32)
        q4 = Q.QuantizedLinear.from_float(w, "int4", torch.float32)
        sizes = [nbytes(q8.codes, q8.scales)] * len(isas) + [nbytes(q4.codes, q4.scales)] * len(isas)
        sizes += [nbytes(w) // 2, nbytes(w), nbytes(w) // 2]
        # --cold: every call takes the next of enough copies of its weight (COLD_BYTES of each kind) that they come
        # from DRAM, as a decode step's do, and not from the last-level cache (300 MiB on the Xeon of the docs)
        def copies(ts, b):
            n = max(1, -(-COLD_BYTES // b)) if args.cold else 1
            return [ts] + [tuple(t.clone() for t in ts) for _ in range(n - 1)]
        q8s = cycle(copies((q8.codes, q8.scales), sizes[0]))
        q4s = cycle(copies((q4.codes, q4.scales), sizes[-4]))
        wbs = cycle([t for (t,) in copies((w.bfloat16(),), sizes[-3])])
        ws = cycle([t for (t,) in copies((w,), sizes[-2])])
        for M in rows_list:
            x = torch.randn(M, K)
            xb = x.bfloat16()
            fns = [on(isa, lambda q=q: ops.quantized_linear(x, *q())) for q in (q8s, q4s) for isa in isas]
            fns += [lambda: F.linear(xb, wbs()), lambda: F.linear(x, ws()), lambda: few_rows_linear(xb, wbs())]
            with torch.no_grad():
                samples = _time_samples(fns, args.rounds)
            ops.quantized_linear_cpu_isa("auto")
            meds = [sorted(s_)[len(s_) // 2] for s_ in samples]
            spread = max((max(s_) - min(s_)) / m for s_, m in zip(samples, meds))
            cells = [f"{t * 1e3:.3g} / {min(s_) * 1e3:.3g} ({b / min(s_) / 1e9:.1f})"
                     for t, s_, b in zip(meds, samples, sizes)]
            print(f"| {N} x {K}, {M} row{'s' if M > 1 else ''} | " + " | ".join(cells) + f" | {spread:.0%} |",
                  flush=True)
        del q8s, q4s, wbs, ws


def decode_ab(args) -> None:
    """Greedy decode at batch 1, ms per token, every variant in one process, interleaved round by round."""
    from lladapter_ext import ops
    from lladapter_ext import quantize as Q
    from lladapter_ext.loaders import load_model

    # (name, model, DECODE_KERNEL, CPU path); int8/int4 with fp32 activations (bench_quant's default variants) and
    # with bf16 ones (--dtype bfloat16: the embeddings / tied head, norms and activations in bf16, as the bf16 base
    # has them).
    # --variants picks the bases (bf16 is always run: the anchor), --kernels the DECODE_KERNELs (on CUDA "torch",
    # torch's CPU kernels, is dequantize + GEMM, as "none" is: not timed twice), --isas the CPU paths of ours
    # (default: the one the process takes; CPU only)
    dev = args.device
    chosen = set(args.variants.split(",")) | {"bf16"}
    kernels = [k for k in args.kernels.split(",") if not (dev == "cuda" and k == "torch")]
    isas = _isas(args) if args.isas and dev != "cuda" else [None]
    variants = [(v, v, None, None) for v in ("fp32", "bf16") if v in chosen]
    for fmt in ("int8", "int4"):
        if fmt not in chosen:
            continue
        for act in ("fp32", "bf16"):
            for kernel in kernels:
                for isa in (isas if kernel == "lladapter" else [None]):
                    tag = kernel + (f", {isa}" if isa else "")
                    variants.append((f"{fmt}, {act} activations ({tag})", f"{fmt}-{act}", kernel, isa))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for shape in args.shapes.split(","):
        models = {}
        for key in sorted({key for _, key, _, _ in variants}):
            fmt, _, act = key.rpartition("-")
            torch.manual_seed(0)
            models[key] = load_model(shape, dtype=dtypes[act], device=dev, quantize=fmt or None, adapter_len=10,
                                     adapter_layer=10**6)[0]
        V = models["bf16"].config.vocab_size
        ids = torch.randint(0, V, (1, 16), device=dev)
        new = args.tokens

        def run(model, kernel, isa):
            Q.DECODE_KERNEL = kernel or "lladapter"
            ops.quantized_linear_cpu_isa(isa or "auto")
            return greedy_decode_seconds(model, ids, new)

        samples = {name: [] for name, _, _, _ in variants}
        for _ in range(args.rounds):
            for name, key, kernel, isa in variants:
                samples[name].append(run(models[key], kernel, isa))
        Q.DECODE_KERNEL = "lladapter"
        ops.quantized_linear_cpu_isa("auto")
        bf16 = sorted(samples["bf16"])[len(samples["bf16"]) // 2]
        print(f"{shape}: decode ms/token, batch 1, median of {args.rounds} interleaved rounds of {new - 1} tokens, "
              f"threads {torch.get_num_threads()}")
        print("| base (DECODE_KERNEL) | ms/token | vs bf16 | spread |\n| --- | --- | --- | --- |")
        for name, s_ in samples.items():
            med = sorted(s_)[len(s_) // 2]
            print(f"| {name} | {med * 1e3:.1f} | {bf16 / med:.2f}x | {(max(s_) - min(s_)) / med:.0%} |", flush=True)


def train_ab(args) -> None:
    """Training-step time of the float base and the int8 / int4 bases, with the activations (and the float parts of
    the model) in each dtype of --acts, all models in one process, stepped round-robin (one warm-up round), median of
    --rounds. The issue's target: a quantized base's step <= 1.5x the bf16 base's step with bf16 activations."""
    from lladapter_ext.loaders import load_model

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for shape in args.shapes.split(","):
        B, T = args.batch or SHAPES[shape][0], args.seq or SHAPES[shape][1]
        models = {}
        for act in args.acts.split(","):
            for fmt in ("float", "int8", "int4"):
                torch.manual_seed(0)
                models[f"{act} acts, {fmt} base"] = load_model(
                    shape, dtype=dtypes[act], device=args.device, quantize=None if fmt == "float" else fmt,
                    adapter_len=10, adapter_layer=10**6)[0]
        ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (B, T), device=args.device)

        def step(model):
            model(ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()

        times = {k: [] for k in models}
        for r in range(args.rounds + 1):
            for k, m in models.items():
                t = time.perf_counter()
                step(m)
                if r:
                    times[k].append(time.perf_counter() - t)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        table = Table(f"training step, {shape} B{B}xT{T}, {torch.get_num_threads()} threads, median of {args.rounds} "
                      "interleaved rounds", args.device)
        ref = med.get("bf16 acts, float base")
        for k, v in med.items():
            act = k.split()[0]
            own = med[f"{act} acts, float base"]
            extra = dict(vs_same_acts_float=f"{v / own:.2f}x")
            if ref:
                extra["vs_bf16_base"] = f"{v / ref:.2f}x"
            table.add(shape, k, v, None, **extra)
        table.print()
        table.dump(args.json)


def main():
    p = common_args(__doc__.split("\n\n")[0])
    p.add_argument("--matmul", action="store_true", help="single-matmul table (one process, interleaved)")
    p.add_argument("--decode-ab", action="store_true", help="decode A/B of every variant in one process")
    p.add_argument("--paths", action="store_true", help="single-matmul table of our CPU kernel's paths vs F.linear")
    p.add_argument("--train-ab", action="store_true", help="training step of the float, int8 and int4 bases with "
                   "bf16 / fp32 activations, in one process, interleaved")
    p.add_argument("--acts", default="bf16,fp32", help="--train-ab: comma-separated activation dtypes (bf16, fp32)")
    p.add_argument("--batch", type=int, default=None, help="--train-ab: batch size (default: the shape's, SHAPES)")
    p.add_argument("--seq", type=int, default=None, help="--train-ab: sequence length (default: the shape's)")
    p.add_argument("--isas", default=None, help="--paths / --decode-ab: comma-separated CPU paths of ours "
                   "(avx512, avx2, scalar; --paths default avx2,avx512, --decode-ab default: the process's own)")
    p.add_argument("--cold", action="store_true", help="--paths: cycle through copies of each weight (640 MiB of "
                   "each kind) so that they stream from DRAM, as in a decode step")
    p.add_argument("--kernels", default="lladapter,torch,none",
                   help="--decode-ab: comma-separated quantize.DECODE_KERNEL values")
    p.add_argument("--rows", default=None,
                   help="--matmul (default 1) / --paths (default 1,8): comma-separated row counts")
    p.add_argument("--rounds", type=int, default=5, help="--matmul / --decode-ab / --train-ab: interleaved rounds")
    p.add_argument("--tokens", type=int, default=12, help="--decode-ab: decoded tokens per round")
    p.add_argument("--threads", type=int, default=None,
                   help="--matmul / --decode-ab / --paths / --train-ab: torch.set_num_threads")
    p.add_argument("--variant", default=None, help=argparse_hidden())
    p.add_argument("--shape", default=None, help=argparse_hidden())
    p.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b", help="comma-separated presets")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    args = p.parse_args()
    if args.threads and (args.matmul or args.decode_ab or args.paths or args.train_ab):
        torch.set_num_threads(args.threads)
    if (args.train_ab or args.decode_ab) and args.shapes == p.get_default("shapes"):
        args.shapes = "smollm2-135m"  # (the in-process A/Bs' default: TinyLlama takes minutes a round)
    if args.train_ab:
        train_ab(args)
        return
    if args.paths:
        paths_table(args)
        return
    if args.matmul:
        matmul_table(args)
        return
    if args.decode_ab:
        decode_ab(args)
        return
    if args.variant:
        print(json.dumps(child(args)))
        return
    shapes = ["smollm2-135m"] if args.quick else args.shapes.split(",")
    table = Table("quantized base: memory, training step, decode (ratios vs the bf16 and fp32 bases)", args.device)
    # decode is bound by reading the weights: its bytes/s against the machine's read bandwidth (as bench_e2e) is
    # the distance to that floor
    read_bw = read_bandwidth(args.device)
    print(f"read bandwidth: {read_bw / 1e9:.1f} GB/s", flush=True)
    mib = 2 ** 20
    for shape in shapes:
        res = {}
        for v in args.variants.split(","):
            argv = ["--shape", shape, "--device", args.device] + (["--quick"] if args.quick else [])
            res[v] = r = run_child(os.path.abspath(__file__), v, argv)
            print(f"{shape} {v}: {r}", flush=True)
        def ratio(a, b):
            return f"{a / b:.2f}x" if a is not None and b is not None else "n/a"

        for v, r in res.items():
            ref = res.get("bf16")
            extra = {}
            if ref:
                extra = dict(proj_vs_bf16=ratio(r["proj_bytes"], ref["proj_bytes"]),
                             step_vs_bf16=ratio(r["step_s"], ref["step_s"]),
                             decode_vs_bf16=ratio(ref["decode_s"], r["decode_s"]))
            if "fp32" in res:
                f = res["fp32"]
                extra.update(step_vs_fp32=ratio(r["step_s"], f["step_s"]),
                             decode_vs_fp32=ratio(f["decode_s"], r["decode_s"]))
            case = f"{shape} B{r['B']}xT{r['T']}"
            table.add(case, f"{v} train step", r["step_s"] or float("nan"), None,
                      proj=f"{r['proj_bytes'] / mib:.0f}MiB",
                      resident=f"{r['after_load'] / mib:.0f}MiB", load_peak=f"{r['load_peak'] / mib:.0f}MiB",
                      train_peak=f"{r['train_peak'] / mib:.0f}MiB", **extra)
            table.add(case, f"{v} decode (per token)", r["decode_s"], None,
                      tokens_per_s=f"{1 / r['decode_s']:.1f}",
                      weights_read=f"{r['decode_bytes'] / r['decode_s'] / 1e9:.1f}GB/s",
                      of_read_bw=f"{r['decode_bytes'] / r['decode_s'] / read_bw:.2f}")
            if r.get("decode_dequant_s") is not None:  # CUDA: the kernel route's A/B, best of 3 interleaved runs each
                table.add(case, f"{v} decode, dequantize + GEMM", r["decode_dequant_s"], None,
                          kernel_route=f"{r['decode_kernel_s'] * 1e3:.3f}ms",
                          kernel_speedup=f"{r['decode_dequant_s'] / r['decode_kernel_s']:.2f}x")
    table.print()
    table.dump(args.json)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
