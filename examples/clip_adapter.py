"""Base-to-novel few-shot adaptation of CLIP with zero-init gated prompts (the paper's CLIP experiment).

Point it at CLIP weights and an image folder:

    python examples/clip_adapter.py --model-config ViT-B-16 --checkpoint /path/to/open_clip_vit_b16.pt \\
        --data /path/to/dataset --shots 16 --vision-layers 9 --text-layers 0 --epochs 10

--model-config: an open_clip model config JSON path, or the name of one in open_clip's model_configs
  (e.g. ViT-B-16, ViT-B-16-quickgelu for OpenAI's weights, ViT-L-14).
--checkpoint: an open_clip / OpenAI CLIP state dict (.pt / .bin from torch.save, .safetensors, or OpenAI's
  TorchScript archive). Nothing is downloaded.
--data: DIR/train/<class name>/<images> and DIR/test/<class name>/<images>. Class names are the folder names
  (underscores become spaces in the prompts). The sorted class list is split in half: the first half are the
  base classes (trained on, `--shots` images per class), the second half the novel classes (never trained on).

It reports zero-shot and adapted accuracy on base classes (test images of base classes, classified among the
base classes), on novel classes (likewise among the novel classes), and their harmonic mean, and can save the
adapter (prompts and gates) with --save-adapter.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lladapter_ext.clip import (CLIP, OPENAI_IMAGE_MEAN, OPENAI_IMAGE_STD, ClassNameClassifier,  # noqa: E402
                                CLIPConfig, CLIPTokenizer, harmonic_mean, load_checkpoint_file)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def resolve_config(arg: str) -> str:
    if os.path.exists(arg):
        return arg
    try:
        import open_clip
    except ImportError as e:
        raise SystemExit(f"--model-config {arg!r}: no such file, and open_clip (for its named configs) is not "
                         "installed") from e
    path = os.path.join(os.path.dirname(open_clip.__file__), "model_configs", f"{arg}.json")
    if not os.path.exists(path):
        raise SystemExit(f"--model-config {arg!r}: no such file and no open_clip config named {arg}")
    return path


def load_image(path: str, size: tuple[int, int]) -> torch.Tensor:
    """CLIP preprocessing: RGB, shorter side resized to the model size (bicubic), centre crop, normalise."""
    from PIL import Image
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = max(size[0] / h, size[1] / w)
    img = img.resize((max(size[1], round(w * s)), max(size[0], round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size[1]) // 2, (h - size[0]) // 2
    img = img.crop((left, top, left + size[1], top + size[0]))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size[0], size[1], 3)
    x = x.permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(OPENAI_IMAGE_MEAN).view(3, 1, 1), torch.tensor(OPENAI_IMAGE_STD).view(3, 1, 1)
    return (x - mean) / std


def load_split(root: str, classes: list[str], size, per_class: int | None, seed: int):
    images, labels = [], []
    gen = torch.Generator().manual_seed(seed)
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
        if per_class is not None:
            if len(files) < per_class:
                raise SystemExit(f"{folder}: {len(files)} images, fewer than --shots {per_class}")
            files = [files[i] for i in torch.randperm(len(files), generator=gen)[:per_class].tolist()]
        images += [load_image(os.path.join(folder, f), size) for f in files]
        labels += [label] * len(files)
    return torch.stack(images), torch.tensor(labels)


def evaluate(clf, base, novel, base_names, novel_names) -> dict:
    b = clf.accuracy(*base, base_names)
    n = clf.accuracy(*novel, novel_names)
    return dict(base=b, novel=n, hm=harmonic_mean(b, n))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--vision-layers", type=int, default=9)
    ap.add_argument("--text-layers", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--weight-decay", type=float, default=0.02)
    ap.add_argument("--template", default="a photo of a {}.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--save-adapter", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    cfg = CLIPConfig.from_open_clip(resolve_config(args.model_config))
    model = CLIP(cfg)
    model.load_open_clip_state_dict(load_checkpoint_file(args.checkpoint), source=args.checkpoint)
    model.to(args.device).eval()
    tokenizer = CLIPTokenizer(context_length=cfg.text.context_length)
    clf = ClassNameClassifier(model, tokenizer, args.template)

    classes = sorted(d for d in os.listdir(os.path.join(args.data, "train"))
                     if os.path.isdir(os.path.join(args.data, "train", d)))
    if len(classes) < 2:
        raise SystemExit(f"{args.data}/train: need at least 2 class folders, found {len(classes)}")
    half = (len(classes) + 1) // 2
    base_names, novel_names = classes[:half], classes[half:]
    size = cfg.vision.image_size
    train_x, train_y = load_split(os.path.join(args.data, "train"), base_names, size, args.shots, args.seed)
    base_test = load_split(os.path.join(args.data, "test"), base_names, size, None, args.seed)
    novel_test = load_split(os.path.join(args.data, "test"), novel_names, size, None, args.seed)
    base_test = (base_test[0].to(args.device), base_test[1])
    novel_test = (novel_test[0].to(args.device), novel_test[1])
    print(f"{len(base_names)} base classes ({args.shots} shots each), {len(novel_names)} novel classes; "
          f"test images: {len(base_test[1])} base, {len(novel_test[1])} novel")

    zero_shot = evaluate(clf, base_test, novel_test, base_names, novel_names)

    model.add_adapter(vision_layers=args.vision_layers, text_layers=args.text_layers, prompt_len=args.prompt_len)
    model.to(args.device)
    params = [p for n, p in model.named_parameters() if n in set(model.freeze_base())]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    steps = args.epochs * -(-len(train_y) // args.batch_size)
    # half-cycle cosine decay, stepped every iteration
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0 = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_y))
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            logits = clf(train_x[idx].to(args.device), base_names)
            loss = F.cross_entropy(logits, train_y[idx].to(args.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(train_y):.4f}")
    train_s = time.perf_counter() - t0
    model.eval()
    adapted = evaluate(clf, base_test, novel_test, base_names, novel_names)

    print(f"\ntrainable parameters: {n_params:,} (prompts and gates); training time {train_s:.1f} s")
    print(f"| {'':10} | {'base':>6} | {'novel':>6} | {'harmonic mean':>13} |")
    print(f"| {'-' * 10} | {'-' * 6} | {'-' * 6} | {'-' * 13} |")
    for name, r in (("zero-shot", zero_shot), ("adapted", adapted)):
        print(f"| {name:10} | {100 * r['base']:6.2f} | {100 * r['novel']:6.2f} | {100 * r['hm']:13.2f} |")
    if args.save_adapter:
        model.save_adapter(args.save_adapter)
        print(f"adapter saved to {args.save_adapter}")
    return dict(base_classes=base_names, novel_classes=novel_names, zero_shot=zero_shot, adapted=adapted,
                trainable_params=n_params, train_seconds=train_s)


if __name__ == "__main__":
    main()
