"""lm-evaluation-harness with lladapter models (lladapter_ext.harness) against lm_eval's own hf model + PEFT on the
same weights and the same adapter, on local tasks this file writes (multiple choice, generation, rolling
log-likelihood; no downloads): the same accuracies, log-likelihoods within fp32 tolerance, the same generations.
And `lladapter eval --task mc` (evaluation.evaluate_multiple_choice) gives lm_eval's numbers without lm_eval."""
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local JSONL; nothing may be fetched
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lladapter_ext import evaluation  # noqa: E402
from llama_helpers import save_hf, smollm2_gguf, tiny_hf_model  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (the eval extra)")
peft = pytest.importorskip("peft", reason="peft is a test dependency")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MC = [{"query": f"Question: {q}\nAnswer:", "choices": c, "gold": g} for q, c, g in [
    ("What color is the sky?", ["blue", "green", "red", "a very long yellow answer"], 0),
    ("How many legs has a cat?", ["four", "two", "six"], 0),
    ("Which is a fruit?", ["apple", "stone", "car", "cloud"], 0),
    ("What is 2 + 2?", ["4", "5", "22"], 0),
    ("Where do fish live?", ["in water", "in trees", "on the moon"], 0),
    ("Opposite of hot?", ["cold", "warm", "spicy", "loud"], 0)]]
GEN = [{"query": f"Repeat the word: {w}\nWord:", "answer": f" {w}"} for w in ("apple", "river", "stone", "maple")]
TEXT = [{"text": "The quick brown fox jumps over the lazy dog. " * 3},
        {"text": "A tiny model reads a short paragraph, one token at a time, and scores every one of them."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random LLaMA with SmolLM2's real tokenizer (HF format) and a trained PEFT adaption prompt."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("harness")
    model_dir, peft_dir = root / "model", root / "peft"
    hf = tiny_hf_model(gqa=True, vocab_size=49152, max_position_embeddings=256)
    save_hf(hf, model_dir)
    g = smollm2_gguf()
    AutoTokenizer.from_pretrained(os.path.dirname(g), gguf_file=os.path.basename(g)).save_pretrained(model_dir)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    for step in range(3):
        x = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(step))
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval().save_pretrained(peft_dir)
    tasks = root / "tasks"
    tasks.mkdir()
    for name, rows in (("mc", MC), ("gen", GEN), ("ppl", TEXT)):
        with open(tasks / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text(
        "task: lladapter_test_mc\n" + head.format(path=tasks / "mc.jsonl") +
        'output_type: multiple_choice\ndoc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    (tasks / "gen.yaml").write_text(
        "task: lladapter_test_gen\n" + head.format(path=tasks / "gen.jsonl") +
        'output_type: generate_until\ndoc_to_text: "{{query}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    (tasks / "ppl.yaml").write_text(
        "task: lladapter_test_ppl\n" + head.format(path=tasks / "ppl.jsonl") +
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n")
    return model_dir, peft_dir, tasks


def run_lm_eval(model, model_args, tasks_dir, names):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lladapter_ext import harness
    harness.register()
    return simple_evaluate(model=model, model_args=model_args, tasks=names, batch_size=4, device="cpu",
                           log_samples=True, task_manager=TaskManager(include_path=str(tasks_dir)))


def responses(out, task):
    """Per request, ordered by document and request index: what the model returned."""
    rows = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [r for s in rows for r in s["resps"]]


@pytest.fixture(scope="module")
def both(setup):
    model_dir, peft_dir, tasks = setup
    names = ["lladapter_test_mc", "lladapter_test_gen", "lladapter_test_ppl"]
    hf = run_lm_eval("hf", f"pretrained={model_dir},peft={peft_dir},dtype=float32", tasks, names)
    ours = run_lm_eval("lladapter", f"model={model_dir},adapter={peft_dir}", tasks, names)
    return hf, ours


def test_multiple_choice_matches_hf_with_peft(both):
    hf, ours = both
    task = "lladapter_test_mc"
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][task][metric] == hf["results"][task][metric], metric
    want, got = responses(hf, task), responses(ours, task)
    assert len(got) == len(want) == sum(len(r["choices"]) for r in MC)
    # three fp32 layers in other summation orders: log-likelihoods of a few tokens agree to ~1e-5 absolute
    for (w, _), (g, _) in zip([r[0] for r in want], [r[0] for r in got]):
        assert abs(float(w) - float(g)) <= 1e-4 * max(1.0, abs(float(w))), (w, g)
    assert [bool(r[0][1]) for r in want] == [bool(r[0][1]) for r in got]  # is_greedy


def test_generation_matches_hf_with_peft(both):
    hf, ours = both
    task = "lladapter_test_gen"
    assert [r[0] for r in responses(ours, task)] == [r[0] for r in responses(hf, task)]
    assert ours["results"][task]["exact_match,none"] == hf["results"][task]["exact_match,none"]


def test_rolling_loglikelihood_matches_hf_with_peft(both):
    hf, ours = both
    task = "lladapter_test_ppl"
    for w, g in zip(responses(hf, task), responses(ours, task)):
        assert abs(float(w[0]) - float(g[0])) <= 1e-4 * abs(float(w[0])), (w, g)


def test_mc_without_lm_eval_gives_lm_evals_numbers(setup, both):
    from lladapter_ext.loaders import load_model

    model_dir, peft_dir, tasks = setup
    _, ours = both
    model, tok = load_model(model_dir, adapter=peft_dir)
    res = evaluation.evaluate_multiple_choice(model, tok, tasks / "mc.jsonl", batch_size=4)  # as lm_eval ran
    task = "lladapter_test_mc"
    assert (res["acc"], res["acc_norm"]) == (ours["results"][task]["acc,none"],
                                             ours["results"][task]["acc_norm,none"])
    assert [ll for lls in res["loglikelihoods"] for ll in lls] == [float(r[0][0]) for r in responses(ours, task)]


def test_a_shared_context_runs_once(setup):
    from lladapter_ext.loaders import load_model

    model_dir, peft_dir, _ = setup
    model, tok = load_model(model_dir, adapter=peft_dir)
    calls = []
    model.tok_embeddings.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    ctx = "Question: which one?\nAnswer:"
    requests = [evaluation.encode_pair(tok, ctx, f" {c}") for c in ("a", "bb", "ccc", "dddd", "e")]
    scores = evaluation.score_continuations(model, requests, batch_size=4)
    n_ctx = len(requests[0][0])
    # one prefill of the context (without its last token), then the five continuations in batches of 4 and 1
    assert calls[0] == (1, n_ctx - 1) and [c[0] for c in calls[1:]] == [4, 1]
    one_by_one = [evaluation.score_continuations(model, [r])[0] for r in requests]
    for (a, ga), (b, gb) in zip(scores, one_by_one):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)) and ga == gb
    full = []  # and each equals the plain forward over context + continuation, no cache
    for ctx_ids, cont_ids in requests:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx_ids + cont_ids])).logits[0].float(), -1)
        full.append(sum(float(logp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(cont_ids)))
    for (a, _), b in zip(scores, full):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (a, b)


def test_eval_task_mc_command_line(setup):
    model_dir, peft_dir, tasks = setup
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "lladapter_ext", "eval", "--task", "mc", "--model", str(model_dir),
                        "--adapter", str(peft_dir), "--data", str(tasks / "mc.jsonl")], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "acc" in p.stdout and "acc_norm" in p.stdout and f"/{len(MC)}" in p.stdout, p.stdout
    bad = tasks / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 5}) + "\n")
    p = subprocess.run([sys.executable, "-m", "lladapter_ext", "eval", "--task", "mc", "--model", str(model_dir),
                        "--data", str(bad)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 2 and "bad.jsonl:1: \"gold\" must be the index" in p.stderr, p.stderr[-2000:]


def test_lm_eval_command_line_with_the_lladapter_model(setup, both):
    model_dir, peft_dir, tasks = setup
    _, ours = both
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "lladapter_ext.harness", "--model", "lladapter", "--model_args",
                        f"model={model_dir},adapter={peft_dir}", "--tasks", "lladapter_test_mc", "--include_path",
                        str(tasks), "--batch_size", "4", "--device", "cpu"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    acc = ours["results"]["lladapter_test_mc"]["acc,none"]
    assert "lladapter_test_mc" in p.stdout and f"{acc:.4f}" in p.stdout, p.stdout[-2000:]


def test_yes_no_model_args_are_parsed_or_refused():
    from lladapter_ext.harness import model_arg_flag

    for value in (True, "true", "True", "1", "yes", "ON", 1):
        assert model_arg_flag("quantize_head", value) is True, value
    for value in (False, "false", "0", "no", "off", 0):
        assert model_arg_flag("quantize_head", value) is False, value
    with pytest.raises(ValueError, match="quantize_head must be true or false, got 'ye'"):
        model_arg_flag("quantize_head", "ye")
