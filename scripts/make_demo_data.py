#!/usr/bin/env python
"""Generate the bundled demo instruction-tuning data set (data/demo/{train,eval}.jsonl).

Four task families whose answers are checkable by exact match and follow a fixed output format that a small
instruct model does not produce zero-shot, while the mapping itself is simple enough for a LLaMA-Adapter to
learn in minutes:

  date  -- a date written in words ("March 5, 2021", "5 Mar 2021", ...) -> ISO "2021-03-05"
  unit  -- an integer quantity in km/kg/m/L -> the same quantity in m/g/cm/mL, written "<number> <unit>"
  sort  -- three or four numbers -> the same numbers in ascending order, comma separated
  json  -- a sentence about a person -> compact JSON {"name":...,"age":...,"city":...}

Records are Alpaca-style (instruction, input, output) plus a "task" key naming the family; the query is part of
the instruction and "input" is empty, so the shorter no-input Alpaca template applies (about 50-70 tokens per
example with the SmolLM2 tokenizer, which keeps CPU training fast). The generator is deterministic
(random.Random(seed)); an instruction never occurs twice, so no eval example is in the train split. Everything is
synthetic:
names and cities are drawn from short lists written here.

    python scripts/make_demo_data.py                 # writes data/demo/train.jsonl and data/demo/eval.jsonl
    python scripts/make_demo_data.py --check         # regenerates in memory and fails if the files differ
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
FIRST_NAMES = ["Maria", "John", "Aiko", "Omar", "Lena", "Pedro", "Grace", "Ivan", "Fatima", "Lucas", "Nina",
               "Samuel", "Chloe", "Ravi", "Elena", "Tom", "Yara", "Hugo", "Mei", "Oscar", "Sara", "Felix", "Amara",
               "Jonas"]
LAST_NAMES = ["Lopez", "Smith", "Tanaka", "Haddad", "Novak", "Silva", "Kim", "Petrov", "Mensah", "Moreau",
              "Berg", "Rossi", "Okafor", "Nguyen", "Costa", "Weber", "Khan", "Fischer", "Diaz", "Larsen"]
CITIES = ["Lisbon", "Paris", "Osaka", "Cairo", "Prague", "Lima", "Seoul", "Oslo", "Accra", "Lyon", "Dublin",
          "Quito", "Hanoi", "Porto", "Vienna", "Nairobi", "Bergen", "Madrid", "Denver", "Perth"]

# (source unit, target unit, target unit's name in the instruction, factor)
UNITS = [("km", "m", "metres", 1000), ("kg", "g", "grams", 1000), ("m", "cm", "centimetres", 100),
         ("L", "mL", "millilitres", 1000)]

DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def make_date(rng: random.Random) -> dict:
    year = rng.randint(1950, 2049)
    month = rng.randint(1, 12)
    day = rng.randint(1, DAYS_IN_MONTH[month - 1])
    name = MONTHS[month - 1]
    written = rng.choice([
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"{name[:3]} {day}, {year}",
        f"the {_ordinal(day)} of {name} {year}",
    ])
    return {"task": "date", "instruction": f"Rewrite this date as YYYY-MM-DD: {written}", "input": "",
            "output": f"{year:04d}-{month:02d}-{day:02d}"}


def make_unit(rng: random.Random) -> dict:
    src, dst, dst_name, factor = rng.choice(UNITS)
    value = rng.randint(1, 999)
    return {"task": "unit", "instruction": f"Convert {value} {src} to {dst_name}.", "input": "",
            "output": f"{value * factor} {dst}"}


def make_sort(rng: random.Random) -> dict:
    numbers = rng.sample(range(1, 100), rng.choice([3, 4]))
    return {"task": "sort", "instruction": "Sort in ascending order: " + ", ".join(map(str, numbers)), "input": "",
            "output": ", ".join(map(str, sorted(numbers)))}


def make_json(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    age = rng.randint(18, 89)
    city = rng.choice(CITIES)
    sentence = rng.choice([
        f"{name} is {age} and lives in {city}.",
        f"{name}, aged {age}, lives in {city}.",
        f"Living in {city}, {name} is {age} years old.",
    ])
    answer = json.dumps({"name": name, "age": age, "city": city}, separators=(",", ":"))
    return {"task": "json", "instruction": f"Give name, age and city as JSON: {sentence}", "input": "",
            "output": answer}


# Task families for measuring fine-tuning recipes (docs/recipe.md), unlike the demo's: a string transformation, a
# classification into a fixed label set and a short extraction. Their vocabularies are generated (syllable names,
# random codes, clause combinations), so 20,000+ distinct instructions exist per family.
SYLLABLES = ["ka", "ro", "mi", "ta", "ne", "lo", "su", "vi", "da", "re", "po", "li", "ga", "mo", "ze", "fu", "ba",
             "ti", "no", "sa", "ke", "ru", "ha", "yo", "be", "di", "pa", "lu", "me", "wo"]
PRODUCTS = ["blender", "jacket", "laptop", "kettle", "backpack", "lamp", "phone case", "novel", "tent", "bicycle",
            "headset", "chair", "watch", "camera", "desk", "umbrella", "printer", "sofa", "scarf", "toaster",
            "keyboard", "mattress", "drill", "guitar", "stroller", "heater", "mixer", "router", "boots", "monitor"]
GOOD = ["works perfectly", "arrived early", "feels very sturdy", "was worth every cent", "exceeded my hopes",
        "is easy to use", "looks beautiful", "runs quietly", "was simple to set up", "lasts for days"]
BAD = ["broke within a week", "arrived damaged", "feels flimsy", "was a waste of money", "stopped working",
       "is hard to use", "looks cheap", "is far too loud", "was missing parts", "drains in an hour"]
SENTIMENT_OPENERS = ["I bought a {p} last month.", "Review of the {p}:", "Our new {p} arrived.",
                     "Got the {p} as a gift.", "Been using this {p} for a while."]


def _syllable_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_handle(rng: random.Random) -> dict:
    """String transformation: a person's name, written one of several ways -> the handle first.last, lowercase."""
    first, last = _syllable_name(rng), _syllable_name(rng)
    written = rng.choice([f"{first} {last}", f"{last}, {first}", f"{first.upper()} {last.upper()}",
                          f"Dr. {first} {last}"])
    return {"task": "handle", "instruction": f"Make a lowercase first.last handle for: {written}", "input": "",
            "output": f"{first.lower()}.{last.lower()}"}


def make_sentiment(rng: random.Random) -> dict:
    """Classification into {positive, negative, mixed}: a short product review of two clauses."""
    product = rng.choice(PRODUCTS)
    label = rng.choice(["positive", "negative", "mixed"])
    if label == "positive":
        a, b = rng.sample(GOOD, 2)
    elif label == "negative":
        a, b = rng.sample(BAD, 2)
    else:
        a, b = rng.choice(GOOD), rng.choice(BAD)
        if rng.random() < 0.5:
            a, b = b, a
    link = rng.choice([" and it", ", and it", "; it also", " but it" if label == "mixed" else " and it"])
    review = f"{rng.choice(SENTIMENT_OPENERS).format(p=product)} It {a}{link} {b}."
    return {"task": "sentiment", "instruction": "Label the review positive, negative or mixed: " + review,
            "input": "", "output": label}


def make_extract(rng: random.Random) -> dict:
    """Short extraction: the order code (two letters, a dash, five digits) from a message with other numbers."""
    code = f"{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}-{rng.randint(0, 99999):05d}"
    qty, day = rng.randint(2, 12), rng.randint(1, 28)
    message = rng.choice([
        f"Hello, I ordered {qty} items on the {_ordinal(day)} under order {code} and one is missing.",
        f"Order {code} ({qty} boxes) was due on day {day} but has not arrived.",
        f"My parcel with {qty} parts, reference {code}, came on the {_ordinal(day)} damaged.",
        f"Please cancel {code}; I placed it {day} days ago for {qty} units.",
    ])
    return {"task": "extract", "instruction": f"Give only the order code in this message: {message}", "input": "",
            "output": code}


DEMO_FAMILIES = ("date", "unit", "sort", "json")
RECIPE_FAMILIES = ("handle", "sentiment", "extract")
FAMILIES = {"date": make_date, "unit": make_unit, "sort": make_sort, "json": make_json, "handle": make_handle,
            "sentiment": make_sentiment, "extract": make_extract}


def generate(seed: int, n_train_per_task: int, n_eval_per_task: int, families=DEMO_FAMILIES
             ) -> tuple[list[dict], list[dict]]:
    """Train and eval records, interleaved by family; an input never appears twice in either split."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of {list(FAMILIES)}, got {list(families)}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    per_task: dict[str, list[dict]] = {}
    for task in families:
        make = FAMILIES[task]
        records = []
        while len(records) < n_train_per_task + n_eval_per_task:
            record = make(rng)
            key = (record["instruction"], record["input"])
            if key not in seen:
                seen.add(key)
                records.append(record)
        per_task[task] = records
    # eval takes each family's first records, train the rest; both interleave the families round-robin
    train = [per_task[t][n_eval_per_task + i] for i in range(n_train_per_task) for t in families]
    evaluation = [per_task[t][i] for i in range(n_eval_per_task) for t in families]
    return train, evaluation


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=os.path.join(here, "..", "data", "demo"),
                        help="where train.jsonl and eval.jsonl go (default: data/demo)")
    parser.add_argument("--seed", type=int, default=1234, help="generator seed (default: 1234)")
    parser.add_argument("--train-per-task", type=int, default=100, help="train records per family (default: 100)")
    parser.add_argument("--eval-per-task", type=int, default=25, help="eval records per family (default: 25)")
    parser.add_argument("--families", default=",".join(DEMO_FAMILIES),
                        help=f"comma-separated task families of {','.join(FAMILIES)} (default: "
                             f"{','.join(DEMO_FAMILIES)})")
    parser.add_argument("--check", action="store_true", help="do not write; fail if the files on disk differ")
    args = parser.parse_args(argv)
    try:
        train, evaluation = generate(args.seed, args.train_per_task, args.eval_per_task,
                                     tuple(f for f in args.families.split(",") if f))
    except ValueError as e:
        parser.error(f"--families: {e}")
    outputs = {"train.jsonl": to_jsonl(train), "eval.jsonl": to_jsonl(evaluation)}
    if args.check:
        stale = []
        for name, text in outputs.items():
            path = os.path.join(args.out_dir, name)
            if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
                stale.append(path)
        if stale:
            print("out of date (rerun scripts/make_demo_data.py): " + ", ".join(stale), file=sys.stderr)
            return 1
        print("demo data up to date")
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    for name, text in outputs.items():
        with open(os.path.join(args.out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    print(f"wrote {len(train)} train and {len(evaluation)} eval records to {os.path.normpath(args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
