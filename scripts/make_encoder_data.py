#!/usr/bin/env python
"""Generate small NER, SRL and extractive-QA sets for the encoder variant (issue 19; the paper's Table 5 tasks).

  ner  -- CoNLL-2003-like sentences from templates with person / location / organisation / misc names; two
          columns "token tag", BIO tags PER, LOC, ORG, MISC; files start with a -DOCSTART- line.
  srl  -- two-clause sentences with one marked predicate; three columns "token predicate tag": the predicate
          column is "-" except on the marked verb (its own text); BIO tags ARG0, ARG1, ARGM-LOC, ARGM-TMP and
          B-V around that predicate only (the other clause is O, so the predicate column is needed).
  qa   -- SQuAD v1.1 JSON: short biographies and city profiles built from templates, questions whose answers are
          spans of the passage (answer_start is where the generator put the text).

Layout (what lladapter_ext.encoder_tasks reads: read_conll, read_tags, read_squad):

    <out>/ner/{train,eval}.txt  <out>/ner/tags.txt
    <out>/srl/{train,eval}.txt  <out>/srl/tags.txt
    <out>/qa/{train,eval}.json

Deterministic: random.Random(seed); the same arguments give byte-identical files.

    python scripts/make_encoder_data.py OUT                       # 400 train + 100 eval of each task
    python scripts/make_encoder_data.py OUT --n-train 64 --n-eval 16 --seed 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

FIRST = ["John", "Mary", "Ahmed", "Li", "Sofia", "Pierre", "Olga", "Kenji", "Amara", "Lucas", "Ingrid", "Rahul",
         "Elena", "Tomasz", "Grace", "Diego", "Hannah", "Yusuf", "Chloe", "Mateo"]
LAST = ["Smith", "Garcia", "Okafor", "Chen", "Rossi", "Dubois", "Ivanova", "Tanaka", "Mensah", "Silva", "Larsen",
        "Patel", "Petrova", "Nowak", "Kim", "Fernandez", "Weber", "Demir", "Martin", "Lopez"]
LOCATIONS = ["Paris", "Berlin", "Lagos", "Tokyo", "Lima", "Oslo", "Nairobi", "Madrid", "Toronto", "Hanoi", "Cairo",
             "New York", "Buenos Aires", "Cape Town", "Hong Kong", "Rio de Janeiro", "Kuala Lumpur", "Warsaw",
             "Istanbul", "Melbourne"]
ORGS = ["Reuters", "Siemens", "the United Nations", "Toyota", "Greenpeace", "the World Bank", "Nestle",
        "Deutsche Bank", "Airbus", "the Red Cross", "Samsung Electronics", "General Motors", "Oxfam", "UNESCO",
        "the European Commission", "Petrobras", "Unilever", "Bayer", "Nokia", "the IMF"]
MISC = ["French", "German", "Japanese", "Brazilian", "Olympic", "Nobel", "Christmas", "Islamic", "Euro",
        "World Cup", "Grand Prix", "Australian Open", "Kenyan", "Polish", "Turkish", "Dutch"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

# NER templates: {PER} {LOC} {ORG} {MISC} slots, other tokens are O (split on spaces)
NER_TEMPLATES = [
    "{PER} visited {LOC} on {DAY} .",
    "{ORG} said on {DAY} it would open an office in {LOC} .",
    "{PER} , a spokesman for {ORG} , declined to comment .",
    "The {MISC} team beat {LOC} 2 - 1 in the final .",
    "{PER} won the {MISC} title after a long match against {PER} .",
    "Shares in {ORG} fell 3 percent in {LOC} trading .",
    "{ORG} and {ORG} signed a deal worth 40 million dollars .",
    "{PER} told reporters in {LOC} that talks with {ORG} had stalled .",
    "Police in {LOC} arrested two men on {DAY} .",
    "The {MISC} government appointed {PER} as ambassador to {LOC} .",
    "{PER} joined {ORG} in {MONTH} .",
    "Rain delayed the {MISC} race in {LOC} .",
]

# SRL: clause = ARG0 V ARG1 [ARGM-LOC] [ARGM-TMP]; two clauses joined by a conjunction, one predicate marked
AGENTS = ["the farmer", "John", "the company", "Mary", "the old man", "the committee", "Sofia", "the students",
          "a young engineer", "the police"]
VERBS = [("bought", ["a new car", "the house", "two tickets", "some bread"]),
         ("sold", ["the company", "old books", "the farm", "fresh fish"]),
         ("painted", ["the fence", "a portrait", "the kitchen", "the old boat"]),
         ("repaired", ["the bridge", "a broken radio", "the roof", "the engine"]),
         ("wrote", ["a letter", "the report", "a short novel", "three songs"]),
         ("found", ["the keys", "a lost dog", "an old map", "the missing file"]),
         ("visited", ["the museum", "her parents", "the factory", "a hospital"]),
         ("announced", ["the results", "a new plan", "the merger", "its decision"])]
PLACES = ["in the village", "at the market", "in Berlin", "near the river", "in the city centre", "at home",
          "in Lagos", "on the island"]
TIMES = ["yesterday", "last week", "on Monday", "in 1998", "this morning", "after the meeting", "in the spring",
         "at noon"]
CONJ = ["and", "while", "but", "because"]

# QA: passages from templates; each fact is a slot whose text is the answer of a question
FIELDS = ["physics", "medicine", "economics", "music", "architecture", "law", "chemistry", "history"]
JOBS = ["a teacher", "an engineer", "a journalist", "a doctor", "a pilot", "a lawyer", "a chef", "a farmer"]
INDUSTRIES = ["shipbuilding", "textiles", "tourism", "coffee exports", "software", "steel", "fishing", "banking"]
RIVERS = ["the Orla", "the Vistra", "the Kamen", "the Dalen", "the Sava", "the Morna", "the Tessel"]


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def ner_sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for piece in rng.choice(NER_TEMPLATES).split():
        kind = piece[1:-1] if piece.startswith("{") else None
        if kind in ("PER", "LOC", "ORG", "MISC"):
            text = {"PER": _name(rng) if rng.random() < 0.7 else rng.choice(LAST), "LOC": rng.choice(LOCATIONS),
                    "ORG": rng.choice(ORGS), "MISC": rng.choice(MISC)}[kind]
            toks = text.split()
            if toks[0] == "the":  # "the United Nations": the article is outside the entity, as in CoNLL-2003
                words.append("the")
                tags.append("O")
                toks = toks[1:]
            words += toks
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(toks) - 1)
        else:
            word = {"DAY": rng.choice(DAYS), "MONTH": rng.choice(MONTHS)}.get(kind, piece)
            words.append(word)
            tags.append("O")
    if words[0] == "the":
        words[0] = "The"
    return words, tags


def _clause(rng: random.Random) -> list[tuple[str, str]]:
    """[(phrase, role)] of one clause in its order."""
    verb, objects = rng.choice(VERBS)
    parts = [(rng.choice(AGENTS), "ARG0"), (verb, "V"), (rng.choice(objects), "ARG1")]
    mods = [(rng.choice(PLACES), "ARGM-LOC")] if rng.random() < 0.6 else []
    if rng.random() < 0.6:
        mods.append((rng.choice(TIMES), "ARGM-TMP"))
    rng.shuffle(mods)
    if mods and rng.random() < 0.25:  # a fronted modifier: "Yesterday , the farmer bought ..."
        return [mods[0], (",", None)] + parts + mods[1:]
    return parts + mods


def srl_sentence(rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """(words, predicate column, tags) of two clauses with the predicate of one of them marked."""
    clauses = [_clause(rng), _clause(rng)]
    target = rng.randrange(2)
    words, pred, tags = [], [], []
    for c, clause in enumerate(clauses):
        if c == 1:
            words.append(rng.choice(CONJ))
            pred.append("-")
            tags.append("O")
        for phrase, role in clause:
            toks = phrase.split()
            for i, t in enumerate(toks):
                words.append(t)
                pred.append(t if (c == target and role == "V") else "-")
                tags.append("O" if c != target or role is None else ("B-" if i == 0 else "I-") + role)
    words[0] = words[0][0].upper() + words[0][1:]
    words.append(".")
    pred.append("-")
    tags.append("O")
    return words, pred, tags


def _passage(rng: random.Random, pieces: list) -> tuple[str, dict[str, tuple[str, int]]]:
    """Join text pieces; a piece (key, text) is a fact whose place is recorded: {key: (text, start)}."""
    out, facts = "", {}
    for p in pieces:
        if isinstance(p, tuple):
            facts[p[0]] = (p[1], len(out))
            out += p[1]
        else:
            out += p
    return out, facts


def _answers(text: str, start: int, variants: bool) -> list[dict]:
    """The answer; with variants (evaluation sets, which list several annotators' answers) also the text without
    a leading article ("United Nations" for "the United Nations")."""
    out = [{"text": text, "answer_start": start}]
    first, _, rest = text.partition(" ")
    if variants and rest and first.lower() in ("a", "an", "the"):
        out.append({"text": rest, "answer_start": start + len(first) + 1})
    return out


def qa_article(rng: random.Random, n: int, variants: bool = False) -> dict:
    """One SQuAD article (one paragraph, 2-4 questions about it); question ids f"q{n}-{k}"."""
    if rng.random() < 0.5:
        person, city, other = _name(rng), rng.choice(LOCATIONS), rng.choice(LOCATIONS)
        year, org = str(rng.randrange(1920, 2001)), rng.choice(ORGS)
        ctx, f = _passage(rng, [person, " was born in ", ("city", city), " in ", ("year", year), ". ",
                                "After working as ", ("job", rng.choice(JOBS)), ", ", person.split()[0],
                                " studied ", ("field", rng.choice(FIELDS)), " and later joined ", ("org", org),
                                ". In ", ("moved", str(int(year) + rng.randrange(20, 40))), " the family moved to ",
                                ("other", other), "."])
        qs = {"city": f"Where was {person} born?", "year": f"In which year was {person} born?",
              "job": f"What did {person} work as before studying?", "field": f"What did {person} study?",
              "org": f"Which organisation did {person} join?", "moved": "When did the family move?",
              "other": f"Where did the family of {person} move to?"}
        title = person
    else:
        city, river = rng.choice(LOCATIONS), rng.choice(RIVERS)
        pop = f"{rng.randrange(2, 900)},000"
        ctx, f = _passage(rng, [city, " lies on ", ("river", river), " and has about ", ("pop", pop),
                                " inhabitants. Its economy depends on ", ("industry", rng.choice(INDUSTRIES)),
                                ". The old town was founded in ", ("founded", str(rng.randrange(900, 1800))),
                                " by ", ("founder", _name(rng)), "."])
        qs = {"river": f"On which river does {city} lie?", "pop": f"How many people live in {city}?",
              "industry": f"What does the economy of {city} depend on?",
              "founded": f"When was the old town of {city} founded?", "founder": f"Who founded {city}?"}
        title = city
    keys = rng.sample(sorted(qs), rng.randint(2, 4))
    qas = [{"id": f"q{n}-{k}", "question": qs[key], "answers": _answers(*f[key], variants)}
           for k, key in enumerate(keys)]
    return {"title": title, "paragraphs": [{"context": ctx, "qas": qas}]}


def _conll(rows: list[list[list[str]]]) -> str:
    """-DOCSTART-, then one sentence (a list of columns) per block."""
    blocks = ["\n".join(" ".join(r) for r in zip(*cols)) for cols in rows]
    return "-DOCSTART- O\n\n" + "\n\n".join(blocks) + "\n"


def _tags(kinds: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    return ["O", *extra, *[f"{p}-{k}" for k in kinds for p in "BI"]]


NER_TAGS = _tags(["PER", "LOC", "ORG", "MISC"])
SRL_TAGS = _tags(["ARG0", "ARG1", "ARGM-LOC", "ARGM-TMP"], ("B-V",))


def generate(out: str, n_train: int = 400, n_eval: int = 100, seed: int = 0) -> dict[str, str]:
    """Write the three tasks under out; returns {"ner"|"srl"|"qa": directory}."""
    rng = random.Random(seed)
    dirs = {t: os.path.join(out, t) for t in ("ner", "srl", "qa")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    for split, n in (("train", n_train), ("eval", n_eval)):
        ner = [list(ner_sentence(rng)) for _ in range(n)]
        srl = [list(srl_sentence(rng)) for _ in range(n)]
        articles, count = [], 0
        while count < n:
            art = qa_article(rng, len(articles), variants=split == "eval")
            art["paragraphs"][0]["qas"] = art["paragraphs"][0]["qas"][:n - count]
            count += len(art["paragraphs"][0]["qas"])
            articles.append(art)
        for task, text in (("ner", _conll(ner)), ("srl", _conll(srl))):
            with open(os.path.join(dirs[task], f"{split}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
        with open(os.path.join(dirs["qa"], f"{split}.json"), "w", encoding="utf-8") as f:
            json.dump({"version": "1.1", "data": articles}, f, indent=1)
            f.write("\n")
    for task, tags in (("ner", NER_TAGS), ("srl", SRL_TAGS)):
        with open(os.path.join(dirs[task], "tags.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(tags) + "\n")
    return dirs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output directory (ner/, srl/ and qa/ are created in it)")
    ap.add_argument("--n-train", type=int, default=400, help="training sentences / questions per task")
    ap.add_argument("--n-eval", type=int, default=100, help="evaluation sentences / questions per task")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n_train < 1 or args.n_eval < 1:
        ap.error("--n-train and --n-eval must be positive")
    dirs = generate(args.out, args.n_train, args.n_eval, args.seed)
    for task, d in dirs.items():
        print(f"{task}: {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
