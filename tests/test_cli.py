"""Smoke tests of every `lladapter` subcommand on a tiny random LLaMA in HF format with a real SentencePiece
tokenizer (mistral-common's), run as a user would: `python -m lladapter_ext ...` in a subprocess."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from llama_helpers import mistral_sentencepiece_model, save_hf, tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, check=True, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "lladapter_ext", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"lladapter {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_hf")
    save_hf(tiny_hf_model(gqa=True, vocab_size=32000), d)
    shutil.copy(mistral_sentencepiece_model(), d / "tokenizer.model")
    return str(d)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w}
            for w in ["apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "lemon"]]
    with open(d / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(d / "train.jsonl")


@pytest.mark.parametrize("sub", ["finetune", "generate", "eval", "info", "serve", "encoder-finetune",
                                 "encoder-eval"])  # convert: no defaults
def test_help_documents_every_option(sub):
    out = run_cli(sub, "--help").stdout
    assert "usage: lladapter " + sub in out
    assert "(default:" in out  # defaults are shown


@pytest.mark.parametrize("sub", ["finetune", "generate", "eval", "info", "convert", "serve", "encoder-finetune",
                                 "encoder-eval"])
def test_help_shows_each_default_once(sub):
    from lladapter_ext import cli
    parser = cli.build_parser()
    sub_parser = next(a for a in parser._actions if a.dest == "command").choices[sub]
    formatter = sub_parser._get_formatter()
    for action in sub_parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("default") <= 1, (action.option_strings, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (action.option_strings, text)


def test_finetune_options_come_from_train_config():
    # TrainConfig is the one source of the fine-tuning help texts and of the defaults that no recipe gives; the
    # recipe-given options are unset (None) until lladapter_ext.recipe fills them in
    import dataclasses

    from lladapter_ext import cli, recipe, training
    parser = cli.build_parser()
    finetune = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
    actions = {a.dest: a for a in finetune._actions}
    fields = {f.name: f for f in dataclasses.fields(training.TrainConfig)}
    for name, (flag, _) in cli._TRAIN_OPTIONS.items():
        action = actions[flag[2:].replace("-", "_")]
        assert fields[name].metadata["help"].split(" (default")[0] in action.help, name
        if name in recipe.TRAIN_FIELDS:
            assert action.default is None and "(default: --recipe's)" in action.help, name
        elif flag.startswith("--no-"):
            assert fields[name].default is True and action.default is False, name
        elif isinstance(fields[name].default, bool):
            assert action.default is fields[name].default, name
        else:
            assert action.default == fields[name].default, name
        if name not in recipe.TRAIN_FIELDS:
            assert "--recipe" not in action.help, name

    def config(*argv, n_rows=400):
        cfg = cli._train_config(parser.parse_args(["finetune", "--data", "d.jsonl", "--out", "o", *argv]), 1, n_rows)
        return dataclasses.replace(cfg, sources={})

    # the official recipe is TrainConfig's own defaults; the default recipe, measured (docs/recipe.md), differs
    assert config("--recipe", "official") == training.TrainConfig(out_dir="o")
    assert config() == training.TrainConfig(out_dir="o", micro_batch_size=8, lr=5e-2, epochs=2.5, warmup_steps=13)
    # an option given wins over the recipe's value, and what depends on it follows (warmup: 10% of 4 x 50 steps)
    assert config("--epochs", "4", "--lr", "1e-3") == training.TrainConfig(
        out_dir="o", micro_batch_size=8, lr=1e-3, epochs=4.0, warmup_steps=20)
    # --blr alone asks for the official scaling (lr None: blr x effective batch / 256)
    assert config("--blr", "0.05").lr is None
    # before the data is read (n_rows None) the values are placeholders that pass the checks
    assert cli._train_config(parser.parse_args(["finetune", "--data", "d", "--out", "o"]), 1).micro_batch_size == 8


def test_info_preset_counts_llama7b_adapter():
    out = run_cli("info", "--preset", "llama-7b").stdout
    assert "1,229,760 trainable" in out
    assert "4.69 MiB" in out  # the paper's "4.7 MB" adapter
    assert "CUDA kernels" in out


def test_finetune_generate_eval_roundtrip(tiny_model_dir, tiny_data, tmp_path):
    out_dir = tmp_path / "run"
    p = run_cli("finetune", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out_dir),
                "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1",
                "--adapter-layer", "2", "--adapter-len", "4", "--max-seq-len", "64", "--no-progress", "--no-plot",
                "--device", "cpu")
    assert "trainable adapter parameters" in p.stdout
    adapter = out_dir / "adapter.safetensors"
    assert adapter.is_file() and adapter.stat().st_size > 0
    log = [json.loads(l) for l in open(out_dir / "log.jsonl")]
    assert len(log) == 4 and all("loss" in r for r in log)

    # the adapter's K and L come from the file's metadata
    g = run_cli("generate", "--model", tiny_model_dir, "--adapter", str(out_dir),
                "--prompt", "Repeat the word apple.", "--max-new-tokens", "5",
                "--temperature", "0", "--no-stream", "--device", "cpu")
    assert "### Repeat the word apple." in g.stdout

    e = run_cli("eval", "--model", tiny_model_dir, "--adapter", str(adapter), "--adapter-layer", "2",
                "--adapter-len", "4", "--data", tiny_data, "--max-new-tokens", "4", "--device", "cpu")
    assert "exact match" in e.stdout and "perplexity" in e.stdout

    # resuming a finished run into the same dir without --resume is refused, with a clear message
    again = run_cli("finetune", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out_dir),
                    "--max-steps", "4", "--no-progress", "--device", "cpu", check=False)
    assert again.returncode != 0 and "resume" in (again.stderr + again.stdout)


def test_generate_without_prompt_is_a_clear_error(tiny_model_dir):
    p = subprocess.run([sys.executable, "-m", "lladapter_ext", "generate", "--model", tiny_model_dir, "--device",
                        "cpu"], capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode != 0 and "--prompt" in (p.stderr + p.stdout)


def test_adapter_mismatch_names_the_problem(tiny_model_dir, tiny_data, tmp_path):
    out_dir = tmp_path / "run"
    run_cli("finetune", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out_dir), "--max-steps", "1",
            "--adapter-layer", "2", "--adapter-len", "4", "--no-progress", "--no-plot", "--device", "cpu")
    p = run_cli("generate", "--model", tiny_model_dir, "--adapter", str(out_dir), "--adapter-layer", "3",
                "--adapter-len", "4", "--prompt", "x", "--max-new-tokens", "2", "--device", "cpu", check=False)
    assert p.returncode != 0 and "adapter" in (p.stderr + p.stdout).lower()


@pytest.mark.slow
def test_torchrun_finetune_fsdp_with_packing(tiny_model_dir, tiny_data, tmp_path):
    """`torchrun ... finetune --fsdp --packing` on 2 CPU processes (gloo) end to end; FSDP refuses --eval-data."""
    out_dir = tmp_path / "fsdp"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    args = ["finetune", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out_dir), "--max-steps", "2",
            "--batch-size", "1", "--lr", "1e-2", "--warmup-steps", "1", "--adapter-layer", "2", "--adapter-len", "4",
            "--max-seq-len", "128", "--no-progress", "--no-plot", "--fsdp", "--packing"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "lladapter_ext", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    log = [json.loads(l) for l in open(out_dir / "log.jsonl")]
    assert len(log) == 2 and all(r["loss"] > 0 for r in log)
    assert json.load(open(out_dir / "train_config.json"))["world_size"] == 2
    assert (out_dir / "adapter.safetensors").stat().st_size > 0
    refused = run_cli(*args, "--eval-data", tiny_data, check=False)
    assert refused.returncode != 0 and "--eval-data is not supported" in refused.stderr
