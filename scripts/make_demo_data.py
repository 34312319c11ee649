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


FAMILIES = {"date": make_date, "unit": make_unit, "sort": make_sort, "json": make_json}


def generate(seed: int, n_train_per_task: int, n_eval_per_task: int, families=tuple(FAMILIES)
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
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated task families (default: {','.join(FAMILIES)})")
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
