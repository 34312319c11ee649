"""A miniature, honest version of the paper's ViT table (VTAB-1k) on real data: Fashion-MNIST.

No ViT weights can be reached from here, so the frozen backbone is pre-trained by this script: a small ViT
learns the first five Fashion-MNIST classes (T-shirt/top, Trouser, Pullover, Dress, Coat). It is then frozen
and adapted to the other five (Sandal, Shirt, Sneaker, Bag, Ankle boot) from 1000 training images (200 per
class, as in VTAB-1k) with

  1. linear probe        - a new head on the frozen pooled feature
  2. full fine-tuning    - every weight trains
  3. VPT-style prompts   - K prompt tokens in the top L blocks, in the same softmax as the image tokens, no gate
  4. zero-init gated     - LLaMA-Adapter: K prompts in the top L blocks, separate softmax, per-head gate at zero

and each is evaluated on all 5000 test images of the five new classes. It prints a table of trainable
parameters, training time and accuracy. Whatever comes out is what it prints; one seed per run (--seed).

Data: Debian's dataset-fashion-mnist package (`apt-get install dataset-fashion-mnist`) puts the original IDX
files (gzip) in /usr/share/datasets/fashion-mnist; --data-dir points elsewhere.

    python examples/vit_adapter_fashion_mnist.py            # the defaults below: a few minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import gzip
import math
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lladapter_ext.vit import VisionTransformer, ViTConfig  # noqa: E402

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
BASE, NOVEL = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (optionally gzip): magic 0x0000 | dtype 0x08 (uint8) | ndim, then ndim big-endian uint32 sizes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (header {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ValueError(f"{path}: {len(body)} data bytes, header says {dims}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*dims)


def load_fashion_mnist(data_dir: str):
    def split(prefix):
        x = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
        y = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")).long()
        # [N, 1, 28, 28], scaled to roughly zero mean / unit variance (Fashion-MNIST: mean 0.286, std 0.353)
        return (x.float().unsqueeze(1) / 255.0 - 0.286) / 0.353, y
    return split("train"), split("t10k")


def subset(x, y, classes, per_class, gen):
    """per_class random examples of each class (None: all), labels remapped to 0..len(classes)-1."""
    xs, ys = [], []
    for new, c in enumerate(classes):
        idx = (y == c).nonzero().flatten()
        if per_class is not None:
            idx = idx[torch.randperm(len(idx), generator=gen)[:per_class]]
        xs.append(x[idx])
        ys.append(torch.full((len(idx),), new))
    return torch.cat(xs), torch.cat(ys)


def train(model, params, x, y, epochs, lr, batch_size, gen, weight_decay=0.05, log=None):
    """AdamW, 1 warm-up epoch then half-cycle cosine stepped every iteration; returns wall seconds."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    per_epoch = -(-len(y) // batch_size)
    total, warm = epochs * per_epoch, min(per_epoch, epochs * per_epoch // 2)

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        loss_sum = 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        if log:
            log(f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / len(y):.4f}")
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(model, x, y, batch_size=500) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--patch", type=int, default=7)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--pretrain-per-class", type=int, default=1000)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--adapt-per-class", type=int, default=200, help="VTAB-1k: 1000 images over 5 classes")
    ap.add_argument("--adapt-epochs", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--adapter-layers", type=int, default=3, help="L: adapted top blocks")
    ap.add_argument("--prompt-len", type=int, default=8, help="K: prompt tokens per adapted block")
    ap.add_argument("--lr-probe", type=float, default=1e-2)
    ap.add_argument("--lr-full", type=float, default=5e-4)
    ap.add_argument("--lr-prompt", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log = print if args.verbose else None

    (train_x, train_y), (test_x, test_y) = load_fashion_mnist(args.data_dir)
    pre_x, pre_y = subset(train_x, train_y, BASE, args.pretrain_per_class, gen)
    pre_test = subset(test_x, test_y, BASE, args.test_per_class, gen)
    ada_x, ada_y = subset(train_x, train_y, NOVEL, args.adapt_per_class, gen)
    ada_test = subset(test_x, test_y, NOVEL, args.test_per_class, gen)

    cfg = ViTConfig(img_size=28, patch_size=args.patch, in_chans=1, embed_dim=args.dim, depth=args.depth,
                    num_heads=args.heads, num_classes=len(BASE))
    backbone = VisionTransformer(cfg)
    print(f"pre-training a ViT (patch {args.patch}, dim {args.dim}, depth {args.depth}, heads {args.heads}; "
          f"{sum(p.numel() for p in backbone.parameters()):,} params) on {len(pre_y)} images of "
          f"{', '.join(CLASS_NAMES[c] for c in BASE)}")
    pre_s = train(backbone, list(backbone.parameters()), pre_x, pre_y, args.pretrain_epochs, args.pretrain_lr,
                  128, gen, log=log)
    pre_acc = accuracy(backbone, *pre_test)
    print(f"  {pre_s:.0f} s; test accuracy on those classes: {100 * pre_acc:.2f}% ({len(pre_test[1])} images)")
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}

    def fresh_model():
        m = VisionTransformer(ViTConfig(**{**cfg.__dict__, "num_classes": len(BASE)}))
        m.load_state_dict(frozen)
        m.reset_head(len(NOVEL))  # zero-initialised task head for the new classes
        return m

    print(f"adapting to {', '.join(CLASS_NAMES[c] for c in NOVEL)} from {len(ada_y)} images "
          f"({args.adapt_epochs} epochs), testing on {len(ada_test[1])} images")
    rows = []

    # 1. linear probe: the frozen pooled features are computed once, then only the head trains
    m = fresh_model()
    t0 = time.perf_counter()
    with torch.no_grad():
        m.eval()
        feats = torch.cat([m.pool(m.forward_features(ada_x[i:i + 500])) for i in range(0, len(ada_y), 500)])
    head = m.head
    probe_s = train(head, list(head.parameters()), feats, ada_y, args.adapt_epochs, args.lr_probe,
                    args.batch_size, gen, log=log)
    rows.append(dict(method="linear probe", params=sum(p.numel() for p in head.parameters()),
                     seconds=time.perf_counter() - t0, acc=accuracy(m, *ada_test), note=f"lr {args.lr_probe:g}"))
    del probe_s

    # 2. full fine-tuning
    m = fresh_model()
    s = train(m, list(m.parameters()), ada_x, ada_y, args.adapt_epochs, args.lr_full, args.batch_size, gen, log=log)
    rows.append(dict(method="full fine-tuning", params=m.count_trainable(), seconds=s,
                     acc=accuracy(m, *ada_test), note=f"lr {args.lr_full:g}"))

    # 3. and 4. prompts in the top L blocks: joint softmax without gate (VPT-style) / zero-init gated (ours)
    for mode, name in (("joint", "VPT-style prompts (no gate)"), ("gated", "zero-init gated prompts")):
        m = fresh_model()
        m.add_adapter(num_layers=args.adapter_layers, prompt_len=args.prompt_len, mode=mode)
        m.freeze_base(train_head=True)
        params = [p for p in m.parameters() if p.requires_grad]
        s = train(m, params, ada_x, ada_y, args.adapt_epochs, args.lr_prompt, args.batch_size, gen, log=log)
        note = f"L {args.adapter_layers}, K {args.prompt_len}, lr {args.lr_prompt:g}"
        if mode == "gated":
            gates = torch.cat([b.attn.gate.detach() for b in m.blocks if b.attn.gate is not None])
            note += f", |tanh(gate)| mean {gates.tanh().abs().mean():.2f}"
        rows.append(dict(method=name, params=m.count_trainable(), seconds=s, acc=accuracy(m, *ada_test),
                         note=note))

    print()
    print("| method | trainable params | train time (s) | accuracy on new classes (%) | setting |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['params']:,} | {r['seconds']:.1f} | {100 * r['acc']:.2f} | {r['note']} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n(torch {torch.__version__}, {args.threads} threads, 1-min load average at the end {load:.1f}; "
          f"backbone pre-trained to {100 * pre_acc:.2f}% on the first five classes; seed {args.seed})")
    return rows


if __name__ == "__main__":
    main()
