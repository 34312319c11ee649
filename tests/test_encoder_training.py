"""Training and evaluation of the encoder task models (lladapter_ext.encoder_training): each method trains exactly
its parameters, the schedule, determinism, the non-finite-loss error, the metrics, and a short held-out NER run on
all-MiniLM-L6-v2."""
import math
import os
import sys

import pytest
import torch

from lladapter_ext.encoder import Encoder, EncoderConfig, default_encoder_path, load_encoder, load_encoder_tokenizer
from lladapter_ext.encoder_tasks import (IGNORE_INDEX, EncoderForQuestionAnswering, EncoderForTokenClassification,
                                         QAExample, QAFeature, TokenFeatures, read_conll, read_tags, span_scores,
                                         token_features)
from lladapter_ext.encoder_training import (METHODS, count_method_parameters, evaluate_encoder_task, setup_method,
                                            train_encoder_task)
from lladapter_ext.schedule import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=40, embed_dim=32, depth=3, num_heads=4, mlp_hidden=48, max_position_embeddings=64)
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: conftest.one_torch_thread


def _encoder(seed=0):
    torch.manual_seed(seed)
    return Encoder(EncoderConfig(**TINY))


def _tag_of(tok: int) -> int:
    """A learnable toy labelling: the tag is a function of the token."""
    return 0 if tok < 20 else 1 + (tok % 4)


def _token_data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = torch.randint(3, 40, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        ids = [1, *words, 2]
        labels = [IGNORE_INDEX, *[_tag_of(w) for w in words], IGNORE_INDEX]
        out.append(TokenFeatures(ids, [0] * len(ids), labels, list(range(1, len(words) + 1)), f"toy:{i}"))
    return out


def _qa_data(n=12, seed=2):
    """Question [1, q, 2], context words 'w0 w1 ...' (2-char tokens at offsets 3k), answer = the token 30."""
    g = torch.Generator().manual_seed(seed)
    feats, examples = [], []
    for i in range(n):
        ctx_ids = torch.randint(3, 29, (6,), generator=g).tolist()
        a = int(torch.randint(0, 6, (1,), generator=g))
        ctx_ids[a] = 30
        context = " ".join(f"w{k}" for k in range(6))
        ids = [1, 5, 2, *ctx_ids, 2]
        cmask = [False] * 3 + [True] * 6 + [False]
        offsets = [(0, 0)] * 3 + [(3 * k, 3 * k + 2) for k in range(6)] + [(0, 0)]
        feats.append(QAFeature(f"q{i}", ids, [0] * 3 + [1] * 7, cmask, offsets, 3 + a, 3 + a))
        examples.append(QAExample(f"q{i}", "?", context, [(f"w{a}", 3 * a)]))
    return feats, examples


def _model(task, method, seed=0, **kw):
    model = (EncoderForTokenClassification(_encoder(), len(TAGS)) if task == "tok" else
             EncoderForQuestionAnswering(_encoder()))
    names = setup_method(model, method, num_layers=kw.get("num_layers", 2), prompt_len=3, seed=seed)
    return model, names


# --------------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("task", ["tok", "qa"])
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_exactly_its_parameters(task, method):
    model, names = _model(task, method)
    D, H, K, out = TINY["embed_dim"], TINY["num_heads"], 3, (len(TAGS) if task == "tok" else 2)
    head = D * out + out
    expect = {"gated": 2 * (K * D + H) + head, "joint": 2 * K * D + head, "linear": head,
              "full": sum(p.numel() for p in model.parameters())}[method]
    assert count_method_parameters(model, method) == expect
    if method == "linear":
        assert names == ["head.weight", "head.bias"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = _token_data() if task == "tok" else _qa_data()[0]
    res = train_encoder_task(model, data, method=method, max_steps=4, batch_size=8, lr=1e-2, head_lr=1e-2)
    assert res.trainable == names and res.num_trainable == expect and len(res.losses) == 4
    for n, p in model.named_parameters():
        if n in names:
            assert not torch.equal(p, before[n]), f"{method}: {n} did not train"
        else:
            assert torch.equal(p, before[n]), f"{method}: {n} changed"
    # requires_grad set earlier by someone else does not leak into the run
    if method != "full":
        for p in model.parameters():
            p.requires_grad_(True)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_encoder_task(model, data, method=method, max_steps=1, batch_size=8)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n not in names)


def test_method_needs_its_adapter():
    model = EncoderForTokenClassification(_encoder(), len(TAGS))
    with pytest.raises(ValueError, match="method 'gated' needs a 'gated' adapter, the model has no adapter"):
        train_encoder_task(model, _token_data(), method="gated", max_steps=1)
    setup_method(model, "joint", num_layers=1, prompt_len=2)
    with pytest.raises(ValueError, match="method 'linear' needs no adapter, the model has a 'joint' adapter"):
        train_encoder_task(model, _token_data(), method="linear", max_steps=1)
    with pytest.raises(ValueError, match="already has an adapter"):
        setup_method(model, "gated")
    with pytest.raises(ValueError, match="method must be one of"):
        setup_method(EncoderForTokenClassification(_encoder(), 3), "lora")
    with pytest.raises(ValueError, match="exactly one of epochs and max_steps"):
        train_encoder_task(model, _token_data(), method="joint")
    with pytest.raises(TypeError, match="trains on TokenFeatures"):
        train_encoder_task(model, _qa_data()[0], method="joint", max_steps=1)


# --------------------------------------------------------------------------------------------- learning
def test_loss_falls_on_a_learnable_problem():
    model, _ = _model("tok", "gated")
    data = _token_data(48)
    res = train_encoder_task(model, data, method="gated", epochs=8, batch_size=8, lr=3e-2)
    assert res.steps == 48 and len(res.losses) == 48
    first, last = sum(res.losses[:4]) / 4, sum(res.losses[-4:]) / 4
    assert last < 0.5 * first, res.losses
    assert evaluate_encoder_task(model, data, tags=TAGS)["f1"] > 0.5


def test_same_seed_same_run():
    def run(seed):
        model, _ = _model("tok", "gated", seed=seed)
        res = train_encoder_task(model, _token_data(), method="gated", max_steps=6, batch_size=4, seed=seed)
        return res.losses, {n: p.detach().clone() for n, p in model.named_adapter_parameters()}

    (l0, p0), (l1, p1), (l2, _) = run(0), run(0), run(1)
    assert l0 == l1
    assert all(torch.equal(p0[n], p1[n]) for n in p0)
    assert l0 != l2  # another seed: other prompts and another data order


def test_cpu_training_keeps_the_freed_heap(monkeypatch):
    import lladapter_ext.encoder_training as ET
    calls = []
    monkeypatch.setattr(ET, "keep_freed_heap", lambda: calls.append(1) or True)  # (test_training tests the policy)
    model, _ = _model("tok", "gated")
    train_encoder_task(model, _token_data(), method="gated", max_steps=2, batch_size=4)
    assert calls == [1]


def test_schedule_warmup_then_cosine():
    model, _ = _model("tok", "full")
    res = train_encoder_task(model, _token_data(), method="full", max_steps=10, batch_size=4, lr=1e-3, warmup=0.2)
    assert res.lr == res.head_lr == 1e-3  # an explicit lr alone sets the head's too
    assert res.lrs == [lr_at(s, base_lr=1e-3, total_steps=10, warmup_steps=2) for s in range(10)]
    assert res.lrs[0] == pytest.approx(5e-4) and res.lrs[1] == pytest.approx(1e-3)  # peak right after warmup
    assert res.lrs[2] == pytest.approx(1e-3)  # the cosine starts at the peak ...
    assert all(a > b for a, b in zip(res.lrs[2:], res.lrs[3:]))  # ... and only falls after
    # default lr: the method's own
    gated, _ = _model("tok", "gated")
    res = train_encoder_task(gated, _token_data(), method="gated", max_steps=1)
    assert res.lr == res.head_lr == METHODS["gated"].lr
    # full fine-tuning: the encoder at lr, the new head at head_lr. Adam's first step moves each weight with a
    # gradient by the step's lr (no warmup: the peak), so the step sizes show the two rates
    full, _ = _model("tok", "full")
    torch.nn.init.normal_(full.head.weight, std=0.02)  # a zero head passes no gradient to the encoder
    before = {n: p.detach().clone() for n, p in full.named_parameters()}
    res = train_encoder_task(full, _token_data(), method="full", max_steps=1, warmup=0.0)
    spec = METHODS["full"]
    assert (res.lr, res.head_lr, res.lrs) == (spec.lr, spec.head_lr, [spec.lr])
    for n, p in full.named_parameters():
        moved = (p.detach() - before[n]).abs()
        rate = spec.head_lr if n.startswith("head.") else spec.lr
        assert moved.max().item() == pytest.approx(rate, rel=1e-3), n


def test_non_finite_loss_raises_before_the_update():
    model, _ = _model("tok", "gated")
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 0 \(lr"):
        train_encoder_task(model, _token_data(), method="gated", max_steps=3, batch_size=4)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) or (p.isnan() == before[n].isnan()).all() and n == "head.weight"


# --------------------------------------------------------------------------------------------- evaluation
def test_evaluate_returns_the_metrics():
    model, _ = _model("tok", "linear")
    data = _token_data(6)
    scores = evaluate_encoder_task(model, data, tags=TAGS)
    assert {"precision", "recall", "f1", "correct", "predicted", "gold", "per_type"} <= set(scores)
    assert scores["predicted"] == 0 and scores["f1"] == 0.0  # a zero head predicts O everywhere
    with torch.no_grad():  # a head that always says B-PER: every single-token PER entity is right
        model.head.bias[1] = 1.0
    scores = evaluate_encoder_task(model, data, tags=TAGS)
    gold = [[TAGS[f.labels[p]] for p in f.first_token] for f in data]
    assert scores == span_scores(gold, [["B-PER"] * len(g) for g in gold])
    assert scores["predicted"] == sum(len(g) for g in gold) and scores["correct"] > 0
    with pytest.raises(ValueError, match="needs the tag list"):
        evaluate_encoder_task(model, data)
    qa, _ = _model("qa", "gated")
    feats, examples = _qa_data(5)
    scores = evaluate_encoder_task(qa, feats, examples=examples)
    assert set(scores) == {"exact_match", "f1"} and 0 <= scores["f1"] <= 100
    with torch.no_grad():  # start and end on the answer token (id 30): exact everywhere
        qa.encoder.forward = lambda ids, *a: (ids == 30).float()[..., None].expand(-1, -1, TINY["embed_dim"])
        qa.head.weight.fill_(1.0)
    assert evaluate_encoder_task(qa, feats, examples=examples) == {"exact_match": 100.0, "f1": 100.0}
    with pytest.raises(ValueError, match="needs the examples"):
        evaluate_encoder_task(qa, feats)


# --------------------------------------------------------------------------------------------- MiniLM
def test_gated_minilm_ner_held_out(tmp_path):
    try:
        path = default_encoder_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import make_encoder_data

    dirs = make_encoder_data.generate(str(tmp_path), n_train=96, n_eval=32, seed=5)
    tok = load_encoder_tokenizer(path)
    tags = read_tags(os.path.join(dirs["ner"], "tags.txt"))
    train, held = (token_features(read_conll(os.path.join(dirs["ner"], f"{s}.txt"), tags), tok, tags)
                   for s in ("train", "eval"))
    model = EncoderForTokenClassification(load_encoder(path), len(tags))
    setup_method(model, "gated", num_layers=2, prompt_len=8, seed=0)
    untrained = evaluate_encoder_task(model, held, tags=tags)["f1"]
    res = train_encoder_task(model, train, method="gated", max_steps=20, batch_size=16, lr=2e-2, seed=0)
    f1 = evaluate_encoder_task(model, held, tags=tags)["f1"]
    print(f"held-out span F1 {untrained:.3f} -> {f1:.3f}; loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f} "
          f"in {res.seconds:.1f}s")
    assert math.isfinite(res.losses[-1]) and res.losses[-1] < 0.3 * res.losses[0]
    assert f1 > untrained + 0.4 and f1 > 0.6
