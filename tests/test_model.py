"""LlamaForCausalLM: presets, adapter parameters, zero-init, padding, loss, adapter I/O, parity with PEFT."""
import pytest
import torch

from lladapter_ext.model import PRESETS, LlamaConfig, LlamaForCausalLM, config_from_preset
from llama_helpers import save_hf, tiny_hf_model


def small_config(**kw):
    args = dict(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=48, adapter_len=3,
                adapter_layer=2, max_seq_len=64)
    args.update(kw)
    return LlamaConfig(**args)


def random_gates(model, low=-1.0, high=1.0):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adapter_gate"):
                p.uniform_(low, high)


# ----------------------------------------------------------------------------------------- config / parameters
def test_llama7b_trainable_params_on_meta():
    model = LlamaForCausalLM(config_from_preset("llama-7b", adapter_len=10, adapter_layer=30), device="meta")
    assert model.count_trainable() == 30 * 10 * 4096 + 30 * 32 == 1_229_760
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_on_meta(name):
    cfg = config_from_preset(name)
    model = LlamaForCausalLM(cfg, device="meta")
    L = min(30, cfg.n_layers)
    assert model.count_trainable() == L * 10 * cfg.dim + L * cfg.n_heads
    assert cfg.dim == cfg.n_heads * cfg.head_dim


def test_preset_facts():
    assert config_from_preset("llama2-70b").n_kv_heads == 8
    assert config_from_preset("llama3.1-8b").rope_scaling["factor"] == 8.0
    s = config_from_preset("smollm2-135m")
    assert (s.dim, s.n_layers, s.n_heads, s.n_kv_heads, s.ffn_dim, s.tie_embeddings) == (576, 30, 9, 3, 1536, True)
    with pytest.raises(ValueError, match="unknown preset 'llama-8b'"):
        config_from_preset("llama-8b")


def test_config_validation_names_argument():
    with pytest.raises(ValueError, match="n_heads \\(6\\) must be a multiple of n_kv_heads \\(4\\)"):
        LlamaConfig(dim=48, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="gate_act must be one of"):
        LlamaConfig(gate_act="sigmoid")


def test_adapter_layers_clipped_to_depth_and_only_adapter_trains():
    model = LlamaForCausalLM(small_config(adapter_layer=30))
    assert model.config.n_adapted_layers == 4
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attention.adapter_{k}" for i in range(4) for k in ("prompt", "gate")}
    model2 = LlamaForCausalLM(small_config(adapter_layer=2))
    assert model2.layers[1].attention.adapter_prompt is None and model2.layers[2].attention.adapter_prompt is not None
    assert all((p == 0).all() for n, p in model2.named_parameters() if n.endswith("adapter_gate"))
    assert model2.count_trainable() == 2 * 3 * 32 + 2 * 4


# ----------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("gate_act", ["tanh", "identity"])
def test_zero_gate_equals_base_exactly(gate_act):
    model = LlamaForCausalLM(small_config(gate_act=gate_act)).eval()
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        adapted = model(x).logits
        model.use_adapter = False
        base = model(x).logits
        model.use_adapter = True
    assert torch.equal(adapted, base)
    # and against a model built without any adapter, holding the same base weights
    plain = LlamaForCausalLM(small_config(adapter_len=0)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "adapter" not in k})
    with torch.no_grad():
        assert torch.equal(plain(x).logits, base)
    random_gates(model)
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, base)


def test_gate_act_tanh_vs_identity():
    a = LlamaForCausalLM(small_config(gate_act="tanh")).eval()
    b = LlamaForCausalLM(small_config(gate_act="identity")).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        for (n, p_a), p_b in zip(a.named_parameters(), b.parameters()):
            if n.endswith("adapter_gate"):
                p_a.fill_(0.5)
                p_b.fill_(float(torch.tanh(torch.tensor(0.5))))
        torch.testing.assert_close(a(x).logits, b(x).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_unpadded_logits(side):
    model = LlamaForCausalLM(small_config()).eval()
    random_gates(model)
    seqs = [torch.randint(0, 64, (n,)) for n in (7, 4)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(7 - len(s), 7) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for b, s in enumerate(seqs):
            alone = model(s.view(1, -1)).logits[0]
            sl = slice(7 - len(s), 7) if side == "left" else slice(0, len(s))
            # fp32: the same sums with padded (exactly-zero-weight) keys; only reduction order may differ
            torch.testing.assert_close(batched[b, sl], alone, rtol=1e-5, atol=1e-5)


def _packed_row(lengths, width):
    """ids, segment_ids [1, width] of sequences of the given lengths packed into one row (then padding), and the
    sequences themselves."""
    seqs = [torch.randint(0, 64, (n,)) for n in lengths]
    ids = torch.zeros(1, width, dtype=torch.long)
    seg = torch.full((1, width), len(lengths), dtype=torch.long)  # padding: one more segment
    pos = 0
    for k, sq in enumerate(seqs):
        ids[0, pos:pos + len(sq)] = sq
        seg[0, pos:pos + len(sq)] = k
        pos += len(sq)
    return ids, seg, seqs


def test_packed_row_gives_each_sequence_its_own_logits_loss_and_gradients():
    """The key property of exact packing: with segment_ids, each packed sequence (lengths 1 included) gets the
    logits, loss and adapter gradients it gets alone."""
    model = LlamaForCausalLM(small_config())
    random_gates(model)
    ids, seg, seqs = _packed_row([5, 1, 9, 3, 1], 22)
    with torch.no_grad():
        packed = model(ids, segment_ids=seg).logits[0]
        pos = 0
        for sq in seqs:
            alone = model(sq.view(1, -1)).logits[0]
            # fp32: the same sums (keys of other sequences get weight exactly 0); only reduction order may differ
            torch.testing.assert_close(packed[pos:pos + len(sq)], alone, rtol=1e-5, atol=1e-5)
            pos += len(sq)
        plain = model(ids).logits[0]  # without segment_ids the later sequences see the earlier ones
        assert not torch.allclose(plain[5:], packed[5:], rtol=1e-3, atol=1e-3)
    # loss and gradients: labels as pack_examples makes them (each sequence's first label masked)
    labels = ids.clone()
    labels[seg == len(seqs)] = -100
    starts = torch.tensor([0, 5, 6, 15, 18])
    labels[0, starts] = -100
    n_tokens = int((labels[:, 1:] != -100).sum())
    packed_loss = model(ids, labels=labels, segment_ids=seg).loss * n_tokens
    packed_loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0.0
    for sq in seqs:
        if len(sq) > 1:
            loss = model(sq.view(1, -1), labels=sq.view(1, -1)).loss * (len(sq) - 1)
            loss.backward()
            total += float(loss.detach())
    assert n_tokens == sum(len(sq) - 1 for sq in seqs)
    assert float(packed_loss.detach()) == pytest.approx(total, rel=1e-5)
    assert packed_grads and set(packed_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in packed_grads.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[n].grad, rtol=1e-4, atol=1e-5)


def test_segment_ids_with_left_padding_and_without_boundaries():
    model = LlamaForCausalLM(small_config()).eval()
    random_gates(model)
    # left padding (its own segment, masked) then two sequences: positions restart at 0 for each
    ids, seg, seqs = _packed_row([2, 4, 3], 9)
    mask = (seg != 0).long()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, segment_ids=seg).logits[0]
        torch.testing.assert_close(out[2:6], model(seqs[1].view(1, -1)).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[6:9], model(seqs[2].view(1, -1)).logits[0], rtol=1e-5, atol=1e-5)
        # one segment per row: exactly the unpacked forward
        x = torch.randint(0, 64, (2, 7))
        assert torch.equal(model(x, segment_ids=torch.zeros(2, 7, dtype=torch.long)).logits, model(x).logits)


def test_segment_ids_bad_shape_or_with_cache_is_refused():
    model = LlamaForCausalLM(small_config())
    x = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\] = \[2, 4\], got \[2, 3\]"):
        model(x, segment_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="segment_ids .* cannot be used with a KV cache"):
        model(x, segment_ids=torch.zeros(2, 4, dtype=torch.long), cache=model.new_cache(2, 8))


def test_mask_with_a_hole_is_refused():
    model = LlamaForCausalLM(small_config())
    with pytest.raises(ValueError, match="attention_mask: the real tokens of each sample must be one contiguous"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \[1, 4\]"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))


def test_logits_to_keep_gives_the_last_positions_logits_with_and_without_a_cache():
    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config())
    random_gates(model)
    x = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    full = model(x, attention_mask=mask).logits
    # The same hidden states; only the LM head's GEMM has fewer rows, for which the BLAS (or few_rows_linear's
    # route) may pick another kernel and summation order: equal to fp32 rounding of a dim-term dot product (seen:
    # bit-equal on an Intel Xeon, 7e-8 apart on an AMD EPYC), not necessarily bit for bit.
    for keep in (1, 3, 6):
        torch.testing.assert_close(model(x, attention_mask=mask, logits_to_keep=keep).logits, full[:, -keep:],
                                   rtol=1e-5, atol=1e-6)
    # a prefill with a cache, then a decode step: the cache is filled for every position, not only the kept ones
    cache = model.new_cache(2, 8)
    last = model(x, attention_mask=mask, cache=cache, logits_to_keep=1).logits
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)
    nxt = torch.randint(0, 64, (2, 1))
    step = model(nxt, cache=cache).logits
    whole = model(torch.cat([x, nxt], 1), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1))
    torch.testing.assert_close(step, whole.logits[:, -1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        model(x, logits_to_keep=-1)
    with pytest.raises(ValueError, match="logits_to_keep is for calls without labels"):
        model(x, labels=x, logits_to_keep=1)


def test_labels_loss_hf_convention_and_no_graph_below_adapter():
    model = LlamaForCausalLM(small_config(adapter_layer=2))
    random_gates(model)
    x = torch.randint(0, 64, (2, 8))
    labels = x.clone()
    labels[0, :3] = -100
    labels[1, 6:] = -100
    seen = {}

    def record(key):
        def hook(module, inputs, output):
            seen[key] = output.requires_grad  # returns None: the output is left alone
        return hook

    model.layers[1].register_forward_hook(record("below"))
    model.layers[2].register_forward_hook(record("adapted"))
    out = model(x, labels=labels)
    assert out.logits is None
    assert seen == {"below": False, "adapted": True}
    with torch.no_grad():
        full = model(x).logits
    keep = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(full[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == {f"layers.{i}.attention.adapter_{k}" for i in (2, 3) for k in ("prompt", "gate")}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def _loss_and_grads_two_ways(model, ids, labels, **kw):
    """(loss, adapter grads) with labels (the model's loss path) and from the full logits' cross-entropy over the
    same labelled positions (every row through every layer)."""
    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss = model(ids, labels=labels, **kw).loss
    got = (loss.detach(), grads(loss))
    keep = labels[:, 1:] != -100
    full = torch.nn.functional.cross_entropy(model(ids, **kw).logits[:, :-1][keep], labels[:, 1:][keep])
    return got, (full.detach(), grads(full))


@pytest.mark.parametrize("inputs", ["plain", "left padding", "packed rows"])
def test_last_layer_runs_from_the_first_row_the_loss_reads(inputs, monkeypatch):
    """The last layer's queries, wo and feed-forward run only from the first position whose output the loss reads
    in any sample (its keys and values from every row): the loss and the adapter gradients are the ones of every
    row through every layer, within fp32 rounding (the same products, in blocks of other sizes)."""
    from lladapter_ext import ops

    model = LlamaForCausalLM(small_config(n_layers=3, adapter_layer=2))
    random_gates(model)
    B, T = 3, 40
    ids = torch.randint(0, 64, (B, T))
    labels = ids.clone()
    for b, start in enumerate((21, 26, 34)):  # the loss reads positions from 20 on (position t predicts t + 1)
        labels[b, :start] = -100
    labels[1, 31] = -100  # (a hole after the start changes nothing)
    kw = {}
    if inputs == "left padding":
        kw["attention_mask"] = torch.ones(B, T, dtype=torch.long)
        kw["attention_mask"][0, :4] = 0
    elif inputs == "packed rows":
        kw["segment_ids"] = (torch.arange(T) >= 30).long().expand(B, T)  # rows 30+ a second sequence
        labels[:, 30] = -100
    rows = []
    swiglu = ops.swiglu
    monkeypatch.setattr(ops, "swiglu", lambda a, b: rows.append(a.shape[:-1]) or swiglu(a, b))
    assert model._loss_rows_start(labels[:, 1:] != -100, None) == 20
    (loss, grads), (full_loss, full_grads) = _loss_and_grads_two_ways(model, ids, labels, **kw)
    assert rows[:3] == [(B, T), (B, T), (B, T - 20)]  # the last layer's feed-forward from row 20 on
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    assert set(grads) == set(full_grads) == {f"layers.{i}.attention.adapter_{k}" for i in (1, 2)
                                             for k in ("prompt", "gate")}
    for n in grads:
        torch.testing.assert_close(grads[n], full_grads[n], rtol=1e-5, atol=1e-6)


def test_last_layer_runs_every_row_where_something_watches_it():
    """A hook on the last layer (or under it) sees its usual output: every row (and the same loss)."""
    model = LlamaForCausalLM(small_config(n_layers=2, adapter_layer=1))
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[:, :8] = -100
    reads = labels[:, 1:] != -100
    assert model._loss_rows_start(reads, None) == 7
    assert model._loss_rows_start(torch.zeros_like(reads), None) == 0  # nothing labelled
    assert model._loss_rows_start(reads, model.new_cache(2, 16)) == 0  # (a cache: every row is kept)
    from lladapter_ext import emulator
    if emulator.available():
        with emulator.kernels():  # the CUDA kernels' routes (split attention): every row
            assert model._loss_rows_start(reads, None) == 0
    shapes = []
    handle = model.layers[1].feed_forward.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    assert model._loss_rows_start(reads, None) == 0
    hooked = model(ids, labels=labels).loss
    handle.remove()
    assert shapes == [(2, 12, 32)]
    torch.testing.assert_close(model(ids, labels=labels).loss, hooked, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"labels must be \[B, T\] = \[2, 12\], got \[2, 11\]"):
        model(ids, labels=labels[:, 1:])


def test_zero_init_gradient_reaches_gate_not_prompt():
    model = LlamaForCausalLM(small_config(gate_act="tanh"))
    x = torch.randint(0, 64, (2, 6))
    model(x, labels=x).loss.backward()
    att = model.layers[-1].attention
    assert att.adapter_gate.grad.abs().sum() > 0  # d tanh(g)/dg = 1 at g = 0
    assert torch.equal(att.adapter_prompt.grad, torch.zeros_like(att.adapter_prompt))  # scaled by tanh(0) = 0


def test_adapter_save_load_roundtrip(tmp_path):
    a = LlamaForCausalLM(small_config())
    random_gates(a)
    path = tmp_path / "adapter.safetensors"
    a.save_adapter(path)
    b = LlamaForCausalLM(small_config())
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "adapter" not in k}, strict=False)
    b.load_adapter(path)
    for (n1, p1), (n2, p2) in zip(a.adapter_state_dict().items(), b.adapter_state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    assert set(a.adapter_state_dict()) == {n for n, p in a.named_parameters() if p.requires_grad}
    c = LlamaForCausalLM(small_config(adapter_len=4))
    with pytest.raises(ValueError, match=r"tensor 'layers\.2\.attention\.adapter_prompt' has shape \[3, 32\], "
                                         r"expected \[4, 32\]"):
        c.load_adapter(path)
    d = LlamaForCausalLM(small_config(adapter_layer=3))
    with pytest.raises(ValueError, match=r"missing tensor 'layers\.1\.attention\.adapter_gate'"):
        d.load_adapter(a.adapter_state_dict())


def test_bf16_forward_runs_and_tracks_fp32():
    model = LlamaForCausalLM(small_config()).eval()
    random_gates(model)
    x = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        ref = model(x).logits
        model.to(torch.bfloat16)
        out = model(x).logits
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (~4e-3 relative) per op; 4 layers of rounding stay within a few 1e-2
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------- PEFT parity
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_matches_peft_adaption_prompt(tmp_path, gqa):
    peft = pytest.importorskip("peft", reason="peft is a test dependency")
    from lladapter_ext.loaders import load_hf

    hf = tiny_hf_model(gqa)
    save_hf(hf, tmp_path)
    K, L = 4, 2
    peft_model = peft.get_peft_model(hf, peft.AdaptionPromptConfig(adapter_len=K, adapter_layers=L,
                                                                   task_type="CAUSAL_LM")).eval()
    adapted = {}
    for name, mod in peft_model.named_modules():
        if type(mod).__name__ == "AdaptedAttention":
            layer = int(name.split("layers.")[1].split(".")[0])
            adapted[layer] = mod
    n = hf.config.num_hidden_layers
    assert sorted(adapted) == list(range(n - L, n))  # PEFT adapts the top L layers, as we do

    ours, _ = load_hf(tmp_path, adapter_len=K, adapter_layer=L, gate_act="identity", tokenizer=False)
    ours.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for layer, mod in adapted.items():
            mod.adaption_prompt.normal_()
            mod.adaption_gate.fill_(0.3 + 0.2 * layer)  # PEFT: one scalar gate per layer (identity activation)
            att = ours.layers[layer].attention
            att.adapter_prompt.copy_(mod.adaption_prompt[0])
            att.adapter_gate.fill_(float(mod.adaption_gate))
    x = torch.randint(0, hf.config.vocab_size, (2, 10))
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        got = ours(x).logits
    assert not torch.allclose(expected, ours_base_logits(ours, x), atol=1e-3)  # the adapter does change things
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def ours_base_logits(model, x):
    with torch.no_grad():
        model.use_adapter = False
        try:
            return model(x).logits
        finally:
            model.use_adapter = True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows", [1, 5, 37])
def test_lm_head_cross_entropy_matches_autograd(dtype, rows):
    """The LM-head loss with the in-place softmax backward gives F.cross_entropy's loss and gradients (h and weight)
    over the same logits: fp64 to fp64 rounding; fp32 to fp32 rounding; bf16 gradients within bf16 rounding of the
    fp32-accumulated reference (the logits and the gradient GEMMs are bf16 in both). (No gradcheck: it runs the
    backward twice on one graph to test reentrancy, which this function refuses; fp64 F.cross_entropy is the oracle.)"""
    from lladapter_ext.nn import lm_head_cross_entropy
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 48, generator=g).to(dtype)
    w = (torch.randn(300, 48, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, 300, (rows,), generator=g)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h1, w1).to(stat), t)
    got = lm_head_cross_entropy(h2, w2, t)
    assert got.dtype == stat and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    want.backward()
    got.backward()
    tol = dict(rtol=2e-2, atol=2e-2 * float(h1.grad.abs().max())) if dtype == torch.bfloat16 else \
        dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-15)
    assert h2.grad.dtype == dtype and w2.grad.dtype == dtype
    torch.testing.assert_close(h2.grad, h1.grad, **tol)
    torch.testing.assert_close(w2.grad, w1.grad, **tol)


@pytest.mark.parametrize("rows", [3, 37])
def test_lm_head_cross_entropy_keeps_one_vocab_sized_buffer(monkeypatch, rows):
    """The log-probabilities are written over the logits (fp32): the forward holds one [N, V] tensor, not two, and
    the loss is still F.cross_entropy's to fp32 rounding (the value test above covers every dtype and route)."""
    from lladapter_ext import nn as lnn
    made, linear = [], lnn.linear

    def recording(*args, **kwargs):
        made.append(linear(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(lnn, "linear", recording)
    h, w = torch.randn(rows, 16, requires_grad=True), torch.randn(50, 16)
    t = torch.randint(0, 50, (rows,))
    loss = lnn.lm_head_cross_entropy(h, w, t)
    kept = loss.grad_fn.saved_tensors[3]
    assert len(made) == 1 and kept.shape == (rows, 50)
    assert kept.untyped_storage().data_ptr() == made[0].untyped_storage().data_ptr()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.t(), t), rtol=1e-6, atol=1e-6)


def test_lm_head_cross_entropy_refuses_bad_input_and_a_second_backward():
    from lladapter_ext.nn import lm_head_cross_entropy
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"h must be \[N, D\] and weight \[V, D\], got \[4, 8\] and \[10, 7\]"):
        lm_head_cross_entropy(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be \[N\] = \[4\], got \[3\]"):
        lm_head_cross_entropy(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no rows"):
        lm_head_cross_entropy(h[:0], w, torch.zeros(0, dtype=torch.long))
    loss = lm_head_cross_entropy(h, w, torch.tensor([0, 1, 2, 9]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the kept log-probabilities became the gradient: never a silently wrong second gradient


@pytest.mark.parametrize("shape", [(64,), (1, 1, 64), (2, 1, 64), (4, 1, 64), (1, 4, 64), (8, 1, 64), (1, 16, 64),
                                   (3, 7, 64), (0, 1, 64)])
@pytest.mark.parametrize("max_rows", [4, 16])
@pytest.mark.parametrize("route", ["transposed", "linear", "gemv"])
def test_few_rows_linear_matches_linear(shape, max_rows, route, monkeypatch):
    """Decode steps take weight @ x^T or our GEMV kernel on the CPU where that beats the BLAS's few-row F.linear
    (nn.few_rows_route): every route gives the same values as F.linear to fp32 rounding, in x's layout, the same
    gradients, and the same bits with grad on and off (the route does not depend on grad mode)."""
    from lladapter_ext.nn import FEW_ROWS_ROUTE_ENV, DecodeLinear, few_rows_linear, few_rows_route
    monkeypatch.setenv(FEW_ROWS_ROUTE_ENV, route)
    assert few_rows_route() == route
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(100, 64, requires_grad=True)
    got = few_rows_linear(x, w, max_rows)
    want = torch.nn.functional.linear(x, w)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        got_no_grad = few_rows_linear(x, w, max_rows)
    assert got_no_grad.shape == want.shape and got_no_grad.is_contiguous()
    assert torch.equal(got_no_grad, got.detach())
    if got.numel():
        g = torch.randn_like(want)
        gx, gw = torch.autograd.grad(got, (x, w), g)
        wx, ww = torch.autograd.grad(want, (x, w), g)
        torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-4)
    lin = DecodeLinear(64, 100)
    assert set(lin.state_dict()) == {"weight"}  # nn.Linear's names: checkpoints load unchanged
    monkeypatch.setenv(FEW_ROWS_ROUTE_ENV, "sideways")
    with pytest.raises(ValueError, match="LLADAPTER_FEW_ROWS_ROUTE must be 'linear', 'transposed' or 'gemv', got "
                       "'sideways'"):
        few_rows_route()
    monkeypatch.setenv(FEW_ROWS_ROUTE_ENV, "gemv")  # a dtype the kernel cannot take: the faster of the other two
    assert few_rows_route(torch.float16) in ("transposed", "linear")
    assert few_rows_route(torch.bfloat16) == "gemv"
    monkeypatch.delenv(FEW_ROWS_ROUTE_ENV)
    assert few_rows_route(torch.float32) in ("transposed", "linear", "gemv")  # measured on this machine
    torch.testing.assert_close(lin(x.detach()), torch.nn.functional.linear(x.detach(), lin.weight),
                               rtol=1e-5, atol=1e-4)


def _openblas_or_skip():
    """nn's OpenBLAS, loaded; where scipy-openblas32 is a declared dependency (Linux x86_64) it must load."""
    import platform
    import sys

    from lladapter_ext import nn as lnn
    why = lnn._load_openblas()
    if why and sys.platform == "linux" and platform.machine() == "x86_64":
        pytest.fail(f"scipy-openblas32 is a dependency here, but OpenBLAS did not load: {why}")
    if why:
        pytest.skip(f"no OpenBLAS on this platform: {why}")
    return lnn


def _gemm_error_bound(a, b):
    """The worst-case rounding error of an fp32 a @ b summed in any order, elementwise: Higham's gamma_K with unit
    roundoff 2^-24 times |a| @ |b| (K * 2^-24 to first order, rounded up by 1%)."""
    return 1.01 * a.shape[1] * 2.0 ** -24 * (a.double().abs() @ b.double().abs())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_openblas_mm_matches_float64(threads):
    """_C.openblas_mm (nn.gemm_route's "openblas" route) against float64, on row slabs (many rows) and column slabs
    (few rows, the prompt K/V projections), every operand layout BLAS takes (row-major, transposed views, a leading
    dimension wider than the matrix) and ones it does not (copied first), into a given out, and empty sizes; each
    element within the fp32 GEMM's worst-case rounding bound."""
    lnn = _openblas_or_skip()
    from lladapter_ext import _C
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for m, k, n in [(512, 576, 192), (37, 64, 100), (10, 576, 1536), (1, 5, 7), (33, 17, 1), (300, 1, 40)]:
            a_full = torch.randn(m, k + 3, generator=g)
            w = torch.randn(n, k, generator=g)
            layouts_a = [a_full[:, :k], a_full[:, :k].contiguous(), a_full[:, :k].t().contiguous().t(),
                         a_full[:, :k].contiguous()[:, None, :].expand(m, 2, k)[:, 1, :], a_full[:, :k][::1, ::1]]
            layouts_b = [w.t(), w.t().contiguous(), torch.randn(k, 2 * n, generator=g)[:, ::2]]
            for a in layouts_a:
                for b in layouts_b:
                    want = a.double() @ b.double()
                    got = _C.openblas_mm(a, b)
                    assert got.shape == (m, n) and got.is_contiguous() and got.dtype == torch.float32
                    assert ((got.double() - want).abs() <= _gemm_error_bound(a, b)).all(), (m, k, n)
            out = torch.full((m, n + 5), float("nan"))[:, :n]
            res = _C.openblas_mm(layouts_a[0], layouts_b[0], out)
            assert res.data_ptr() == out.data_ptr() and not out.isnan().any()
            assert torch.equal(out, _C.openblas_mm(layouts_a[0], layouts_b[0]))
        assert _C.openblas_mm(torch.randn(0, 4), torch.randn(4, 3)).shape == (0, 3)
        assert torch.equal(_C.openblas_mm(torch.randn(2, 0), torch.randn(0, 3)), torch.zeros(2, 3))
    finally:
        torch.set_num_threads(old)
    assert lnn.gemm_route() in lnn.GEMM_ROUTES


def test_openblas_mm_refuses_bad_input():
    _openblas_or_skip()
    from lladapter_ext import _C
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with pytest.raises(RuntimeError, match="a must be a 2-D float32 CPU tensor, got Double"):
        _C.openblas_mm(a.double(), b)
    with pytest.raises(RuntimeError, match=r"b must be a 2-D float32 CPU tensor, got Float \[8, 3, 1\]"):
        _C.openblas_mm(a, b[..., None])
    with pytest.raises(RuntimeError, match=r"a \[4, 8\] and b \[7, 3\] cannot be multiplied"):
        _C.openblas_mm(a, torch.randn(7, 3))
    with pytest.raises(RuntimeError, match=r"out must be a row-major float32 CPU tensor \[4, 3\]"):
        _C.openblas_mm(a, b, torch.empty(3, 4))
    with pytest.raises(RuntimeError, match=r"out must be a row-major"):
        _C.openblas_mm(a, b, torch.empty(3, 4).t())
    # once loaded, later loads return the loaded library, whatever path they name
    assert _C.openblas_load("/nonexistent") == _C.openblas_library() != ""


@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64), (2, 300, 64)])
def test_linear_gemm_routes_agree(shape, monkeypatch):
    """nn.linear on more rows than few_rows_linear takes: the "openblas" route gives F.linear's values and gradients
    (x and weight) to fp32 rounding, the same bits with grad on and off, and keeps only the operand each gradient
    needs; "torch" is F.linear itself. LLADAPTER_GEMM_ROUTE picks the route; a bad value is named."""
    lnn = _openblas_or_skip()
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(100, 64, requires_grad=True)
    want = torch.nn.functional.linear(x, w)
    g = torch.randn_like(want)
    wx, ww = torch.autograd.grad(want, (x, w), g)

    def op_node(t):  # the autograd node that made t, through nn.linear's reshape
        node = t.grad_fn
        return node.next_functions[0][0] if type(node).__name__ == "ViewBackward0" else node

    monkeypatch.setattr(lnn, "_GEMM_ROUTE", [])
    monkeypatch.setenv(lnn.GEMM_ROUTE_ENV, "openblas")
    assert lnn.gemm_route() == "openblas"
    got = lnn.linear(x, w)
    assert type(op_node(got)).__name__ == "_OpenblasMmBackward"
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(lnn.linear(x, w), got.detach())
    gx, gw = torch.autograd.grad(got, (x, w), g)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-4)
    frozen = op_node(lnn.linear(x, w.detach()))  # a frozen weight: x is not kept (no weight gradient to compute)
    assert frozen.saved_tensors[0] is None and frozen.saved_tensors[1] is not None
    with torch.no_grad():  # nn.mm (the LM head's backward) takes the route too
        torch.testing.assert_close(lnn.mm(g.reshape(-1, 100), w), wx.reshape(-1, 64), rtol=1e-5, atol=1e-4)
    monkeypatch.setattr(lnn, "_GEMM_ROUTE", [])
    monkeypatch.setenv(lnn.GEMM_ROUTE_ENV, "torch")
    assert lnn.gemm_route() == "torch"
    assert torch.equal(lnn.linear(x, w), want)
    monkeypatch.setattr(lnn, "_GEMM_ROUTE", [])
    monkeypatch.setenv(lnn.GEMM_ROUTE_ENV, "mkl")
    with pytest.raises(ValueError, match="LLADAPTER_GEMM_ROUTE must be 'torch' or 'openblas', got 'mkl'"):
        lnn.gemm_route()


def test_linear_openblas_route_under_torch_compile(monkeypatch):
    """Under torch.compile nn.linear keeps the "openblas" route, as the op lladapter_blas::mm (nn.openblas_mm_op: in
    the compiled graph, no graph break): the output equal to the eager route's bit for bit, gradients to fp32
    rounding; and the op passes torch.library.opcheck (schema, fake, autograd registration)."""
    lnn = _openblas_or_skip()
    monkeypatch.setattr(lnn, "_GEMM_ROUTE", ["openblas"])
    x = torch.randn(3, 7, 64, requires_grad=True)
    w = torch.randn(100, 64, requires_grad=True)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    got = torch.compile(lambda x, w: lnn.linear(x, w), fullgraph=True, backend=keep, dynamic=True)(x, w)
    assert any("lladapter_blas.mm" in str(n.target) for gm in graphs for n in gm.graph.nodes)
    want = lnn.linear(x, w)
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(want, (x, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    torch.library.opcheck(lnn.openblas_mm_op, (torch.randn(5, 8, requires_grad=True),
                                               torch.randn(3, 8, requires_grad=True).t()))


def test_compiling_the_model_before_any_eager_call_takes_the_gemm_route(monkeypatch):
    """torch.compile(model) directly, before anything has asked nn.gemm_route (a fresh process, no
    training.compiled_forward): the route is settled while tracing and the compiled projections are its op; the
    logits equal the eager model's to fp32 rounding."""
    lnn = _openblas_or_skip()
    monkeypatch.setattr(lnn, "_GEMM_ROUTE", [])
    monkeypatch.setenv(lnn.GEMM_ROUTE_ENV, "openblas")
    model = LlamaForCausalLM(small_config())
    random_gates(model)
    ids = torch.randint(0, 64, (2, 16))  # 32 rows: more than few_rows_linear takes
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    got = torch.compile(model, backend=keep)(ids).logits
    assert lnn._GEMM_ROUTE == ["openblas"]
    ops_in_graphs = [str(n.target) for gm in graphs for n in gm.graph.nodes]
    # q, k, v, o, gate, up and down of every layer and the head; the prompt K/V projections (adapter_len = 3 rows:
    # few_rows_linear's) are the compiler's F.linear, not a route timed while tracing (which broke the graph)
    assert sum("lladapter_blas.mm" in t for t in ops_in_graphs) == 4 * 7 + 1, ops_in_graphs
    assert len(graphs) == 1
    torch.testing.assert_close(got, model(ids).logits, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_few_rows_gemv_matches_float64(isa, dtype, monkeypatch):
    """_C.few_rows_gemv (few_rows_linear's "gemv" route) on each of its paths: x @ w^T against a float64 reference
    of the same inputs within fp32 accumulation error over K terms (plus, in bf16, one rounding of the result), at
    shapes that exercise every tail (N not a multiple of the 4-row block, K not a multiple of the 8/16 vector
    lanes, 1 to 16 rows), non-contiguous x and an empty weight; each output is summed by one thread, so the bits
    do not depend on the thread count, nor on the software prefetch."""
    from lladapter_ext import _C
    if isa != "scalar":
        with open("/proc/cpuinfo") as f:  # (the CPU's flags: an unavailable path must be refused, not run)
            flags = next((line for line in f if line.startswith("flags")), "")
        need = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}[isa]
        if not all(f in flags.split() for f in need):
            monkeypatch.setenv("LLADAPTER_FEW_ROWS_GEMV_ISA", isa)
            with pytest.raises(RuntimeError, match=f"LLADAPTER_FEW_ROWS_GEMV_ISA={isa}, but this CPU"):
                _C.few_rows_gemv(torch.randn(1, 8), torch.randn(4, 8))
            pytest.skip(f"this CPU has no {isa} (the refusal was checked)")
    monkeypatch.setenv("LLADAPTER_FEW_ROWS_GEMV_ISA", isa)
    g = torch.Generator().manual_seed(0)
    for rows, n, k in [(1, 1536, 576), (1, 7, 13), (2, 5, 16), (3, 9, 17), (4, 4, 8), (16, 49, 577), (1, 1, 1),
                       (5, 130, 1536), (1, 0, 64)]:
        x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
        y = _C.few_rows_gemv(x, w)
        assert y.shape == (rows, n) and y.dtype == dtype
        ref = x.double() @ w.double().t()
        # fp32 rounding of K products and K - 1 sums: |error| <= ~K * eps * sum |x_k w_k|; bf16 rounds the result
        # once more (unit roundoff 2^-8)
        bound = 2 * k * torch.finfo(torch.float32).eps * (x.double().abs() @ w.double().abs().t()) + 1e-30
        if dtype == torch.bfloat16:
            bound = bound * (1 + 2**-8) + ref.abs() * 2**-8
        assert bool(((y.double() - ref).abs() <= bound).all()), (rows, n, k)
    x_strided = torch.randn(40, 3, generator=g).t().to(dtype)  # [3, 40], not contiguous
    w = torch.randn(21, 40, generator=g).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(_C.few_rows_gemv(x_strided, w), (x_strided.float() @ w.float().t()).to(dtype), **tol)
    x, w = torch.randn(4, 576, generator=g).to(dtype), torch.randn(3000, 576, generator=g).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _C.few_rows_gemv(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, _C.few_rows_gemv(x, w))
    # the software prefetch (on by default) changes what is read early, not the sums: the same bits without it,
    # at shapes where some blocks have a block two ahead to prefetch and the last ones do not
    for rows, n, k in [(1, 3000, 576), (2, 13, 40), (3, 12, 17)]:
        x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
        with_prefetch = _C.few_rows_gemv(x, w)
        monkeypatch.setenv("LLADAPTER_FEW_ROWS_GEMV_PREFETCH", "0")
        assert torch.equal(_C.few_rows_gemv(x, w), with_prefetch), (rows, n, k)
        monkeypatch.delenv("LLADAPTER_FEW_ROWS_GEMV_PREFETCH")
    # with a residual (the decode loop's residual adds): the bits of torch.add(residual, plain result), the add
    # rounding once in the dtype, on every tail and across the threads' row ranges
    for rows, n, k in [(1, 3000, 576), (2, 13, 40), (3, 9, 17), (16, 49, 577)]:
        x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
        residual = (torch.randn(rows, n, generator=g) * 3).to(dtype)
        fused = _C.few_rows_gemv(x, w, residual)
        assert fused.dtype == dtype and torch.equal(fused, torch.add(residual, _C.few_rows_gemv(x, w))), (rows, n, k)


def test_few_rows_gemv_refuses_bad_input(monkeypatch):
    """Errors name the argument: wrong dtype, device-independent shapes, too many rows, a strided weight, an
    input that wants a gradient (the kernel has no backward), an unknown path."""
    from lladapter_ext import _C
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Double"):
        _C.few_rows_gemv(x.double(), w)
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16, got BFloat16 and Float"):
        _C.few_rows_gemv(x.bfloat16(), w)
    with pytest.raises(RuntimeError, match=r"x must be \[rows, K\] with 1 to 16 rows, got \[17, 8\]"):
        _C.few_rows_gemv(torch.randn(17, 8), w)
    with pytest.raises(RuntimeError, match=r"x must be \[rows, K\]"):
        _C.few_rows_gemv(torch.randn(0, 8), w)
    with pytest.raises(RuntimeError, match=r"weight must be \[N, K\] with K = x's 8, got \[4, 9\]"):
        _C.few_rows_gemv(x, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        _C.few_rows_gemv(x, torch.randn(8, 4).t())
    with pytest.raises(RuntimeError, match="has no backward"):
        _C.few_rows_gemv(x.requires_grad_(), w)
    with torch.no_grad():  # grad off: fine, as in generation
        torch.testing.assert_close(_C.few_rows_gemv(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
        for bad in (torch.zeros(2, 5), torch.zeros(2, 4).double(), torch.zeros(4, 2).t(), torch.zeros(1, 4)):
            with pytest.raises(RuntimeError, match=r"residual must be a contiguous CPU tensor \[2, 4\] of x's dtype"):
                _C.few_rows_gemv(x, w, bad)
    # a residual that wants a gradient under grad mode: the result would have no grad_fn (a silently lost gradient)
    with pytest.raises(RuntimeError, match="residual requires grad, and the fused add has no backward"):
        _C.few_rows_gemv(x.detach(), w, torch.zeros(2, 4, requires_grad=True))
    monkeypatch.setenv("LLADAPTER_FEW_ROWS_GEMV_ISA", "sse")
    with pytest.raises(RuntimeError,
                       match="LLADAPTER_FEW_ROWS_GEMV_ISA must be auto, avx512, avx2 or scalar, got 'sse'"):
        _C.few_rows_gemv(x.detach(), w)
