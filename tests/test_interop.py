"""Adapters across tools (lladapter_ext.interop): PEFT's AdaptionPrompt and LitGPT's adapter as oracles both ways
(their models, their files), the official LLaMA-Adapter V1 layout from its key names, lossless round trips, exact
refusals, and bad input. fp32 throughout: logits agree to 1e-4 (three layers of fp32 matmuls summed in other
orders), tensors after a round trip bit for bit."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lladapter_ext import interop
from lladapter_ext.loaders import load_hf, load_model
from llama_helpers import save_hf, tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, L = 4, 2  # prompt tokens, adapted layers (of 3)
TOL = dict(rtol=1e-4, atol=1e-4)


def peft_module():
    return pytest.importorskip("peft", reason="peft is a test dependency")


def litgpt_adapter_module():
    deps = os.path.join(ROOT, ".deps")  # make test installs LitGPT there (never into the venv)
    if os.path.isdir(deps) and deps not in sys.path:
        sys.path.append(deps)
    return pytest.importorskip("litgpt.adapter", reason="LitGPT lives in .deps (make .deps/.stamp)")


@pytest.fixture(scope="module", params=[False, True], ids=["mha", "gqa"])
def hf_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_gqa" if request.param else "hf_mha")
    save_hf(tiny_hf_model(request.param), d)
    return d, request.param


def tokens(seed=0, shape=(2, 9)):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def ours_with(hf_dir, **hp):
    model, _ = load_hf(hf_dir, tokenizer=False, **{"adapter_len": K, "adapter_layer": L, **hp})
    return model.eval()


def randomize(model, same_gate_per_head=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_adapter_parameters():
            if name.endswith("adapter_gate") and same_gate_per_head:
                p.fill_(float(torch.rand((), generator=g)) - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("gate") else 1.0))
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def assert_same_adapter(a, b):
    sa, sb = a.adapter_state_dict(), b.adapter_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------------------------- PEFT
def test_peft_trained_adapter_loads_with_peft_logits(hf_dir, tmp_path):
    peft = peft_module()
    d, gqa = hf_dir
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_hf_model(gqa), peft.AdaptionPromptConfig(adapter_len=K, adapter_layers=L,
                                                                           task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    for step in range(3):  # trained, so the gates are not zero
        x = tokens(step)
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval().save_pretrained(tmp_path / "peft")
    assert interop.detect_format(tmp_path / "peft") == "peft"

    ours, _ = load_model(d, adapter=tmp_path / "peft", tokenizer=False)
    c = ours.config
    assert (c.adapter_len, c.adapter_layer, c.gate_act, c.prompt_projection) == (K, L, "identity", "wk_wv")
    x = tokens(7)
    with torch.no_grad():
        want = pm(input_ids=x).logits
    ours.use_adapter = False
    assert not torch.allclose(logits(ours, x), want, atol=1e-3)  # the adapter changes the outputs
    ours.use_adapter = True
    torch.testing.assert_close(logits(ours.eval(), x), want, **TOL)


def test_ours_exported_to_peft_gives_our_logits(hf_dir, tmp_path):
    peft = peft_module()
    d, gqa = hf_dir
    ours = randomize(ours_with(d, gate_act="tanh"), same_gate_per_head=True)
    ours.save_adapter(tmp_path / "a.safetensors")
    interop.convert(tmp_path / "a.safetensors", tmp_path / "peft", "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["adapter_len"], cfg["adapter_layers"]) == ("ADAPTION_PROMPT", K, L)
    pm = peft.PeftModel.from_pretrained(tiny_hf_model(gqa), tmp_path / "peft").eval()
    x = tokens(3)
    with torch.no_grad():
        got = pm(input_ids=x).logits
    torch.testing.assert_close(got, logits(ours, x), **TOL)


def test_per_head_gates_are_refused_by_peft(hf_dir, tmp_path):
    ours = randomize(ours_with(hf_dir[0], gate_act="identity"))
    ours.save_adapter(tmp_path / "a.safetensors")
    with pytest.raises(interop.AdapterFormatError, match="different gates per head.*one gate per layer"):
        interop.convert(tmp_path / "a.safetensors", tmp_path / "peft", "peft")
    assert not (tmp_path / "peft").exists() and os.listdir(tmp_path) == ["a.safetensors"]


# ----------------------------------------------------------------------------------------------- LitGPT
def litgpt_from_ours(ours):
    """LitGPT's adapter GPT with our model's base weights and adapter (LitGPT 0.5 stacks q, k, v in `qkv`)."""
    lit = litgpt_adapter_module()
    c = ours.config
    cfg = lit.Config(name="tiny", block_size=c.max_seq_len, vocab_size=c.vocab_size,
                     padded_vocab_size=c.vocab_size, n_layer=c.n_layers, n_head=c.n_heads,
                     n_query_groups=c.n_kv_heads, n_embd=c.dim, head_size=c.head_dim, rotary_percentage=1.0,
                     parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=c.norm_eps,
                     mlp_class_name="LLaMAMLP", intermediate_size=c.ffn_dim, rope_base=int(c.rope_base),
                     adapter_prompt_length=c.adapter_len, adapter_start_layer=c.first_adapted_layer)
    model = lit.GPT(cfg).eval()
    P = dict(model.named_parameters())
    head = ours.lm_head_weight()
    with torch.no_grad():
        P["transformer.wte.weight"].copy_(ours.tok_embeddings.weight)
        P["transformer.ln_f.weight"].copy_(ours.norm.weight)
        P["lm_head.weight"].copy_(head)
        for i, layer in enumerate(ours.layers):
            p, a = f"transformer.h.{i}.", layer.attention
            P[p + "attn.qkv.weight"].copy_(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]))
            P[p + "attn.proj.weight"].copy_(a.wo.weight)
            P[p + "mlp.fc_1.weight"].copy_(layer.feed_forward.w1.weight)
            P[p + "mlp.fc_2.weight"].copy_(layer.feed_forward.w3.weight)
            P[p + "mlp.proj.weight"].copy_(layer.feed_forward.w2.weight)
            P[p + "norm_1.weight"].copy_(layer.attention_norm.weight)
            P[p + "norm_2.weight"].copy_(layer.ffn_norm.weight)
    return model


def lit_logits(model, x):
    for m in model.modules():  # LitGPT caches the prompt K/V in every forward
        if hasattr(m, "adapter_kv_cache"):
            m.adapter_kv_cache = None
    with torch.no_grad():
        return model(x)


def test_litgpt_trained_adapter_loads_with_litgpt_logits(hf_dir, tmp_path):
    lit = litgpt_adapter_module()
    d, gqa = hf_dir
    model = litgpt_from_ours(ours_with(d))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if lit.adapter_filter(n, p):
                p.copy_(torch.randn(p.shape, generator=g))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if lit.adapter_filter(n, p)}
    torch.save({"model": state}, tmp_path / "lit_model.pth.adapter")  # what litgpt finetune adapter writes
    assert interop.detect_format(tmp_path) == "litgpt"

    ours, _ = load_model(d, adapter=tmp_path, tokenizer=False)
    c = ours.config
    assert (c.adapter_len, c.adapter_layer, c.gate_act, c.prompt_projection) == (K, L, "identity", "litgpt")
    x = tokens(4)
    torch.testing.assert_close(logits(ours.eval(), x), lit_logits(model, x), **TOL)
    # LitGPT 0.5 slices the prompt's K/V as if q, k, v were interleaved per kv group; its adapter differs from the
    # paper's math (our wk_wv projection) for MHA and GQA alike
    ours.config.prompt_projection = "wk_wv"
    for layer in ours.layers:
        layer.attention.prompt_projection = "wk_wv"
    assert not torch.allclose(logits(ours, x), lit_logits(model, x), atol=1e-3)


def test_ours_exported_to_litgpt_gives_our_logits(hf_dir, tmp_path):
    lit = litgpt_adapter_module()
    d, gqa = hf_dir
    ours = randomize(ours_with(d, gate_act="tanh", prompt_projection="litgpt"))
    ours.save_adapter(tmp_path / "a.safetensors")
    interop.convert(tmp_path / "a.safetensors", tmp_path / "lit_model.pth.adapter", "litgpt")
    model = litgpt_from_ours(ours)
    state = torch.load(tmp_path / "lit_model.pth.adapter", weights_only=True)["model"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(not lit.adapter_filter(n, None) for n in missing)
    x = tokens(5)
    torch.testing.assert_close(lit_logits(model, x), logits(ours, x), **TOL)


def test_paper_projection_is_refused_by_litgpt(hf_dir, tmp_path):
    d, gqa = hf_dir
    randomize(ours_with(d, gate_act="identity")).save_adapter(tmp_path / "a.safetensors")
    with pytest.raises(interop.AdapterFormatError, match="interleaved slices .* unless the model has a single kv "
                       "head"):
        interop.convert(tmp_path / "a.safetensors", tmp_path / "lit.pth", "litgpt")
    assert not (tmp_path / "lit.pth").exists()


# ----------------------------------------------------------------------------------------------- official
def official_state(ours):
    """The official V1 release layout, from its documented names: adapter_query.weight [L*K, D] (the adapted
    layers bottom to top) and layers.{i}.attention.gate [1, H, 1, 1] for every layer, tanh applied on use."""
    c = ours.config
    sd = {f"layers.{i}.attention.gate": torch.zeros(1, c.n_heads, 1, 1) for i in range(c.n_layers)}
    rows = []
    for i in range(c.first_adapted_layer, c.n_layers):
        a = ours.layers[i].attention
        sd[f"layers.{i}.attention.gate"] = a.adapter_gate.detach().view(1, -1, 1, 1).clone()
        rows.append(a.adapter_prompt.detach())
    sd["adapter_query.weight"] = torch.cat(rows)
    return sd


def test_official_layout_loads_with_the_reference_logits(hf_dir, tmp_path, monkeypatch):
    import functools

    from lladapter_ext import ops

    d, gqa = hf_dir
    want = randomize(ours_with(d, gate_act="tanh"))
    torch.save(official_state(want), tmp_path / "adapter.pth")
    assert interop.detect_format(tmp_path / "adapter.pth") == "official"
    got, _ = load_model(d, adapter=tmp_path / "adapter.pth", tokenizer=False)
    assert (got.config.adapter_len, got.config.adapter_layer, got.config.gate_act) == (K, L, "tanh")
    assert_same_adapter(got, want)
    x = tokens(6)
    got_logits = logits(got.eval(), x)
    with monkeypatch.context() as m:  # the reference math: reference.gated_prompt_attention in every layer
        m.setattr(ops, "gated_prompt_attention", functools.partial(ops.gated_prompt_attention, backend="reference"))
        torch.testing.assert_close(got_logits, logits(want, x), **TOL)
    # ours written in the official layout holds exactly these tensors
    want.save_adapter(tmp_path / "a.safetensors")
    interop.convert(tmp_path / "a.safetensors", tmp_path / "official.pth", "official")
    written = torch.load(tmp_path / "official.pth", weights_only=True)
    ref = official_state(want)
    assert written.keys() == ref.keys() and all(torch.equal(written[k], ref[k]) for k in ref)


def test_official_adapter_length_when_gates_cannot_tell(hf_dir, tmp_path):
    d, _ = hf_dir
    fresh = ours_with(d, gate_act="tanh")  # gates zero: L*K = 8 rows could be 2 layers x 4 or 1 x 8 ...
    torch.save(official_state(fresh), tmp_path / "fresh.pth")
    with pytest.raises(interop.AdapterFormatError, match="every gate is zero.*--adapter-len"):
        interop.read_adapter(tmp_path / "fresh.pth")
    a = interop.read_adapter(tmp_path / "fresh.pth", adapter_len=K)
    assert (a.adapter_len, a.adapter_layer) == (K, L)
    with pytest.raises(interop.AdapterFormatError, match="not K=3 rows"):
        interop.read_adapter(tmp_path / "fresh.pth", adapter_len=3)


# ----------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("target,hp", [("peft", dict(gate_act="identity")), ("official", dict(gate_act="tanh")),
                                       ("litgpt", dict(gate_act="identity", prompt_projection="litgpt")),
                                       ("lladapter", dict(gate_act="tanh"))])
def test_round_trip_is_lossless(hf_dir, tmp_path, target, hp):
    d, _ = hf_dir
    ours = randomize(ours_with(d, **hp), same_gate_per_head=target == "peft")
    ours.save_adapter(tmp_path / "a.safetensors")
    out = tmp_path / ("x" if target == "peft" else "x.file")
    interop.convert(tmp_path / "a.safetensors", out, target)
    interop.convert(out, tmp_path / "back.safetensors", "lladapter", n_heads=ours.config.n_heads)
    back = ours_with(d, **hp)
    back.load_adapter(tmp_path / "back.safetensors")
    assert_same_adapter(back, ours)
    direct = ours_with(d, **hp)
    direct.load_adapter(out)  # every format loads directly too
    assert_same_adapter(direct, ours)


def test_tanh_gates_become_identity_gates_of_the_same_value(hf_dir, tmp_path):
    d, _ = hf_dir
    ours = randomize(ours_with(d, gate_act="tanh"), same_gate_per_head=True)
    ours.save_adapter(tmp_path / "a.safetensors")
    interop.convert(tmp_path / "a.safetensors", tmp_path / "peft", "peft")
    back, _ = load_model(d, adapter=tmp_path / "peft", tokenizer=False)
    assert back.config.gate_act == "identity"
    for i in range(ours.config.first_adapted_layer, ours.config.n_layers):
        assert torch.equal(back.layers[i].attention.adapter_gate, torch.tanh(ours.layers[i].attention.adapter_gate))
    x = tokens(8)
    torch.testing.assert_close(logits(back.eval(), x), logits(ours, x), **TOL)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_names_the_file_and_writes_nothing(hf_dir, tmp_path):
    d, _ = hf_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(interop.AdapterFormatError, match="empty: no adapter of a known format"):
        interop.convert(tmp_path / "empty", tmp_path / "out", "peft")
    ours = randomize(ours_with(d, gate_act="tanh"))
    ours.save_adapter(tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(interop.AdapterFormatError, match="cut.safetensors: not a readable"):
        interop.convert(tmp_path / "cut.safetensors", tmp_path / "out", "official")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(interop.AdapterFormatError, match="junk.pth: not a readable adapter file .*corrupt, "
                       "truncated or not a torch file"):
        interop.detect_format(tmp_path / "junk.pth")
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(interop.AdapterFormatError, match="other.pth: holds no adapter tensors of a known format"):
        interop.detect_format(tmp_path / "other.pth")
    # an adapter for another model shape: the loader says which
    torch.save(official_state(ours), tmp_path / "adapter.pth")
    wider, _ = load_hf(d, tokenizer=False, adapter_len=K, adapter_layer=3, gate_act="tanh")
    with pytest.raises(ValueError, match=r"adapter.pth \(official\): does not fit .*adapter_layer=3.*missing tensor "):
        wider.load_adapter(tmp_path / "adapter.pth")
    # OUT exists: refused unless forced, and left as it was
    (tmp_path / "taken.pth").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="taken.pth: exists"):
        interop.convert(tmp_path / "a.safetensors", tmp_path / "taken.pth", "official")
    assert (tmp_path / "taken.pth").read_bytes() == b"keep me"
    interop.convert(tmp_path / "a.safetensors", tmp_path / "taken.pth", "official", overwrite=True)
    assert interop.detect_format(tmp_path / "taken.pth") == "official"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".lladapter-convert-")]  # no temporaries left


def test_other_model_shape_is_refused_when_loading_a_foreign_adapter(tmp_path):
    from lladapter_ext.model import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=96, dim=32, n_layers=3, n_heads=4, ffn_dim=48, adapter_len=K,
                                         adapter_layer=L))
    torch.save(official_state(randomize(small)), tmp_path / "adapter.pth")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=96, dim=64, n_layers=3, n_heads=4, ffn_dim=48, adapter_len=K,
                                         adapter_layer=L))
    with pytest.raises(ValueError, match=r"adapter.pth: a official adapter for a model of width 32 and 3 layers; "
                       "this model has width 64"):
        other.load_adapter(tmp_path / "adapter.pth")


def test_convert_command_line(hf_dir, tmp_path):
    d, _ = hf_dir
    randomize(ours_with(d, gate_act="identity")).save_adapter(tmp_path / "a.safetensors")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = lambda *a: subprocess.run([sys.executable, "-m", "lladapter_ext", "convert", *a], capture_output=True,  # noqa: E731
                                    text=True, env=env, cwd=ROOT, timeout=300)
    ok = run(str(tmp_path / "a.safetensors"), str(tmp_path / "o.pth"), "--to", "official")
    assert ok.returncode == 0, ok.stderr
    assert "lladapter adapter: K=4 prompt tokens in the top 2 of 3 layers" in ok.stdout
    refused = run(str(tmp_path / "a.safetensors"), str(tmp_path / "peft"), "--to", "peft")
    assert refused.returncode == 2 and "one gate per layer" in refused.stderr, refused.stderr
    assert not (tmp_path / "peft").exists()


def test_a_foreign_adapter_is_read_once_per_load_and_again_when_changed(hf_dir, tmp_path, monkeypatch):
    """load_model(adapter=) detects the format, reads the hyper-parameters, then loads the tensors: one read of
    the file (a torch pickle here), not three; a file replaced since is read again."""
    d, _ = hf_dir
    path = tmp_path / "official.pth"
    calls = []
    read = interop._torch_load_uncached
    monkeypatch.setattr(interop, "_torch_load_uncached", lambda p: calls.append(p) or read(p))
    for seed in (1, 5):  # the second file replaces the first: read again, its values loaded
        src = randomize(ours_with(d), seed=seed)
        src.save_adapter(tmp_path / "ours.safetensors")
        interop.convert(tmp_path / "ours.safetensors", path, "official", overwrite=True)
        calls.clear()
        model, _ = load_model(d, adapter=path, tokenizer=False)
        assert len(calls) == 1, calls
        assert_same_adapter(model, src)
        assert not interop._READ_CACHE  # nothing kept after the load (a server loads adapters for days)
