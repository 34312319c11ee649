"""The one Python entry point of each job, the one the command line calls: loading a base model with a trained
adapter (loaders.load_model(adapter=...), checkpoint.find_adapter_file), rendering prompts
(generation.render_prompts) and the held-out evaluation (evaluation.evaluate_text)."""
import json

import pytest
import torch

from lladapter_ext import checkpoint, data, evaluation
from lladapter_ext.generation import generate, render_prompts
from lladapter_ext.loaders import load_model
from llama_helpers import tiny_llama_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"), n_layers=3)


def _trained_adapter(model_dir, path, **hp):
    """An adapter with random (non-zero) prompts and gates saved to path; returns its tensors."""
    model, _ = load_model(model_dir, **hp)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_adapter_parameters():
            p.normal_()
    model.save_adapter(path)
    return model.adapter_state_dict()


def _assert_same_adapter(model, want):
    got = model.adapter_state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_load_model_with_adapter_takes_its_hyper_parameters(model_dir, tmp_path):
    path = str(tmp_path / "a.safetensors")
    want = _trained_adapter(model_dir, path, adapter_len=3, adapter_layer=2, gate_act="identity")
    model, tok = load_model(model_dir, adapter=path)
    c = model.config
    assert (c.adapter_len, c.adapter_layer, c.gate_act) == (3, 2, "identity") and tok is not None
    _assert_same_adapter(model, want)
    # a hyper-parameter given explicitly overrides the file's, and a file that does not fit is refused by name
    with pytest.raises(ValueError, match="adapter_prompt"):
        load_model(model_dir, adapter=path, adapter_len=4)
    # without an adapter the defaults are the official recipe's
    c = load_model(model_dir, tokenizer=False)[0].config
    assert (c.adapter_len, c.adapter_layer, c.gate_act) == (10, 30, "tanh")


def test_load_model_finds_the_adapter_of_a_run_directory(model_dir, tmp_path):
    run = tmp_path / "run"
    ck = run / checkpoint.CHECKPOINT_DIR / "step-00000004"
    ck.mkdir(parents=True)
    want = _trained_adapter(model_dir, str(ck / "adapter.safetensors"), adapter_len=2, adapter_layer=1)
    (run / checkpoint.CHECKPOINT_DIR / "latest").write_text("step-00000004")
    # a run still going: the newest checkpoint's adapter
    assert checkpoint.find_adapter_file(run) == str(ck / "adapter.safetensors")
    _assert_same_adapter(load_model(model_dir, adapter=run)[0], want)
    # a finished run: its final adapter wins
    final = _trained_adapter(model_dir, str(run / checkpoint.ADAPTER_FILE), adapter_len=4, adapter_layer=3)
    assert checkpoint.find_adapter_file(run) == str(run / checkpoint.ADAPTER_FILE)
    _assert_same_adapter(load_model(model_dir, adapter=run)[0], final)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no adapter of a known format there"):
        load_model(model_dir, adapter=empty)


def test_load_model_refuses_a_multimodal_or_corrupt_adapter(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "a.safetensors")
    _trained_adapter(model_dir, path, adapter_len=2, adapter_layer=1)
    tensors = load_file(path)
    from lladapter_ext.adapter import read_adapter_metadata
    meta = read_adapter_metadata(path)
    mm = str(tmp_path / "mm.safetensors")
    save_file(tensors, mm, metadata=dict(meta, multimodal="1"))
    with pytest.raises(ValueError, match="multi-modal adapter.*MultiModalLlama.from_adapter"):
        load_model(model_dir, adapter=mm)
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata=dict(meta, adapter_layer="x"))
    with pytest.raises(ValueError, match=f"{bad}: metadata adapter_layer='x' is not a non-negative integer"):
        load_model(model_dir, adapter=bad)
    save_file(tensors, bad, metadata=dict(meta, gate_act="relu"))
    with pytest.raises(ValueError, match="metadata gate_act='relu' is not tanh or identity"):
        load_model(model_dir, adapter=bad)


def test_render_prompts_gives_each_style():
    from lladapter_ext.mm_data import MCQuestion, format_question

    class Chat:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt):
            assert add_generation_prompt
            return f"<user>{messages[0]['content']}</user><assistant>"

    prompts = ["Sort 3, 1, 2", "Spell cat"]
    assert render_prompts(prompts) == [data.alpaca_prompt(p, "") for p in prompts]
    assert render_prompts(prompts, style="alpaca", input="x") == [data.alpaca_prompt(p, "x") for p in prompts]
    assert render_prompts(prompts, style="raw") == prompts
    assert render_prompts(prompts, Chat(), "chat") == [f"<user>{p}</user><assistant>" for p in prompts]
    assert render_prompts(prompts, style="choices", choices=["a", "b"]) == [
        format_question(MCQuestion("prompt", p, ["a", "b"], 0)) for p in prompts]
    with pytest.raises(ValueError, match="no chat template"):
        render_prompts(prompts, object(), "chat")
    with pytest.raises(ValueError, match="give the answer choices"):
        render_prompts(prompts, style="choices")
    with pytest.raises(ValueError, match="style must be one of"):
        render_prompts(prompts, style="jinja")


def test_evaluate_text_is_loss_plus_greedy_exact_match(model_dir, tmp_path):
    model, tok = load_model(model_dir, adapter_len=2, adapter_layer=2)
    model.eval()
    rows = [{"instruction": f"Repeat {w}.", "output": w} for w in ("apple", "river", "stone")]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluation.evaluate_text(model, tok, str(path), 64, 4, batch_size=2)
    loss = evaluation.evaluate_loss(model, data.load_dataset(str(path), tok, 64), batch_size=2)
    assert res["loss"] == pytest.approx(loss["loss"], rel=1e-6) and res["tokens"] == loss["tokens"]
    prompts = [data.alpaca_prompt(r["instruction"], "") for r in rows]
    predictions = generate(model, tok, prompts, max_new_tokens=4)
    assert res["prompts"] == prompts and res["references"] == [r["output"] for r in rows]
    assert res["predictions"] == predictions
    hits = [evaluation.exact_match(p, r["output"]) for p, r in zip(predictions, rows)]
    assert res["hits"] == hits and res["correct"] == sum(hits) and res["n"] == 3
    assert res["exact_match"] == sum(hits) / 3
    # limit: the loss still covers every record, generation only the first ones
    short = evaluation.evaluate_text(model, tok, [str(path)], 64, 4, limit=1)
    assert short["n"] == 1 and short["predictions"] == predictions[:1] and short["tokens"] == loss["tokens"]
