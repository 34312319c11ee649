"""A quantized frozen base (lladapter_ext.quantize): storage layouts against torch's kernels and GGUF's own
dequantizer, layer numerics and gradients against the dequantized weight, loaders that never keep a float copy,
training through the quantized layers, and the errors."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from conftest import CUDA_DEVICES
from lladapter_ext import ops
from lladapter_ext import quantize as Q
from lladapter_ext.generation import generate_tokens
from lladapter_ext.loaders import load_model
from lladapter_ext.model import LlamaConfig, LlamaForCausalLM
from llama_helpers import gguf_source_model, save_ours_as_hf, smollm2_gguf, write_tiny_gguf

# dim 64 and ffn 128: int4's 64-wide groups; kv width 32 (2 heads of 16): int4's rows in 16s
# torch's CPU int4 kernel packs its weights in pack_int4's layout where it runs its AVX2 (or plain) kernels; where
# torch dispatches to AVX-512 it packs them another way (seen on an Intel Xeon with AVX-512, 2026-12-01), and the layer
# (which multiplies with ops.quantized_linear, not torch's kernel) does not depend on it
TORCH_PACKS_INT4_AS_OURS = torch.backends.cpu.get_cpu_capability() != "AVX512"

SMALL = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64,
             adapter_len=4, adapter_layer=2)


def _small_model(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    with torch.no_grad():  # unit-scale frozen weights: a random model whose outputs depend on every layer
        for name, p in model.named_parameters():
            if not p.requires_grad and p.ndim == 2:
                p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
    return model


def _dequantized_copy(qmodel: LlamaForCausalLM) -> LlamaForCausalLM:
    """The same model with every QuantizedLinear replaced by a float layer holding its dequantized weight."""
    from lladapter_ext.nn import DecodeLinear
    out = copy.deepcopy(qmodel)
    for name, m in list(out.named_modules()):
        if isinstance(m, Q.QuantizedLinear):
            lin = DecodeLinear(m.in_features, m.out_features)
            lin.weight = torch.nn.Parameter(m.dequantize(torch.float32), requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, lin)
    return out


# ------------------------------------------------------------------------------------------- storage
@pytest.mark.parametrize("shape", [(48, 64), (96, 32), (32, 576), (1536, 64)])
def test_pack_int4_is_torchs_cpu_layout(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.int32)
    ours = Q.pack_int4(codes)
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(ours, theirs) == TORCH_PACKS_INT4_AS_OURS
    assert torch.equal(Q.unpack_int4(ours), codes.to(torch.uint8))
    assert Q.packed_int4_kernel_ok() == TORCH_PACKS_INT4_AS_OURS


def test_quantization_error_is_within_half_a_step():
    w = torch.randn(64, 128) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitudes
    w[3] = 0.0  # an all-zero row
    w[5, :64] = 0.25  # a constant group
    codes, scales = Q.quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    err = (Q.dequantize_int8(codes, scales, torch.float32) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert (Q.dequantize_int8(codes, scales, torch.float32)[3] == 0).all()
    codes4, scale_low = Q.quantize_int4(w)
    assert codes4.max() <= 15 and scale_low.dtype == torch.float16 and scale_low.shape == (2, 64, 2)
    deq = Q.dequantize_int4(codes4, scale_low, torch.float32)
    step = scale_low[..., 0].float().t().repeat_interleave(64, dim=1)  # [N, K]
    # half a step from rounding, plus the fp16 rounding of each group's low value (at most 2^-11 of it)
    low = scale_low[..., 1].float().t().repeat_interleave(64, dim=1).abs()
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-3) + low * 2.0 ** -11).all()
    assert (deq[5, :64] == 0.25).all()


def test_gguf_blocks_map_exactly():
    """The real SmolLM2 file's Q4_1 projections and Q8_0 embedding: our codes and scales give gguf's own
    dequantized values (the same fp16 numbers, combined in fp32)."""
    import gguf
    import numpy as np
    reader = gguf.GGUFReader(smollm2_gguf())
    tensors = {t.name: t for t in reader.tensors}
    for name, fmt in [("blk.0.attn_q.weight", "int4"), ("blk.3.ffn_down.weight", "int4"),
                      ("token_embd.weight", "int8")]:
        t = tensors[name]
        N, K = (int(s) for s in reversed(list(t.shape)))
        rows = min(N, 256)
        raw = torch.from_numpy(np.array(t.data[:rows]))
        expect = torch.from_numpy(gguf.quants.dequantize(np.array(t.data[:rows]), t.tensor_type)).reshape(rows, K)
        if fmt == "int4":
            codes, scale_low = Q.from_gguf_q4_1(raw, rows, K)
            got = Q.dequantize_int4(codes, scale_low, torch.float32)
        else:
            codes, scales = Q.from_gguf_q8_0(raw, rows, K)
            got = Q.dequantize_int8(codes, scales, torch.float32)
        torch.testing.assert_close(got, expect, rtol=0, atol=1e-6 * expect.abs().max().item())


@pytest.mark.parametrize("qtype,fmt", [("Q4_0", "int4"), ("Q4_1", "int4"), ("Q8_0", "int8")])
def test_gguf_file_loads_its_blocks_without_requantising(tmp_path, qtype, fmt):
    """A GGUF file with Q4_0, Q4_1 or Q8_0 projections and LM head (written by gguf-py's own quantiser), loaded
    with quantize_head: every projection and the head are mapped from the file's blocks, each weight is gguf's
    dequantised one bit for bit, and the logits equal the fp32 load's (which dequantises the same blocks) up to the
    summation order."""
    import gguf
    import numpy as np

    from lladapter_ext.loaders import load_gguf
    path = tmp_path / f"tiny-{qtype}.gguf"
    written = write_tiny_gguf(path, gguf_source_model(), gguf.GGMLQuantizationType[qtype])
    model, _ = load_gguf(path, tokenizer=False, quantize=fmt, quantize_head=True)
    # 2 layers x 7 projections and the (untied) LM head
    assert model.quantization == {"format": fmt, "exact": 15, "requantized": 0, "head": True}
    for gname, ours in [("blk.0.attn_q", "layers.0.attention.wq"), ("blk.1.attn_k", "layers.1.attention.wk"),
                        ("blk.1.ffn_down", "layers.1.feed_forward.w2"), ("output", "output")]:
        layer = model.get_submodule(ours)
        raw, stored = written[f"{gname}.weight"]
        expect = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, stored)))
        assert torch.equal(layer.dequantize(torch.float32), expect.reshape(layer.out_features, -1)), gname
    dense, _ = load_gguf(path, tokenizer=False)
    x = torch.randint(0, 48, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("shape", [(80, 128), (1024, 1024)])  # 1024 x 1024, one row: int8 takes torch's kernel
def test_layer_matches_its_dequantized_weight(fmt, rows, shape):
    w = torch.randn(*shape) / 11
    layer = Q.QuantizedLinear.from_float(w, fmt, torch.float32)
    dense = layer.dequantize(torch.float32)
    x = torch.randn(rows, shape[1], requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, x @ dense.t(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ dense, rtol=1e-5, atol=1e-5)
    assert not layer.codes.requires_grad and not any(True for _ in layer.parameters())
    # bf16 activations: within bf16's resolution (8 bits) of the fp32 product, relative to the output's scale
    xb = x.detach().bfloat16()
    ref = xb.float() @ dense.t()
    assert (layer(xb).float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("blocks", [1, 3])
def test_layer_takes_the_gemm_route_on_fp32_rows(fmt, blocks, monkeypatch):
    """More fp32 CPU rows than the decode kernels take: the dequantized weight's forward and input-gradient GEMMs run
    on nn.gemm_route's route (OpenBLAS on AMD CPUs: the training step of a quantized SmolLM2 base 1.12-1.15x faster
    there, docs/quantization.md), whole or in row blocks, within fp32's GEMM rounding of the float64 product."""
    from torch.profiler import ProfilerActivity, profile

    from lladapter_ext import nn as lnn
    why = lnn._load_openblas()
    if why:
        pytest.skip(f"no OpenBLAS: {why}")  # (test_model checks that it loads where it is a dependency)
    w = torch.randn(96, 256) / 11
    layer = Q.QuantizedLinear.from_float(w, fmt, torch.float32)
    if blocks > 1:
        layer.max_dequant_elems = 32 * 256  # three blocks of 32 rows
    assert len(layer._row_blocks()) == blocks
    dense = layer.dequantize(torch.float32).double()
    x = torch.randn(80, 256, requires_grad=True)  # (more rows than the decode kernels take, KERNEL_MAX_ROWS_*)
    g = torch.randn(80, 96)
    for route, calls in (("openblas", 2 * blocks), ("torch", 0)):
        monkeypatch.setattr(lnn, "_GEMM_ROUTE", [route])
        x.grad = None
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(x).backward(g)
        assert sum(e.count for e in prof.key_averages() if e.key == "lladapter::openblas_mm") == calls, route
        y = layer(x.detach())
        bound = 1.01 * 256 * 2.0 ** -24 * (x.detach().double().abs() @ dense.abs().t())
        assert ((y.double() - x.detach().double() @ dense.t()).abs() <= bound).all(), route
        gbound = 1.01 * 96 * 2.0 ** -24 * (g.double().abs() @ dense.abs())
        assert ((x.grad.double() - g.double() @ dense).abs() <= gbound).all(), route


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchs_packed_kernels_read_our_layout(dtype):
    """Whichever path the layer picks on this CPU, torch's packed kernels compute x W^T from our stored codes and
    scales (int4: pack_int4's layout and kernel_scales_and_zeros; int8: per-row scales)."""
    w = torch.randn(96, 192) / 14
    x = torch.randn(2, 192).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    if TORCH_PACKS_INT4_AS_OURS:
        q4 = Q.QuantizedLinear.from_float(w, "int4", torch.float32)
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.codes, q4.group_size,
                                                         Q.kernel_scales_and_zeros(q4.scales, dtype))
        ref = x.float() @ q4.dequantize().t()
        assert (got.float() - ref).abs().max() <= tol * ref.abs().max()
    q8 = Q.QuantizedLinear.from_float(w, "int8", torch.float32)
    got = torch._weight_int8pack_mm(x, q8.codes, q8.scales.to(dtype))
    ref = x.float() @ q8.dequantize().t()
    assert (got.float() - ref).abs().max() <= tol * ref.abs().max()


def test_layer_on_a_batched_input_and_its_memory():
    w = torch.randn(256, 512)
    q8 = Q.QuantizedLinear.from_float(w, "int8", torch.float32)
    q4 = Q.QuantizedLinear.from_float(w, "int4", torch.float32)
    x = torch.randn(2, 3, 512)
    assert q8(x).shape == (2, 3, 256)
    torch.testing.assert_close(q4(x), x @ q4.dequantize().t(), rtol=1e-5, atol=1e-4)
    bf16_bytes = w.numel() * 2
    assert q8.weight_nbytes <= 0.51 * bf16_bytes
    assert q4.weight_nbytes <= 0.29 * bf16_bytes  # 4 bits + fp16 scale and low per 64: 4.5 bits per weight


# ------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("head", [False, True])
@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_quantized_model_logits_and_adapter_gradients_equal_the_dequantized_model(fmt, head):
    """head: the (untied) LM head quantized too: forward logits and the loss path's labelled rows go through it."""
    model = _small_model()
    q = Q.quantize_model(copy.deepcopy(model), fmt, head=head)
    assert q.quantization == dict(format=fmt, exact=0, requantized=14 + head, head=head)
    assert sum(isinstance(m, Q.QuantizedLinear) for m in q.modules()) == 14 + head
    if head:
        with pytest.raises(TypeError, match="quantized"):
            q.lm_head_weight()
        # dequantised in row blocks (as a large head is, limit_head_scratch): 96 rows in three blocks of 32
        q.output.max_dequant_elems = 32 * 64
        assert q.output._row_blocks() == [(0, 32), (32, 64), (64, 96)]
    dense = _dequantized_copy(q)
    with torch.no_grad():
        for p_q, p_d in zip(q.adapter_parameters(), dense.adapter_parameters()):
            p_q.normal_(0, 0.5)
            p_d.copy_(p_q)
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        logits = q(ids).logits
        torch.testing.assert_close(logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    out_q, out_d = q(ids, labels=ids), dense(ids, labels=ids)
    out_q.loss.backward()
    out_d.loss.backward()
    for p_q, p_d in zip(q.adapter_parameters(), dense.adapter_parameters()):
        torch.testing.assert_close(p_q.grad, p_d.grad, rtol=1e-4, atol=1e-6)
    # and the quantization itself stays close to the float model it came from (int8: ~0.4% per weight)
    with torch.no_grad():
        for p, p_q in zip(model.adapter_parameters(), q.adapter_parameters()):
            p.copy_(p_q)
        ref = model(ids).logits
    tol = {"int8": 0.05, "int4": 0.5}[fmt]
    assert (logits - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_decode_on_the_cuda_kernels_equals_the_dequantized_model(device, fmt, monkeypatch):
    """A quantized model (head included) decoding on the CUDA kernels (a GPU; on the CPU, the emulator): the prompt's
    rows are dequantized (more than CUDA_KERNEL_MAX_ROWS_BY_FORMAT), every decode step's rows (1 at batch 1, 2 at
    batch 2) go through ops.quantized_linear in each of the 15 layers, and the logits and greedy tokens are those of
    the dequantized float copy (fp32: the two differ only in the order of fp32 sums)."""
    rows = []  # the rows of each kernel call, but for the adapter prompt's K = 4 rows through wk and wv (few too)
    real = ops.quantized_linear

    def spy(x, codes, scales):
        if x.shape[0] != SMALL["adapter_len"]:
            rows.append(x.shape[0])
        return real(x, codes, scales)

    monkeypatch.setattr(ops, "quantized_linear", spy)
    q = Q.quantize_model(_small_model(), fmt, head=True).to(device)
    dense = _dequantized_copy(q)
    with torch.no_grad():
        for p_q, p_d in zip(q.adapter_parameters(), dense.adapter_parameters()):
            p_q.normal_(0, 0.5)
            p_d.copy_(p_q)
    ids = torch.randint(3, 96, (1, 6), device=device)
    with torch.no_grad():
        cache_q, cache_d = q.new_cache(1, 10), dense.new_cache(1, 10)
        a, b = q(ids, cache=cache_q).logits, dense(ids, cache=cache_d).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert rows == []  # 6 rows: dequantize + GEMM
        for _ in range(3):
            nxt = b[:, -1:].argmax(-1)
            a, b = q(nxt, cache=cache_q).logits, dense(nxt, cache=cache_d).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert rows == [1] * 15 * 3
    rows.clear()
    prompts = [[5, 17, 33, 2, 71], [9, 40, 88]]  # left-padded to 5: 10 prefill rows, then 2 rows per step
    want = generate_tokens(dense, prompts, 4)
    assert rows == []
    assert generate_tokens(q, prompts, 4) == want
    # the prefill's head runs on its last position only (logits_to_keep=1): 2 rows; then 3 decode steps
    assert rows == [2] * (1 + 15 * 3)


def test_training_through_a_quantized_base_learns():
    """The adapter trains through int4 layers as it does through their dequantized float copies: the same
    losses step for step (fp32 rounding apart), falling by over a quarter in 40 steps on a fixed batch."""
    q = Q.quantize_model(_small_model(seed=1), "int4")
    dense = _dequantized_copy(q)
    torch.manual_seed(2)
    ids = torch.randint(3, 96, (4, 16))
    losses = {}
    for name, model in (("int4", q), ("dense", dense)):
        opt = torch.optim.AdamW(model.adapter_parameters(), lr=3e-2)
        losses[name] = []
        for _ in range(40):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["int4"][-1] < 0.75 * losses["int4"][0], losses["int4"]
    torch.testing.assert_close(torch.tensor(losses["int4"]), torch.tensor(losses["dense"]), rtol=1e-3, atol=0)


def test_hf_loader_quantizes_each_weight_as_it_reads_it(tmp_path):
    model = _small_model()
    hf = dict(model_type="llama", vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, rms_norm_eps=1e-6)
    save_ours_as_hf(model, tmp_path, hf)
    loaded, _ = load_model(str(tmp_path), tokenizer=False, quantize="int8", adapter_len=4, adapter_layer=2)
    assert loaded.quantization == dict(format="int8", exact=0, requantized=14, head=False)
    ref = Q.quantize_model(copy.deepcopy(model), "int8")
    for (n, a), (_, b) in zip(loaded.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), n
    # no float copy of a projection is left anywhere in the model
    assert not [n for n, _ in loaded.named_parameters() if Q.is_quantizable(n)]


def test_preset_is_built_quantized_layer_by_layer(caplog):
    model, tok = load_model("smollm2-135m", quantize="int4", n_layers=2)
    assert tok is None and model.quantization == dict(format="int4", exact=0, requantized=14, head=False)
    assert not [n for n, p in model.named_parameters() if Q.is_quantizable(n)]
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.isfinite(model(ids).logits).all()
    # SmolLM2's head is its embedding: quantize_head leaves it in float and says so
    with caplog.at_level("WARNING", logger="lladapter_ext.weights"):
        tied, _ = load_model("smollm2-135m", quantize="int8", quantize_head=True, n_layers=1)
    assert tied.quantization["head"] is False and "tied to the embeddings" in caplog.text
    # TinyLlama's untied head (one layer): quantized, and one decode row and a short prefill (ops.quantized_linear
    # straight from the codes) and a longer prefill (dequantised in row blocks) give the logits of the dequantised head
    untied, _ = load_model("tinyllama-1.1b", quantize="int4", quantize_head=True, n_layers=1)
    assert untied.quantization == dict(format="int4", exact=0, requantized=8, head=True)
    assert not [n for n, p in untied.named_parameters() if Q.is_quantizable(n, head=True)]
    dense = _dequantized_copy(untied)
    largest = max(m.out_features * m.in_features for n, m in untied.named_modules()
                  if isinstance(m, Q.QuantizedLinear) and n != "output")
    assert untied.output.max_dequant_elems == largest and len(untied.output._row_blocks()) == 6
    Q._scratch_buffers.by_key = {}  # (this thread's buffers: grown by earlier tests)
    with torch.no_grad():
        # 80 rows: past the kernel's row limit on every path (KERNEL_MAX_ROWS_BY_FORMAT, KERNEL_MAX_ROWS_AVX512)
        for x in (ids[:, :1] % 32000, ids % 32000, torch.randint(0, 32000, (1, 80))):
            a, b = untied(x).logits, dense(x).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    # the head never needed a scratch buffer larger than the largest projection's (the float head's 65.5M values)
    assert max(t.numel() for t in Q._scratch_buffers.by_key.values()) <= largest


@pytest.fixture(scope="module")
def smollm2_int4():
    return load_model(smollm2_gguf(), quantize="int4", adapter_len=4, adapter_layer=3)


def test_default_gguf_model_int4_is_the_files_own_numbers(smollm2_int4):
    """SmolLM2's Q4_1 projections load into int4 without requantising: the logits equal the fp32 load's (which
    dequantizes the same blocks) to fp32 rounding, at 0.31x the projections' bf16 bytes."""
    q, tok = smollm2_int4
    assert q.quantization == dict(format="int4", exact=210, requantized=0, head=False)
    f, _ = load_model(smollm2_gguf(), tokenizer=False, adapter_len=4, adapter_layer=3)
    f.load_adapter(q.adapter_state_dict())
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, f(ids).logits, rtol=1e-4, atol=1e-4)
        # the decode path (one row) too
        cache_q, cache_f = q.new_cache(1, 16), f.new_cache(1, 16)
        q(ids, cache=cache_q), f(ids, cache=cache_f)
        nxt = torch.tensor([[tok.encode(" Paris", bos=False)[0]]])
        torch.testing.assert_close(q(nxt, cache=cache_q).logits, f(nxt, cache=cache_f).logits, rtol=1e-4, atol=1e-4)
    summary = Q.quantized_summary(q)
    n_weights = sum(m.in_features * m.out_features for m in q.modules() if isinstance(m, Q.QuantizedLinear))
    assert summary["int4"][1] <= 0.32 * 2 * n_weights


def test_serving_a_quantized_base(smollm2_int4, tmp_path):
    """`lladapter serve` on an int4 base: a batch mixing an adapter and the bare base gives each request the
    greedy text generate gives it alone on the same quantized model."""
    from lladapter_ext.generation import generate
    from lladapter_ext.serving import Engine, GenerationRequest
    q, tok = smollm2_int4
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in q.named_adapter_parameters():
            p.normal_(0.0, 0.6 if n.endswith("gate") else 1.0)
    path = str(tmp_path / "a.safetensors")
    q.save_adapter(path)
    prompts = ["The capital of France is", "Write a haiku about the sea"]
    want = [generate(q, tok, [prompts[0]], 8)[0]]
    q.use_adapter = False
    want.append(generate(q, tok, [prompts[1]], 8)[0])
    q.use_adapter = True
    engine = Engine(q, tok, max_batch_size=2)
    engine.load_adapter("a", path)
    reqs, events = [], []
    for name, prompt in zip(["a", None], prompts):
        reqs.append(GenerationRequest(tok.encode(prompt, bos=True), engine.get(name or "base"), 8,
                                      lambda kind, data: events.append((kind, data))))
        engine.submit(reqs[-1])
    for _ in range(100):
        if all(r.finished for r in reqs):
            break
        engine.step()
    q.use_adapter = True  # the engine serves the base without the model's own adapter; the fixture is shared
    assert [r.text for r in reqs] == want, events[-3:]


# ------------------------------------------------------------------------------------------- errors
def test_errors_name_the_format_and_the_layer():
    with pytest.raises(Q.QuantizationError, match="nf4.*int4"):
        Q.check_format("nf4")
    with pytest.raises(Q.QuantizationError, match="'int3'"):
        load_model("smollm2-135m", quantize="int3")
    with pytest.raises(Q.QuantizationError, match="layers.0.attention.wq.weight: int4 needs in_features divisible"):
        Q.QuantizedLinear.from_float(torch.randn(32, 48), "int4", torch.float32, name="layers.0.attention.wq.weight")
    with pytest.raises(Q.QuantizationError, match="out_features divisible by 16"):
        Q.QuantizedLinear.from_float(torch.randn(40, 64), "int4", torch.float32)
    with pytest.raises(Q.QuantizationError, match="fp16"):
        Q.quantize_int4(torch.full((16, 64), 1e6) * torch.linspace(-1, 1, 64))
    layer = Q.QuantizedLinear.from_float(torch.randn(32, 64), "int8", torch.float32)
    with pytest.raises(ValueError, match="input has 63 features, the layer takes 64"):
        layer(torch.randn(2, 63))


def test_quantization_is_one_value_made_from_the_users_pair():
    assert Q.Quantization.of(None) is None and Q.Quantization.of("none") is None
    assert Q.Quantization.of("int4", True) == Q.Quantization("int4", head=True)
    q8 = Q.Quantization.of("int8")
    assert q8 == Q.Quantization("int8", head=False) and Q.Quantization.of(q8) is q8
    assert Q.Quantization.of(q8, True) == Q.Quantization("int8", head=True)
    assert q8.quantizes("layers.0.attention.wq.weight") and not q8.quantizes("output.weight")
    assert Q.Quantization("int8", head=True).quantizes("output.weight")
    with pytest.raises(Q.QuantizationError, match="'nf4'.*int4"):
        Q.Quantization.of("nf4")
    with pytest.raises(ValueError, match="quantize_head=True needs a quantize format"):
        Q.Quantization.of("none", True)
    with pytest.raises(Q.QuantizationError, match="'none' is no quantization"):
        Q.Quantization("none")
    with pytest.raises(AttributeError):
        q8.head = True  # frozen
    # load_model takes the value as quantize= as it takes the pair
    model, _ = load_model("smollm2-135m", quantize=Q.Quantization("int4"), n_layers=1)
    assert model.quantization == dict(format="int4", exact=0, requantized=7, head=False)


def test_cli_and_trainer_refuse_an_unknown_format_and_fsdp(tmp_path):
    run = [sys.executable, "-m", "lladapter_ext", "finetune", "--data", "x.jsonl", "--out", str(tmp_path)]
    r = subprocess.run(run + ["--quantize", "nf4"], capture_output=True, text=True)
    assert r.returncode == 2 and "--quantize: invalid choice: 'nf4'" in r.stderr
    r = subprocess.run(run + ["--quantize-head"], capture_output=True, text=True)
    assert r.returncode != 0 and "--quantize-head needs --quantize int8 or int4" in r.stderr
    from lladapter_ext.training import TrainConfig, Trainer
    model = Q.quantize_model(_small_model(), "int8")
    with pytest.raises(ValueError, match="fsdp=True with a quantized base is not supported"):
        Trainer(model, None, TrainConfig(out_dir=str(tmp_path), fsdp=True, max_steps=1))
