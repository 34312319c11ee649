#!/usr/bin/env python
"""Generate the synthetic visual question answering set of the multi-modal demo, in ScienceQA's layout.

Every image is drawn with Pillow on a light background and gets one multiple-choice question of one of four
skills, each answerable only by looking at the picture:

  colour    -- "What colour is the shape?"            one shape; red, green, blue, yellow
  shape     -- "Which shape is shown in the picture?"  one shape; circle, square, triangle, diamond
  count     -- "How many shapes are in the picture?"   1-4 shapes of one kind and colour; 1, 2, 3, 4
  position  -- "Where is the shape in the picture?"   one shape near the left/right/top/bottom edge

Every skill has 4 options listed in a fixed order (``--shuffle-choices`` shuffles them per question, which
makes the task a harder binding problem: the model must match the picture to the option text, not to a
letter). Skills and correct answers are balanced, so the correct letter is too: a model that cannot see the
picture can do no better than chance, 25%. Irrelevant attributes (colour, kind, size, exact place, background
shade) vary at random so no single pixel statistic answers every skill.

Layout (what lladapter_ext.mm_data.load_scienceqa reads; the real ScienceQA has the same):

    <out>/problems.json            {pid: {question, choices, answer, hint, image, split, skill}}
    <out>/pid_splits.json          {"train": [pid, ...], "test": [pid, ...]}
    <out>/images/<split>/<pid>/image.png

Deterministic: random.Random(seed); the same arguments give byte-identical files.

    python scripts/make_vqa_data.py                      # data/vqa: 400 train + 100 test, 128x128 images
    python scripts/make_vqa_data.py --out DIR --n-train 40 --n-test 20 --size 64
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
OTHER_COLOURS = [(140, 60, 180), (245, 130, 20), (120, 120, 120)]  # purple, orange, grey: never asked about
KINDS = ("circle", "square", "triangle", "diamond")
SIDES = ("left", "right", "top", "bottom")
SKILLS = ("colour", "shape", "count", "position")
LETTERS = "ABCD"


def draw_shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        s = r * 0.85
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=fill)
    elif kind == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


def canvas(rng: random.Random, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    shade = rng.randint(225, 250)
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    return img, ImageDraw.Draw(img)


def place_apart(rng: random.Random, n: int, size: int, r: float) -> list[tuple[float, float]]:
    """n centres inside the canvas whose shapes (radius r) do not touch; deterministic given rng."""
    for _ in range(1000):
        pts = [(rng.uniform(r * 1.2, size - r * 1.2), rng.uniform(r * 1.2, size - r * 1.2)) for _ in range(n)]
        if all(math.dist(a, b) > 2.3 * r for i, a in enumerate(pts) for b in pts[i + 1:]):
            return pts
    raise RuntimeError(f"could not place {n} shapes of radius {r} on a {size}px canvas")


def make_item(rng: random.Random, skill: str, answer_value: str, size: int) -> tuple[Image.Image, dict]:
    img, d = canvas(rng, size)
    fill = rng.choice(list(COLOURS.values()) + OTHER_COLOURS)  # for the skills that are not about colour
    kind = rng.choice(KINDS)
    r = size * rng.uniform(0.12, 0.2)
    if skill == "colour":
        cx, cy = (rng.uniform(size * 0.3, size * 0.7) for _ in range(2))
        draw_shape(d, kind, cx, cy, r, COLOURS[answer_value])
        question, pool = "What colour is the shape?", list(COLOURS)
    elif skill == "shape":
        kind = answer_value
        cx, cy = (rng.uniform(size * 0.3, size * 0.7) for _ in range(2))
        draw_shape(d, kind, cx, cy, r, fill)
        question, pool = "Which shape is shown in the picture?", list(KINDS)
    elif skill == "count":
        n = int(answer_value)
        r = size * rng.uniform(0.08, 0.12)
        for cx, cy in place_apart(rng, n, size, r):
            draw_shape(d, kind, cx, cy, r, fill)
        question, pool = "How many shapes are in the picture?", ["1", "2", "3", "4"]
    elif skill == "position":
        near, far = size * rng.uniform(0.18, 0.24), size * rng.uniform(0.35, 0.65)
        cx, cy = {"left": (near, far), "right": (size - near, far), "top": (far, near),
                  "bottom": (far, size - near)}[answer_value]
        r = size * rng.uniform(0.1, 0.15)
        draw_shape(d, kind, cx, cy, r, fill)
        question, pool = "Where is the shape in the picture?", list(SIDES)
    else:
        raise ValueError(f"unknown skill {skill!r}")
    return img, {"question": question, "choices": pool}


def generate(out: str, n_train: int, n_test: int, size: int, seed: int, shuffle_choices: bool = False) -> dict:
    rng = random.Random(seed)
    problems: dict[str, dict] = {}
    splits: dict[str, list[str]] = {"train": [], "test": []}
    values = {"colour": list(COLOURS), "shape": list(KINDS), "count": ["1", "2", "3", "4"], "position": list(SIDES)}
    pid = 0
    for split, n in (("train", n_train), ("test", n_test)):
        # balanced plan: skills round-robin, answer values cycle per skill, correct letters cycle per skill
        plan = [SKILLS[i % len(SKILLS)] for i in range(n)]
        rng.shuffle(plan)
        seen = {s: 0 for s in SKILLS}
        letter_order = {s: rng.sample(range(len(LETTERS)), len(LETTERS)) for s in SKILLS}
        for skill in plan:
            k = seen[skill]
            seen[skill] += 1
            vals = values[skill]
            answer_value = vals[k % len(vals)]
            img, item = make_item(rng, skill, answer_value, size)
            choices = list(item["choices"])
            if shuffle_choices:  # the correct letter cycles through a fresh permutation every 4 questions
                answer = letter_order[skill][k % len(LETTERS)]
                choices.remove(answer_value)
                rng.shuffle(choices)
                choices.insert(answer, answer_value)
            else:
                answer = choices.index(answer_value)
            key = f"{pid:05d}"
            pid += 1
            rel = os.path.join("images", split, key)
            os.makedirs(os.path.join(out, rel), exist_ok=True)
            img.save(os.path.join(out, rel, "image.png"), optimize=True)
            problems[key] = {"question": item["question"], "choices": choices, "answer": answer, "hint": "",
                             "image": "image.png", "split": split, "skill": skill}
            splits[split].append(key)
            if k % len(LETTERS) == len(LETTERS) - 1:
                letter_order[skill] = rng.sample(range(len(LETTERS)), len(LETTERS))
    with open(os.path.join(out, "problems.json"), "w", encoding="utf-8") as f:
        json.dump(problems, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out, "pid_splits.json"), "w", encoding="utf-8") as f:
        json.dump(splits, f, indent=1)
        f.write("\n")
    return problems


def main(argv=None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(root, "data", "vqa"), help="output directory")
    p.add_argument("--n-train", type=int, default=400, help="training questions (one image each)")
    p.add_argument("--n-test", type=int, default=100, help="held-out questions (one image each)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-choices", action="store_true", help="shuffle the options of every question")
    args = p.parse_args(argv)
    if args.n_train < 1 or args.n_test < 1 or args.size < 32:
        p.error("--n-train and --n-test must be >= 1 and --size >= 32")
    os.makedirs(args.out, exist_ok=True)
    problems = generate(args.out, args.n_train, args.n_test, args.size, args.seed, args.shuffle_choices)
    print(f"wrote {len(problems)} questions ({args.n_train} train, {args.n_test} test) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
