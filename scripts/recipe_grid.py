#!/usr/bin/env python
"""Measure fine-tuning recipes (lladapter_ext.recipe) on generated task families at several data sizes: the grid
behind `lladapter finetune`'s defaults (docs/recipe.md).

Each cell trains a fresh adapter on the default model (SmolLM2-135M-Instruct) and reports the loss and held-out
exact match. The task families are scripts/make_demo_data.py's recipe families (a string transformation, a
classification, an extraction) plus the demo set. A recipe whose schedule is longer than --max-steps is run for
--max-steps steps with its warmup share kept (the row says so): on this 2-core CPU an epoch of 20,000 examples is
~2,500 steps (~1 h), so the large cells measure the first part of the schedule.

Results are appended to OUT/results.jsonl one cell at a time; a rerun skips the cells already there.

    python scripts/recipe_grid.py --out runs/recipe_grid                       # the whole grid
    python scripts/recipe_grid.py --sizes 200 --families handle --recipes default
    python scripts/recipe_grid.py --out runs/recipe_grid --table               # print the table of results
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import make_demo_data  # noqa: E402

# name -> (recipe, overrides of the recipe's fields)
VARIANTS = {
    "default": ("default", {}),
    "official": ("official", {}),
    "default-lr1e-2": ("default", {"lr": 1e-2}),
    "default-lr5e-2": ("default", {"lr": 5e-2}),
    "default-all-layers": ("default", {"adapter_layer_share": 1.0}),
}
N_EVAL = 50


def cell_data(out: str, family: str, n: int, seed: int = 0) -> tuple[str, str]:
    """(train path, eval path) of a family at size n; the demo family is the bundled data/demo set. The data
    depend on the family and size only (generated with `seed`, 0 for every cell): a cell's --seed varies the
    training (prompt init, data order), not the task."""
    if family == "demo":
        return os.path.join(ROOT, "data", "demo", "train.jsonl"), os.path.join(ROOT, "data", "demo", "eval.jsonl")
    d = os.path.join(out, "data", f"{family}-{n}")
    train_path, eval_path = os.path.join(d, "train.jsonl"), os.path.join(d, "eval.jsonl")
    if not os.path.exists(eval_path):
        train, evaluation = make_demo_data.generate(seed, n, N_EVAL, (family,))
        os.makedirs(d, exist_ok=True)
        for path, records in ((train_path, train), (eval_path, evaluation)):
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.write(make_demo_data.to_jsonl(records))
            os.replace(path + ".tmp", path)
    return train_path, eval_path


def exact_match_rate(model, tok, eval_path: str, limit: int) -> tuple[float, list[str]]:
    from lladapter_ext import data, evaluation
    from lladapter_ext.generation import generate

    pairs = evaluation.eval_prompts(data.read_records(eval_path)[:limit], tok)
    model.eval()
    preds = []
    for s in range(0, len(pairs), 16):
        preds += generate(model, tok, [p for p, _, _ in pairs[s:s + 16]], max_new_tokens=24)
    hits = sum(evaluation.exact_match(p, ref) for p, (_, ref, _) in zip(preds, pairs))
    return hits / len(pairs), preds[:3]


def run_cell(out: str, family: str, n: int, variant: str, max_steps: int, seed: int) -> dict:
    import dataclasses

    import torch

    from lladapter_ext import data, recipe, training
    from lladapter_ext.loaders import default_model_path, load_model

    train_path, eval_path = cell_data(out, family, n)
    torch.manual_seed(seed)
    path = default_model_path()
    if variant == "base":
        model, tok = load_model(path, adapter_len=10, adapter_layer=0)
        em, sample = exact_match_rate(model, tok, eval_path, N_EVAL)
        return {"exact_match": em, "sample": sample}
    name, overrides = VARIANTS[variant]
    r = dataclasses.replace(recipe.get(name), **overrides)
    layers, _ = recipe.adapter_layers(r, _depth(path))
    model, tok = load_model(path, adapter_len=r.adapter_len, adapter_layer=layers, gate_act="tanh")
    ds = data.load_dataset(train_path, tok, max_seq_len=128)
    epochs, _ = recipe.epochs(r, len(ds))
    steps_per_epoch = len(ds) // r.micro_batch_size
    total = max(1, round(epochs * steps_per_epoch))
    warmup, _ = recipe.warmup_steps(r, total, steps_per_epoch)
    run_steps = min(total, max_steps)
    run_warmup = warmup if run_steps == total else max(1, round(warmup * run_steps / total))
    lr = training.resolve_lr(r.lr, r.blr, r.micro_batch_size)
    run_dir = os.path.join(out, "runs", f"{family}-{n}-{variant}" + (f"-seed{seed}" if seed else ""))
    cfg = training.TrainConfig(out_dir=run_dir, max_steps=run_steps, micro_batch_size=r.micro_batch_size, lr=lr,
                               warmup_steps=run_warmup, seed=seed, progress=False, plot=False)
    t0 = time.time()
    result = training.finetune(model, ds, cfg)
    train_s = time.time() - t0
    em, sample = exact_match_rate(model, tok, eval_path, N_EVAL)
    tail = result.losses[-max(1, len(result.losses) // 10):]
    return {"recipe": name, "overrides": overrides, "adapter_layer": layers, "lr": lr, "batch": r.micro_batch_size,
            "epochs": epochs, "schedule_steps": total, "warmup_steps": warmup, "steps": run_steps,
            "capped": run_steps < total, "examples_seen": run_steps * r.micro_batch_size,
            "loss_first": result.losses[0], "loss_last": sum(tail) / len(tail),
            "loss_finite": all(math.isfinite(x) for x in result.losses), "train_s": round(train_s, 1),
            "exact_match": em, "sample": sample}


_DEPTH: dict[str, int] = {}


def _depth(path: str) -> int:
    from lladapter_ext.loaders import load_model

    if path not in _DEPTH:
        _DEPTH[path] = load_model(path, adapter_layer=0, tokenizer=False)[0].config.n_layers
    return _DEPTH[path]


def read_results(out: str) -> list[dict]:
    path = os.path.join(out, "results.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def print_table(rows: list[dict]) -> None:
    """One line per cell (family, size, variant): with several seeds, the mean exact match and each seed's."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["family"], r["n"], r["variant"]), []).append(r)
    print("| family | examples | recipe | steps | examples seen | loss first -> last | exact match | seeds |")
    print("| --- | ---: | --- | ---: | ---: | --- | ---: | --- |")
    for (family, n, variant), rs in cells.items():
        rs = sorted(rs, key=lambda r: r.get("seed", 0))
        em = sum(r["exact_match"] for r in rs) / len(rs)
        per_seed = ", ".join(f"{r.get('seed', 0)}: {100 * r['exact_match']:.0f}%" for r in rs)
        if variant == "base":
            print(f"| {family} | - | base model | - | - | - | {100 * em:.0f}% | {per_seed} |")
            continue
        r = rs[0]
        steps = f"{r['steps']}" + (f" of {r['schedule_steps']}" if r["capped"] else "")
        first = sum(x["loss_first"] for x in rs) / len(rs)
        last = sum(x["loss_last"] for x in rs) / len(rs)
        print(f"| {family} | {n} | {variant} | {steps} | {r['examples_seen']} | {first:.2f} -> {last:.2f} | "
              f"{100 * em:.0f}% | {per_seed} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "recipe_grid"), help="results and run dirs")
    p.add_argument("--families", default=",".join(make_demo_data.RECIPE_FAMILIES + ("demo",)),
                   help="comma-separated: recipe families of scripts/make_demo_data.py, and demo")
    p.add_argument("--sizes", default="200,2000,20000", help="train examples per cell (demo: always its 400)")
    p.add_argument("--recipes", default="base,default,official",
                   help=f"comma-separated variants: base (no training), {', '.join(VARIANTS)}")
    p.add_argument("--max-steps", type=int, default=250, help="optimizer steps at most per cell")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds; each is a cell of its own")
    p.add_argument("--table", action="store_true", help="print the results table and exit")
    args = p.parse_args(argv)
    if args.table:
        print_table(read_results(args.out))
        return 0
    os.makedirs(args.out, exist_ok=True)
    done = {(r["family"], r["n"], r["variant"], r.get("seed", 0)) for r in read_results(args.out)}
    seeds = [int(s) for s in args.seeds.split(",")]
    for variant in args.recipes.split(","):
        if variant != "base" and variant not in VARIANTS:
            p.error(f"--recipes: unknown variant {variant!r}")
    for seed in seeds:
        for variant in args.recipes.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                for family in args.families.split(","):
                    n = 400 if family == "demo" else size
                    if variant == "base":
                        n = 0
                    if (family, n, variant, seed) in done:
                        continue
                    print(f"== {family} n={n} {variant} seed {seed}", flush=True)
                    row = {"family": family, "n": n, "variant": variant, "seed": seed,
                           **run_cell(args.out, family, n if n else 200, variant, args.max_steps, seed)}
                    print(json.dumps(row), flush=True)
                    with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
                    done.add((family, n, variant, seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
