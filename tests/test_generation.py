"""Generation with the KV cache: incremental == full forward, batched left-padded == one-by-one, prompt K/V
computed once per call, greedy parity with transformers through the tokenizer, sampling with a seed, stop strings,
EOS and streaming."""
import shutil

import pytest
import torch

from lladapter_ext.generation import generate, generate_tokens, sample_next
from lladapter_ext.loaders import load_hf
from lladapter_ext.model import LlamaConfig, LlamaForCausalLM
from conftest import DEVICES
from llama_helpers import mistral_sentencepiece_model, save_hf, tiny_hf_model


def adapted_model(gqa=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=80, dim=48, n_layers=3, n_heads=4, n_kv_heads=2 if gqa else 4, ffn_dim=64,
                      adapter_len=3, adapter_layer=2, max_seq_len=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "adapter" not in n:
                p.normal_(0, 0.15)  # peaked logits: greedy choices are far from ties
            if n.endswith("adapter_gate"):
                p.uniform_(-1, 1)
    return model


def test_incremental_decoding_equals_full_forward():
    model = adapted_model()
    x = torch.randint(0, 80, (2, 10))
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(2, 12)
        steps = [model(x[:, :4], cache=cache).logits] + [model(x[:, t:t + 1], cache=cache).logits
                                                          for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_cache_overflow_is_an_error():
    model = adapted_model()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="5 positions needed but the cache holds max_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_batched_left_padded_equals_one_by_one(gqa):
    model = adapted_model(gqa)
    prompts = [[1, 5, 7, 9, 3, 11, 2], [1, 4], [1, 20, 30, 40, 50]]
    batched = generate_tokens(model, prompts, 12)
    alone = [generate_tokens(model, [p], 12)[0] for p in prompts]
    assert batched == alone
    assert all(len(o) == 12 for o in batched)


@pytest.mark.parametrize("device", DEVICES)
def test_generation_on_device_matches_cpu(device):
    model = adapted_model()
    prompts = [[1, 5, 7, 9, 3, 11, 2], [1, 4]]
    cpu = generate_tokens(model, prompts, 10)
    model.to(device)
    assert generate_tokens(model, prompts, 10) == cpu
    assert [generate_tokens(model, [p], 10)[0] for p in prompts] == cpu
    a = generate_tokens(model, prompts, 6, temperature=1.0, seed=3)
    assert a == generate_tokens(model, prompts, 6, temperature=1.0, seed=3)  # the seeded generator is per device


def test_prompt_kv_computed_once_per_call():
    model = adapted_model()
    calls = {"wk": 0}
    top = model.layers[-1].attention
    top.wk.register_forward_hook(lambda m, i, o: calls.__setitem__("wk", calls["wk"] + 1))
    n_new = 7
    out = generate_tokens(model, [[1, 2, 3], [4, 5]], n_new)
    assert len(out[0]) == n_new
    # wk runs once on the prefill, once per further decoding step, and once on the adapter prompt
    assert calls["wk"] == 1 + (n_new - 1) + 1


def test_eos_stops_and_is_not_returned():
    model = adapted_model()
    first = generate_tokens(model, [[1, 2, 3]], 6)[0]
    eos = first[2]
    out = generate_tokens(model, [[1, 2, 3]], 6, eos_id=eos)[0]
    assert out == first[: first.index(eos)]


def test_sampling_is_seeded_and_top_p_narrows():
    model = adapted_model()
    p = [[1, 2, 3]]
    a = generate_tokens(model, p, 10, temperature=1.5, seed=123)
    b = generate_tokens(model, p, 10, temperature=1.5, seed=123)
    c = generate_tokens(model, p, 10, temperature=1.5, seed=7)
    assert a == b and a != c
    # top_p below the top token's probability keeps only that token: sampling becomes greedy
    assert generate_tokens(model, p, 10, temperature=1.0, top_p=1e-6, seed=1) == generate_tokens(model, p, 10)
    logits = torch.tensor([[0.0, 0.0, 10.0, 9.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.9, g)) for _ in range(200)}
    assert draws == {2, 3}  # p(2) ~ 0.73 < 0.9, so the second token stays in the nucleus, the flat ones never
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_next(logits, 1.0, 0.0)


# ----------------------------------------------------------------------------------------- with a tokenizer
@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random transformers model over the 32000-token SentencePiece vocab, saved with tokenizer.model, and
    ours loaded from that directory."""
    d = tmp_path_factory.mktemp("hf-sp")
    hf = tiny_hf_model(True, vocab_size=32000, hidden_size=48, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2)
    save_hf(hf, d)
    shutil.copy(mistral_sentencepiece_model(), d / "tokenizer.model")
    model, tok = load_hf(d)
    return hf, model.eval(), tok


def test_greedy_text_generation_matches_transformers(hf_pair):
    hf, model, tok = hf_pair
    prompts = ["Once upon a time", "The weather today is", "Ünïcödé prompt: 日本"]
    texts = generate(model, tok, prompts, max_new_tokens=8)
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id,
                              pad_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
        ref = ref[: ref.index(tok.eos_id)] if tok.eos_id in ref else ref
        assert text == tok.decode(ref)


def test_stop_strings_and_streaming(hf_pair):
    _, model, tok = hf_pair
    prompts = ["Once upon a time", "A"]
    full = generate(model, tok, prompts, max_new_tokens=10)
    assert all(len(t) > 4 for t in full)
    stop = full[0][2:4]  # a string that occurs in the first continuation
    pieces = {0: [], 1: []}
    out = generate(model, tok, prompts, max_new_tokens=10, stop=[stop],
                   stream=lambda i, piece: pieces[i].append(piece))
    assert out[0] == full[0][: full[0].find(stop)]
    for i in (0, 1):
        assert "".join(pieces[i]) == out[i]
        if stop not in full[1]:
            assert out[1] == full[1]


def test_generate_rejects_a_bare_string(hf_pair):
    _, model, tok = hf_pair
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        generate(model, tok, "hello", max_new_tokens=2)


def test_prompt_longer_than_the_context_is_refused_and_overlong_generation_capped():
    """(issue 20) Positions past config.max_seq_len were never trained: a prompt longer than the context is refused
    naming both lengths; a generation that would run past it is cut there, with a warning."""
    model = adapted_model()  # max_seq_len 128
    with pytest.raises(ValueError, match="prompt 1 has 130 tokens, more than the model's context of 128 tokens"):
        generate_tokens(model, [[1, 2, 3], list(range(1, 131))], 4)
    with pytest.warns(UserWarning, match="prompt 0 has 125 tokens and max_new_tokens is 10, which exceeds the "
                                         "model's context of 128 tokens .*generating at most 3 tokens"):
        out = generate_tokens(model, [[1 + i % 70 for i in range(125)]], 10)
    assert len(out[0]) == 3


# ------------------------------------------------------------------ decode_layers (the layer loop in one C++ call)
def _cached_forward_logits(model, prompts_ids, mask, n_steps, step_ids):
    """Logits of a prefill and n_steps one-token steps, and the cache's keys/values afterwards."""
    B = prompts_ids.shape[0]
    with torch.no_grad():
        cache = model.new_cache(B, prompts_ids.shape[1] + n_steps)
        outs = [model(prompts_ids, attention_mask=mask, cache=cache).logits]
        for t in range(n_steps):
            outs.append(model(step_ids[:, t:t + 1], cache=cache).logits)
    return outs, cache


@pytest.mark.parametrize("route", ["linear", "transposed", "gemv"])
@pytest.mark.parametrize("variant", ["gqa", "mha_interleaved_identity", "bf16", "no_adapter"])
def test_decode_layers_equal_the_python_loop(monkeypatch, route, variant):
    """The C++ layer loop runs the same ops in the same order: bit-equal logits and caches (prefill with left
    padding, then decode steps), on every few-row linear route and both GEMM routes of the prefill's 18 rows
    (nn.gemm_route: "openblas" with the gemv route where OpenBLAS loads, "torch" otherwise), and it is the path
    actually taken."""
    import lladapter_ext.model as model_mod
    from lladapter_ext import nn as lnn

    monkeypatch.setenv("LLADAPTER_FEW_ROWS_ROUTE", route)
    monkeypatch.setattr(lnn, "_GEMM_ROUTE", ["openblas" if route == "gemv" and not lnn._load_openblas() else "torch"])
    model = adapted_model(gqa=variant != "mha_interleaved_identity")
    if variant == "mha_interleaved_identity":
        model.config = model.config.replace(rope_interleaved=True, gate_act="identity")
        for layer in model.layers:
            layer.attention.rope_interleaved, layer.attention.gate_act = True, "identity"
    if variant == "bf16":
        model.to(torch.bfloat16)
    if variant == "no_adapter":
        model.use_adapter = False
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 80, (3, 6), generator=g)
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # left padding: kv_start
    mask[2, :5] = 0
    step_ids = torch.randint(3, 80, (3, 4), generator=g)

    calls = []
    real = model_mod._C

    class CountingC:
        @staticmethod
        def decode_layers(*args):
            calls.append(args[0].shape)
            return real.decode_layers(*args)

    monkeypatch.setattr(model_mod, "_C", CountingC)
    fused, fused_cache = _cached_forward_logits(model, prompts, mask, 4, step_ids)
    assert calls == [(3, 6, 48)] + [(3, 1, 48)] * 4
    monkeypatch.setenv("LLADAPTER_DECODE_LAYERS", "0")
    loop, loop_cache = _cached_forward_logits(model, prompts, mask, 4, step_ids)
    assert len(calls) == 5  # the Python loop ran
    for a, b in zip(fused, loop):
        assert torch.equal(a, b)
    for a, b in zip(fused_cache.k + fused_cache.v, loop_cache.k + loop_cache.v):
        assert torch.equal(a[:, :10], b[:, :10])
    assert fused_cache.prompt_kv.keys() == loop_cache.prompt_kv.keys()


def test_decode_layers_not_taken_where_the_python_loop_must_run(monkeypatch):
    """Grad mode, no cache, hooks, quantized layers, a patched ops function keep the Python loop (the hook runs)."""
    import lladapter_ext.model as model_mod
    from lladapter_ext.quantize import quantize_model

    calls = []
    real = model_mod._C

    class CountingC:
        @staticmethod
        def decode_layers(*args):
            calls.append(1)
            return real.decode_layers(*args)

    monkeypatch.setattr(model_mod, "_C", CountingC)
    model = adapted_model()
    x = torch.randint(3, 80, (1, 5))
    model(x, cache=model.new_cache(1, 8))  # grad mode on
    with torch.no_grad():
        model(x)  # no cache
        seen = []
        handle = model.layers[1].feed_forward.w2.register_forward_hook(lambda m, i, o: seen.append(1))
        model(x, cache=model.new_cache(1, 8))
        assert seen == [1]
        handle.remove()
        quantized = quantize_model(adapted_model(), "int8")
        quantized(x, cache=quantized.new_cache(1, 8))
        with monkeypatch.context() as m:  # a replaced ops function (the benchmarks' reference ops) is honoured
            from lladapter_ext import ops, reference

            m.setattr(ops, "rms_norm", reference.rms_norm)
            model(x, cache=model.new_cache(1, 8))
    assert calls == []
    with torch.no_grad():
        model(x, cache=model.new_cache(1, 8))
        with pytest.raises(ValueError, match="6 positions needed but the cache holds max_len=5"):
            model(torch.randint(3, 80, (1, 6)), cache=model.new_cache(1, 5))  # KVCache's own error, not the loop's
    assert calls == [1]


def test_decode_layers_refuses_inconsistent_arguments():
    from lladapter_ext import _C

    h = torch.zeros(1, 1, 8)
    with pytest.raises(RuntimeError, match="decode_layers: per layer 9 weights"):
        _C.decode_layers(h, [torch.zeros(8, 8)] * 8, [1e-5, 1e-5], [torch.zeros(1, 4, 1, 8)],
                         [torch.zeros(1, 4, 1, 8)], [None], [None], [None], [[]], 0,
                         torch.zeros(1, 1, dtype=torch.long), torch.ones(8, 4), torch.zeros(8, 4), None, 1, 1, 8,
                         False, "tanh", 1.0, "linear")
    with pytest.raises(RuntimeError, match="layer 0's k/v cache must be"):
        _C.decode_layers(h, [torch.zeros(8, 8)] * 9, [1e-5, 1e-5], [torch.zeros(1, 0, 1, 8)],
                         [torch.zeros(1, 0, 1, 8)], [None], [None], [None], [[]], 0,
                         torch.zeros(1, 1, dtype=torch.long), torch.ones(8, 4), torch.zeros(8, 4), None, 1, 1, 8,
                         False, "tanh", 1.0, "linear")
    with pytest.raises(RuntimeError,
                       match="linear_route must be 'linear', 'transposed', 'gemv' or 'openblas', got 'fast'"):
        _C.decode_layers(h, [torch.zeros(8, 8)] * 9, [1e-5, 1e-5], [torch.zeros(1, 4, 1, 8)],
                         [torch.zeros(1, 4, 1, 8)], [None], [None], [None], [[]], 0,
                         torch.zeros(1, 1, dtype=torch.long), torch.ones(8, 4), torch.zeros(8, 4), None, 1, 1, 8,
                         False, "tanh", 1.0, "fast")


@pytest.mark.parametrize("rows", ["mixed", "shared"])
def test_decode_layers_with_per_row_prompts_equal_the_python_loop(monkeypatch, rows):
    """Serving's batches (each row its own adapter, or none: kv_cache.RowPrompts) through the C++ loop: bit-equal to
    the Python loop, for rows grouped by prompt length (index_add) and for one adapter serving every row."""
    import lladapter_ext.model as model_mod
    from lladapter_ext.kv_cache import RowPrompts

    model = adapted_model()
    model.use_adapter = False  # serving runs the base's word attention once; RowPrompts adds each row's prompt
    g = torch.Generator().manual_seed(2)

    def adapter(k_len):
        layers = {}
        with torch.no_grad():
            for i in (1, 2):
                attn = model.layers[i].attention
                pk, pv = attn.project_prompt(torch.randn(1, k_len, 48, generator=g), "wk_wv")
                layers[i] = (pk.contiguous(), pv.contiguous(), torch.rand(4, generator=g) * 2 - 1)
        return layers

    a, b = adapter(3), adapter(5)
    per_row = [a, {}, b] if rows == "mixed" else [a, a, a]
    prompts = torch.randint(3, 80, (3, 5), generator=g)
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0
    step_ids = torch.randint(3, 80, (3, 3), generator=g)

    def run():
        with torch.no_grad():
            cache = model.new_cache(3, 8)
            cache.row_prompts = RowPrompts(per_row)
            outs = [model(prompts, attention_mask=mask, cache=cache).logits]
            outs += [model(step_ids[:, t:t + 1], cache=cache).logits for t in range(3)]
        return outs

    calls = []
    real = model_mod._C

    class CountingC:
        @staticmethod
        def decode_layers(*args):
            calls.append(1)
            return real.decode_layers(*args)

    monkeypatch.setattr(model_mod, "_C", CountingC)
    fused = run()
    assert len(calls) == 4
    monkeypatch.setenv("LLADAPTER_DECODE_LAYERS", "0")
    loop = run()
    assert len(calls) == 4
    for x, y in zip(fused, loop):
        assert torch.equal(x, y)
    if rows == "mixed":  # the rows' adapters matter (else the test could not tell a dropped prompt branch)
        monkeypatch.delenv("LLADAPTER_DECODE_LAYERS")
        per_row = [{}, {}, {}]
        assert not torch.equal(run()[0][0], fused[0][0]) and torch.equal(run()[0][1], fused[0][1])


def test_decode_layers_honours_ops_replaced_before_the_model_imports():
    """The benchmarks' reference-ops variant patches lladapter_ext.ops before importing the model: the Python loop
    must run the replacements then too (a fresh process, where the import order is the benchmark's)."""
    import subprocess
    import sys

    code = """
import torch
from lladapter_ext import ops, reference
calls = []
def rms_norm(*a, **k):
    calls.append(1)
    return reference.rms_norm(*a, **k)
ops.rms_norm = rms_norm
from lladapter_ext.model import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, adapter_len=2,
                  adapter_layer=1, max_seq_len=32)
model = LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]), cache=model.new_cache(1, 4))
assert len(calls) == 2 * cfg.n_layers + 1, calls
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
