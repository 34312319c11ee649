"""End-to-end LLaMA-Adapter fine-tuning and decoding against the peers, one run, same everything:

  (1) lladapter with our kernels           (2) lladapter on the reference ops (reference.py patched in)
  (3) transformers LlamaForCausalLM + PEFT AdaptionPrompt (the anchor: every ratio is to this row)
  (4) LitGPT's adapter model (litgpt.adapter.GPT), when litgpt imports (PYTHONPATH=.deps, see the Makefile)

Every variant gets the same config, the same random weights (each tensor drawn from a generator seeded by its
Hugging Face name, so every model gets bit-identical values), the same adapter (K prompt tokens in the top L
layers, prompts N(0, 1), gates 0), the same token batch with the loss on the second half, and the same optimizer:
AdamW(lr 1e-3, betas (0.9, 0.95), weight decay 0.02) over the adapter parameters only.
Measured per variant, each in its own process: training step (forward + backward + optimizer step) time and
tokens/s, peak memory of training (CUDA: max allocated; CPU: growth of the RSS high-water mark over the process
after its imports), then greedy decoding of --decode-new tokens after a --decode-prompt token prompt with a KV
cache (ours and LitGPT keep the prompt K/V across steps; PEFT recomputes them every step), tokens/s (prefill
included), and the decode step's weight traffic (the bytes of every projection and the LM head per step, over the
time of one step after the prefill: generating --decode-new tokens and generating one, timed in turn, differ by
--decode-new - 1 steps) as a share of the machine's read bandwidth (a sum over a 256 MiB buffer; on CUDA a copy),
measured in the same process in turn with each pair (the distance to the physical limit of a weight-bound decode).
Variant (1b), "lladapter kernels + compile", is (1) with the training step under torch.compile, as `lladapter
finetune --compile` runs it (training.compiled_forward; the first step compiles, and its time is printed; decoding
is the same as (1) and not repeated); it runs by default on CPU only.
For our variants (1) and (1b) the same process also times the training step's matmul floor: exactly the GEMMs one
step of our model performs (step_gemms, derived from the config and the adapter placement: the q, k, v, o, gate, up and
down projections of every layer (the last layer's o, gate, up and down on the rows from the first one the loss
reads) and the prompt K/V projections of every adapted layer in the forward, the LM head on the labelled rows, and
the input-gradient GEMMs of the backward from the LM head down to the lowest adapted layer; the frozen weights need
no dW), run alone as torch.mm(out=) over the model's own weights and preallocated
random activations, same dtype, device and threads, --iters passes, each followed by a training step; the list is
checked against the aten::mm/addmm calls (count and shapes) of a real step under torch.profiler. On the CPU the
attention kernels' own GEMMs (their BLAS block products: scores, probabilities times values, and the backward's)
are recorded in one real step and timed alone in the same passes too (attention_products); the floor with them,
step_vs_matmul_floor_with_attention, is printed beside the projection floor: the attention is matmul work the
projection floor leaves out, 4.5% of the floor's FLOPs at SmolLM2 4 x 128 and 7.8% at 4 x 256. The table's
"floor" column is the median over those pairs of step time / floor time (1.00x = the step is nothing but its GEMMs
at the speed they run alone; pairs, because a shared machine's speed drifts within a minute); with the decode
bandwidth share it is printed in a closing "limits" line, and both are in the --json rows (step_vs_matmul_floor,
matmul_floor_s, matmul_floor_gemms, matmul_floor_gemvs, profiled_mm, gemm_check, decode_bandwidth_fraction). The
same profiled step's top ops by self time (on CUDA: kernels, by GPU time) are printed too (profile_top): where the
time beyond the floor goes.
On CPU every variant runs with glibc keeping freed memory for the next step and torch's CPU allocator swapped for
the exact-fit one (host_heap.keep_freed_heap, which lladapter's training loops set; the peers gain from it too, so
it is applied to all for a like-for-like ratio); --keep-freed-heap ours leaves the peers on glibc's defaults and
torch's allocator (each product as it runs out of the box), none everyone.
On CPU the variants run --repeats times, interleaved, and every figure is the median over the repeats; with more
than one round, each variant's training speed-up is also printed round by round (the anchor's step over the
variant's in the same round: the spread says how far to trust the median). Rounds are minutes apart, and a
shared machine's speed drifts by more than the distance to a target within that time, so the variants then run
--paired-steps more rounds (default 6 on CPU) each in a process of its own, all alive at once, one training step
each in turn, the order reversed every other round: the median over rounds of the anchor's step over each
variant's adjacent one is printed beside the rounds' (train_speedup_vs_peft_paired in the
--json rows).

    python benchmarks/bench_e2e.py [--device cpu|cuda] [--shape smollm2-135m|tinyllama-1.1b|llama-7b]
        [--dtype float32|bfloat16] [--batch B] [--seq T] [--iters N] [--repeats R] [--json OUT.json]

Defaults: on cuda the LLaMA-7B shape in bf16, B 4, T 512; on cpu SmolLM2-135M in fp32, B 4, T 128.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time
import zlib
from collections import Counter

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from _common import (common_args, machine_name, paired_timings, peak_memory, read_bandwidth,  # noqa: E402
                     reset_peak_memory, run_child, serve_timed_calls)

VARIANTS = ("lladapter kernels", "lladapter kernels + compile", "lladapter reference ops", "HF + PEFT",
            "LitGPT adapter")
ANCHOR = "HF + PEFT"
COMPILED = "lladapter kernels + compile"  # the training step as `lladapter finetune --compile` runs it
# Shapes by name: our presets plus a ~1B LLaMA shape (TinyLlama-1.1B's: 22 layers, width 2048, GQA 32/4).
EXTRA_SHAPES = {"tiny": dict(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128,
                             max_seq_len=512),  # smoke runs
                "tinyllama-1.1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                       ffn_dim=5632, norm_eps=1e-5, max_seq_len=2048)}
OPT = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.02)


@contextlib.contextmanager
def _on_meta(dtype):
    """Build modules on the meta device with parameters in `dtype` (no full-size fp32 copy on the way)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(default)


def decode_weight_bytes(c, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step reads: every projection of every layer and the LM head (tied or not; the
    embedding lookup reads only the batch's rows)."""
    n = sum(math.prod(shape) for name, shape, kind in canonical_tensors(c)
            if kind == "w" and name not in ("model.embed_tokens.weight", "lm_head.weight"))
    return (n + c.vocab_size * c.dim) * torch.empty((), dtype=dtype).element_size()


def llama_config(args):
    from lladapter_ext.model import LlamaConfig, config_from_preset

    kw = dict(adapter_len=args.adapter_len, adapter_layer=args.adapter_layer, gate_act="tanh")
    if args.shape in EXTRA_SHAPES:
        return LlamaConfig(**EXTRA_SHAPES[args.shape], **kw)
    return config_from_preset(args.shape, **kw)


# ------------------------------------------------------------------ the shared random weights
def canonical_tensors(c):
    """(Hugging Face name, shape, kind) of every weight; kind: 'w' = N(0, 0.02), 'norm' = ones,
    'prompt' = N(0, 1) (the adapter prompt of a layer, named adapter.<layer>.prompt)."""
    D, Dh, H, Hkv = c.dim, c.head_dim, c.n_heads, c.n_kv_heads
    out = [("model.embed_tokens.weight", (c.vocab_size, D), "w")]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (H * Dh, D), "w"), (p + "self_attn.k_proj.weight", (Hkv * Dh, D), "w"),
                (p + "self_attn.v_proj.weight", (Hkv * Dh, D), "w"), (p + "self_attn.o_proj.weight", (D, H * Dh), "w"),
                (p + "mlp.gate_proj.weight", (c.ffn_dim, D), "w"), (p + "mlp.up_proj.weight", (c.ffn_dim, D), "w"),
                (p + "mlp.down_proj.weight", (D, c.ffn_dim), "w"),
                (p + "input_layernorm.weight", (D,), "norm"), (p + "post_attention_layernorm.weight", (D,), "norm")]
    out.append(("model.norm.weight", (D,), "norm"))
    if not c.tie_embeddings:
        out.append(("lm_head.weight", (c.vocab_size, D), "w"))
    for i in range(c.first_adapted_layer, c.n_layers):
        out.append((f"adapter.{i}.prompt", (c.adapter_len, D), "prompt"))
    return out


@torch.no_grad()
def fill(t: torch.Tensor, name: str, kind: str):
    """Deterministic values for tensor `name`, whatever model holds it: a generator seeded by the name."""
    if kind == "norm":
        t.fill_(1.0)
        return
    gen = torch.Generator(device=t.device).manual_seed(zlib.crc32(name.encode()))
    t.normal_(0.0, 0.02 if kind == "w" else 1.0, generator=gen)


def build_ours(c, dev, dtype):
    from lladapter_ext.loaders import _hf_to_ours
    from lladapter_ext.model import LlamaForCausalLM

    model = LlamaForCausalLM(c, device="meta", dtype=dtype).to_empty(device=dev)  # no random init to discard
    params = dict(model.named_parameters())
    for name, _, kind in canonical_tensors(c):
        if kind == "prompt":
            fill(params[f"layers.{name.split('.')[1]}.attention.adapter_prompt"], name, kind)
        else:
            fill(params[_hf_to_ours(name)], name, kind)
    for n, p in params.items():
        if n.endswith("adapter_gate"):
            p.data.zero_()
    return model


def hf_config(c):
    from transformers import LlamaConfig as HFConfig

    return HFConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                    num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                    head_dim=c.head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
                    max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")


def build_peft(c, dev, dtype):
    import peft
    from transformers import LlamaForCausalLM as HFLlama

    hcfg = hf_config(c)
    with _on_meta(dtype):
        hf = HFLlama(hcfg)
    hf.to_empty(device=dev)
    hf.tie_weights()  # to_empty gives the tied lm_head its own tensor: tie it again
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hcfg).to(dev)  # its buffers were left empty
    params = dict(hf.named_parameters())
    for name, _, kind in canonical_tensors(c):
        if kind != "prompt":
            fill(params[name], name, kind)
    # PEFT's adapter_layers counts the top layers, like our adapter_layer
    model = peft.get_peft_model(hf, peft.AdaptionPromptConfig(adapter_len=c.adapter_len,
                                                              adapter_layers=c.n_adapted_layers,
                                                              task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if name.endswith("adaption_prompt"):
            layer = int(name.split("layers.")[1].split(".")[0])
            fill(p.data[0], f"adapter.{layer}.prompt", "prompt")
        elif name.endswith("adaption_gate"):
            p.data.zero_()
    return model


def import_litgpt():
    try:
        from litgpt.adapter import GPT, Config  # noqa: F401
        from litgpt.utils import chunked_cross_entropy  # noqa: F401
    except Exception as e:  # not installed, or a dependency (lightning) missing
        return f"litgpt does not import here ({type(e).__name__}: {e})"
    return None


def build_litgpt(c, dev, dtype):
    from litgpt.adapter import GPT, Config, mark_only_adapter_as_trainable

    cfg = Config(name="bench", block_size=c.max_seq_len, vocab_size=c.vocab_size, padded_vocab_size=c.vocab_size,
                 n_layer=c.n_layers, n_head=c.n_heads, n_query_groups=c.n_kv_heads, n_embd=c.dim,
                 head_size=c.head_dim, rotary_percentage=1.0, parallel_residual=False, bias=False,
                 norm_class_name="RMSNorm", norm_eps=c.norm_eps, mlp_class_name="LLaMAMLP",
                 intermediate_size=c.ffn_dim, rope_base=int(c.rope_base),
                 adapter_prompt_length=c.adapter_len, adapter_start_layer=c.first_adapted_layer)
    with _on_meta(dtype):
        model = GPT(cfg)
    model.to_empty(device=dev)
    model.cos, model.sin = model.rope_cache(device=dev)  # RoPE tables made on the meta device hold nothing
    params = dict(model.named_parameters())
    qs, ks = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for name, _, kind in canonical_tensors(c):
        if kind == "prompt":
            fill(params[f"transformer.h.{name.split('.')[1]}.attn.adapter_wte.weight"], name, kind)
            continue
        if name == "model.embed_tokens.weight":
            fill(params["transformer.wte.weight"], name, kind)
            if c.tie_embeddings:  # LitGPT has no tied head: it holds a copy, as its converted checkpoints do
                params["lm_head.weight"].data.copy_(params["transformer.wte.weight"].data)
            continue
        top = {"model.norm.weight": "transformer.ln_f.weight", "lm_head.weight": "lm_head.weight"}
        if name in top:
            fill(params[top[name]], name, kind)
            continue
        i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
        p = f"transformer.h.{i}."
        qkv = params[p + "attn.qkv.weight"].data  # [q; k; v] stacked (LitGPT 0.5's layout)
        slot = {"self_attn.q_proj.weight": qkv[:qs], "self_attn.k_proj.weight": qkv[qs:qs + ks],
                "self_attn.v_proj.weight": qkv[qs + ks:],
                "self_attn.o_proj.weight": params[p + "attn.proj.weight"],
                "mlp.gate_proj.weight": params[p + "mlp.fc_1.weight"],
                "mlp.up_proj.weight": params[p + "mlp.fc_2.weight"],
                "mlp.down_proj.weight": params[p + "mlp.proj.weight"],
                "input_layernorm.weight": params[p + "norm_1.weight"],
                "post_attention_layernorm.weight": params[p + "norm_2.weight"]}[rest]
        fill(slot, name, kind)
    for n, p in params.items():
        if n.endswith("gating_factor"):
            p.data.zero_()
    mark_only_adapter_as_trainable(model)
    return model


# ------------------------------------------------------------------ one variant (child process)
def training_step(variant, c, dev, dtype, ids, labels):
    """(model, step, trainable parameter count) of one variant: its model over the shared random weights and one
    training step as a callable (zero_grad, the loss of ids with labels, backward, AdamW over the adapter; returns
    the loss). The process is prepared by the caller (prepare_process)."""
    if variant.startswith("lladapter"):
        model = build_ours(c, dev, dtype)
        forward = model
        if variant == COMPILED:
            from lladapter_ext.training import compiled_forward
            forward = compiled_forward(model)  # (compiles in the first step below)
        loss_fn = lambda: forward(ids, labels=labels).loss  # noqa: E731
    elif variant == ANCHOR:
        model = build_peft(c, dev, dtype)
        loss_fn = lambda: model(input_ids=ids, labels=labels).loss  # noqa: E731
    else:
        from litgpt.utils import chunked_cross_entropy

        model = build_litgpt(c, dev, dtype)

        def loss_fn():  # as litgpt/finetune/adapter.py computes it
            for m in model.modules():  # LitGPT fills this cache in every forward; a training step must start
                if hasattr(m, "adapter_kv_cache"):  # without the previous step's (freed) graph
                    m.adapter_kv_cache = None
            logits = model(ids, lm_head_chunk_size=128)
            logits[-1] = logits[-1][..., :-1, :]
            return chunked_cross_entropy(logits, labels[..., 1:])
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, **OPT)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    return model, step, n_trainable


def prepare_process(variants, args):
    """What a child process does before any allocation of the variants it runs: patches in the reference ops where
    one of them needs them, imports every module they use (imports are not a variant's memory), loads torch's meta
    kernels, and sets the CPU allocator policy (--keep-freed-heap).
    Returns (config, ids, labels): the shared token batch, with the loss on the second half."""
    dev = args.device
    if "lladapter reference ops" in variants:  # (patches lladapter_ext.ops before the model imports it)
        from bench_train import use_reference_ops
        use_reference_ops()
    import lladapter_ext.generation  # noqa: F401
    import lladapter_ext.loaders  # noqa: F401
    if ANCHOR in variants:
        import peft  # noqa: F401
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401
    # the first meta-device tensor imports torch's meta kernels (~150 MB of modules): before the baseline too
    torch.nn.Embedding(2, 2, device="meta").to_empty(device=dev).weight.data.normal_(
        generator=torch.Generator(device=dev).manual_seed(0))
    if dev == "cpu" and (args.keep_freed_heap == "all" or
                         (args.keep_freed_heap == "ours" and all(v.startswith("lladapter") for v in variants))):
        from lladapter_ext.host_heap import keep_freed_heap
        keep_freed_heap()  # (as Trainer.train does on the CPU; before any of the variant's allocations)
    c = llama_config(args)
    torch.manual_seed(0)
    ids = torch.randint(3, c.vocab_size, (args.batch, args.seq), device=dev)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # loss on the answer half, as instruction data has it
    return c, ids, labels


def serve_steps(variant, args):
    """The child of the paired rounds (paired_timings): the variant's process as run_variant prepares it, two
    warm-up steps (the compiled variant compiles in the first), then one timed training step per request."""
    dev, dtype = args.device, getattr(torch, args.dtype)
    why = import_litgpt() if variant == "LitGPT adapter" else ""
    if why:
        raise SystemExit(f"{variant}: {why}")
    c, ids, labels = prepare_process([variant], args)
    step = training_step(variant, c, dev, dtype, ids, labels)[1]
    step()
    step()
    serve_timed_calls(lambda: timed_pass(step, dev))


def run_variant(variant, args):
    dev, dtype = args.device, getattr(torch, args.dtype)
    if variant == "LitGPT adapter":
        why = import_litgpt()
        if why:
            return dict(variant=variant, skipped=why)
    c, ids, labels = prepare_process([variant], args)
    base = reset_peak_memory(dev)
    t0 = time.perf_counter()
    model, step, n_trainable = training_step(variant, c, dev, dtype, ids, labels)
    build_s = time.perf_counter() - t0  # (model construction and the optimizer)

    t0 = time.perf_counter()
    first_loss = float(step())
    first_step_s = time.perf_counter() - t0  # (the compiled variant: compiling included)
    step()
    step_s = statistics.median(timed_pass(step, dev) for _ in range(args.iters))
    peak = peak_memory(dev, base)
    floor = {}
    if variant in ("lladapter kernels", COMPILED):  # the same GEMMs timed alone, checked against a profiled step
        gemms = step_gemms(c, args.batch, args.seq, int((labels[:, 1:] != -100).sum()), dev, dtype,
                           0 if variant == COMPILED else model._loss_rows_start(labels[:, 1:] != -100, None))
        calls, flop, listed, gemvs = matmul_floor_calls(model, gemms, args)
        products, replay = attention_products(step, dev)
        timed_pass(calls, dev)  # warm-up
        timed_pass(replay, dev)
        # The floor's passes alternate with steps, and the ratio is the median of the pairs' step / floor: a shared
        # machine's speed drifts by more than 10% within a minute, and a pair is timed under the same conditions.
        pairs = [(timed_pass(calls, dev), timed_pass(replay, dev), timed_pass(step, dev)) for _ in range(args.iters)]
        profiled, other, profile_top = profiled_gemms(step, dev)
        floor = dict(matmul_floor_s=statistics.median(f for f, _, _ in pairs),
                     step_vs_matmul_floor=statistics.median(s / f for f, _, s in pairs),
                     matmul_floor_flop=flop, matmul_floor_gemms=len(listed), matmul_floor_gemvs=gemvs,
                     profiled_mm=len(profiled), profiled_other_matmul=other, gemm_check=gemm_check(listed, profiled),
                     profile_top=profile_top)
        if products is not None:
            floor.update(attention_products=len(products), attention_products_flop=product_flop(products),
                         attention_products_s=statistics.median(a for _, a, _ in pairs),
                         step_vs_matmul_floor_with_attention=statistics.median(s / (f + a) for f, a, s in pairs))
    del step  # (and with it the optimizer's state)
    # (the compiled variant decodes with the same model and code as "lladapter kernels": generation is not compiled)
    decoded = decode(variant, model, c, args) if args.decode_new > 0 and variant != COMPILED else {}
    return dict(variant=variant, step_s=step_s, tokens_per_s=args.batch * args.seq / step_s, peak_bytes=peak,
                decode_tokens_per_s=decoded.get("tokens_per_s"), decode_step_s=decoded.get("step_s"),
                decode_bandwidth_fraction=decoded.get("bandwidth_fraction"),
                decode_read_bandwidth=decoded.get("read_bandwidth"), trainable=n_trainable, first_loss=first_loss,
                build_s=build_s, first_step_s=first_step_s, **floor)


@torch.no_grad()
def decode(variant, model, c, args):
    """Greedy decoding of args.decode_new tokens after a random args.decode_prompt-token prompt, batch
    args.decode_batch, each library's KV-cached generation. Returns tokens_per_s (new tokens per second, prefill
    included) and, for more than one new token, step_s (one decode step after the prefill: runs of args.decode_new
    tokens and of one token, the prefill and its token, timed in turn; the median over the pairs of their difference
    over args.decode_new - 1 steps), read_bandwidth (measured after each pair) and bandwidth_fraction (the step's
    weight bytes over its time, over the bandwidth measured with the pair: the median over the pairs)."""
    dev = args.device
    model.eval()
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, c.vocab_size, (args.decode_batch, args.decode_prompt), generator=gen).to(dev)
    if variant.startswith("lladapter"):
        from lladapter_ext.generation import generate_tokens

        run = lambda n: generate_tokens(model, prompt.tolist(), n, eos_id=None)  # noqa: E731
    elif variant == ANCHOR:
        run = lambda n: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),  # noqa: E731
                                       max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    else:
        run = lambda n: litgpt_greedy(model, prompt, n)  # noqa: E731

    def timed(n):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = run(n)
        if dev == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        got = len(out[0]) - (prompt.shape[1] if variant == ANCHOR else 0)  # HF returns prompt + new
        if got != n:
            raise RuntimeError(f"{variant}: generated {got} tokens, expected {n}")
        return elapsed

    n = args.decode_new
    timed(n)  # warm-up (allocator, caches)
    runs, steps, bws = [], [], []
    for _ in range(args.decode_iters):
        runs.append(timed(n))
        if n > 1:  # one step: the pair's difference; a shared machine's bandwidth drifts, so measured with each pair
            steps.append((runs[-1] - timed(1)) / (n - 1))
            bws.append(read_bandwidth(dev))
    out = dict(tokens_per_s=args.decode_batch * n / statistics.median(runs))
    if steps:
        step_bytes = decode_weight_bytes(c, getattr(torch, args.dtype))
        out.update(step_s=statistics.median(steps), read_bandwidth=statistics.median(bws),
                   bandwidth_fraction=statistics.median(step_bytes / s / bw for s, bw in zip(steps, bws)))
    return out


def litgpt_greedy(model, prompt, n):
    """Greedy decoding with LitGPT's KV cache (what litgpt.generate does, without its sampling options)."""
    B, P = prompt.shape
    model.max_seq_length = P + n
    model.set_kv_cache(batch_size=B, device=prompt.device)
    for m in model.modules():
        if hasattr(m, "adapter_kv_cache"):
            m.adapter_kv_cache = None
    pos = torch.arange(P, device=prompt.device)
    logits = model(prompt, input_pos=pos)[:, -1]
    out = []
    for i in range(n):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < n:
            logits = model(nxt, input_pos=torch.tensor([P + i], device=prompt.device), input_pos_maxp1=P + i + 1)[:, -1]
    model.clear_kv_cache()
    return torch.cat(out, 1)


# ------------------------------------------------------------------ the training step's matmul floor (our model)
def _linear_gemm(label, wkey, n, k, rows, backward, device, dtype, max_rows=4):
    """One GEMM of a bias-free projection x [rows, k] @ W[n, k]^T as nn.linear runs it (on the CPU, 1 to max_rows
    rows take nn.few_rows_route's route: W @ x^T padded to two rows, or our own GEMV kernel; more fp32 rows
    nn.gemm_route's: torch's GEMM or _C.openblas_mm), or with backward its input-gradient GEMM dY @ W (W is frozen:
    no dW; autograd computes the transposed route's (W^T @ dY^T) as (dY @ W)^T, x^T being a transposed view; the
    GEMV's backward is dY @ W). (label, weight key, form, rows); form 'xWt' = x @ W^T, 'gW' = dY @ W, 'Wxt' =
    W @ x^T, 'gemv' = _C.few_rows_gemv(x, W); 'openblas xWt' and 'openblas gW' the same products by
    _C.openblas_mm (compiled too: nn.openblas_mm_op)."""
    from lladapter_ext.nn import few_rows_route, gemm_route

    few = device == "cpu" and 1 <= rows <= max_rows
    route = few_rows_route(dtype) if few else "linear"
    form = "gW" if backward else {"transposed": "Wxt", "gemv": "gemv"}.get(route, "xWt")
    if not few and device == "cpu" and dtype == torch.float32 and gemm_route() == "openblas":
        form = "openblas " + form
    return (label + (" dX" if backward else ""), wkey, form, max(rows, 2) if form == "Wxt" else rows)


def step_gemms(c, batch, seq, n_labelled, device, dtype=torch.float32, loss_rows_start=0):
    """Every GEMM one training step of our LlamaForCausalLM performs (labels given, adapter on, base frozen), in
    the step's order, derived from the config and the adapter placement:
      forward: q, k, v, o, w1 (gate), w3 (up), w2 (down) of every layer on B*T rows (the layers below the adapter
        run under no_grad, but they run), except the last layer's o, w1, w3, w2, which run on the rows from
        loss_rows_start on (B*(T - loss_rows_start): the model's _loss_rows_start, 0 when compiled), the prompt K/V
        projections wk(p), wv(p) of every adapted layer on its K prompt rows, and the LM head on the labelled rows
        only (n_labelled);
      backward, input gradients only (every weight is frozen: no dW): the LM head, then every adapted layer from the
        top down to the lowest one; the lowest one's input carries no gradient, so there only o, w1, w3, w2 and the
        prompt K/V projections have a backward GEMM. Attention runs in our own kernels (no aten GEMM).
    Returns (label, weight key = a parameter name of our model, form, rows) entries (see _linear_gemm)."""
    D, F, Nq, Nkv = c.dim, c.ffn_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    M, K, first = batch * seq, c.adapter_len, c.first_adapted_layer
    shape = {"wq": (Nq, D), "wk": (Nkv, D), "wv": (Nkv, D), "wo": (D, Nq), "w1": (F, D), "w3": (F, D), "w2": (D, F)}

    def lin(i, n, rows=None, backward=False, what=""):
        key = f"layers.{i}.{'attention' if n in ('wq', 'wk', 'wv', 'wo') else 'feed_forward'}.{n}.weight"
        if rows is None:
            rows = batch * (seq - loss_rows_start) if i == c.n_layers - 1 and n in ("wo", "w1", "w3", "w2") else M
        return _linear_gemm(f"L{i} {what}{n}", key, *shape[n], rows, backward, device, dtype)

    head = ("tok_embeddings.weight" if c.tie_embeddings else "output.weight", c.vocab_size, D, n_labelled)
    adapted = range(first, c.n_layers) if c.n_adapted_layers > 0 else range(0)
    out = []
    for i in range(c.n_layers):
        out += [lin(i, "wq"), lin(i, "wk"), lin(i, "wv")]
        if i in adapted:
            out += [lin(i, "wk", K, what="prompt "), lin(i, "wv", K, what="prompt ")]
        out += [lin(i, "wo"), lin(i, "w1"), lin(i, "w3"), lin(i, "w2")]
    out.append(_linear_gemm("LM head", *head, False, device, dtype, max_rows=16))
    out.append(_linear_gemm("LM head", *head, True, device, dtype, max_rows=16))
    for i in reversed(adapted):
        out += [lin(i, n, backward=True) for n in ("w2", "w3", "w1", "wo")]
        out += [lin(i, n, K, True, "prompt ") for n in ("wk", "wv")]
        if i > first:
            out += [lin(i, n, backward=True) for n in ("wq", "wk", "wv")]
    return out


def _gemm_operands(form, w, rows, make):
    """(a, b) of one GEMM entry on weight w [n, k]; make(shape) gives a preallocated random tensor."""
    n, k = w.shape
    form = form.removeprefix("openblas ")
    if form == "xWt":
        return make((rows, k)), w.t()
    if form == "gW":
        return make((rows, n)), w
    if form == "gemv":
        return make((rows, k)), w
    return w, make((rows, k)).t()  # Wxt


def matmul_floor_calls(model, gemms, args):
    """The step's GEMMs as calls to time alone: torch.mm(a, b, out=...) in the listed order over the model's own
    frozen (random) weights and preallocated random activations and outputs (one per distinct shape), in the
    model's dtype, on its device; the few-row projections that take nn.few_rows_linear's "gemv" route run that
    kernel instead, and those on nn.gemm_route's "openblas" route _C.openblas_mm. Returns (the calls, FLOPs, the
    aten::mm and openblas_mm calls' (a, b) shapes, the number of GEMV calls); one pass over the calls is timed with
    timed_pass (run_variant pairs each pass with a training step)."""
    from lladapter_ext import _C

    dev = args.device
    params = dict(model.named_parameters())
    dtype = params[gemms[0][1]].dtype
    gen = torch.Generator(device=dev).manual_seed(2)
    bufs, outs = {}, {}

    def make(shape):
        if shape not in bufs:
            bufs[shape] = torch.randn(shape, generator=gen, device=dev).to(dtype)
        return bufs[shape]

    calls, listed, flop, gemvs = [], [], 0, 0
    for _, wkey, form, rows in gemms:
        a, b = _gemm_operands(form, params[wkey].detach(), rows, make)
        if form == "gemv":  # our own kernel (nn.few_rows_linear's "gemv" route), not an aten::mm a profiler lists
            calls.append(functools.partial(_C.few_rows_gemv, a, b))
            flop, gemvs = flop + 2 * a.shape[0] * a.shape[1] * b.shape[0], gemvs + 1
            continue
        o = (a.shape[0], b.shape[1])
        out = outs.setdefault(o, torch.empty(o, device=dev, dtype=dtype))
        if form.startswith("openblas "):
            calls.append(functools.partial(_C.openblas_mm, a, b, out))
        else:
            calls.append(functools.partial(torch.mm, a, b, out=out))
        flop += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        listed.append((tuple(a.shape), tuple(b.shape)))
    return calls, flop, listed, gemvs


def attention_products(step, dev):
    """The attention kernels' own GEMMs, which the projection floor does not hold: on the CPU, every BLAS block
    product our attention kernels make in one training step (forward and backward, all layers), recorded while
    step() runs (_C.start/stop_recording_attention_products) and replayed alone (_C.replay_attention_products:
    the same shapes, strides and transposes, sequential BLAS per worker as in the kernels, dealt round-robin over
    torch's threads). Returns (the products as int64 [N, 9] rows, the replay call); (None, []) on CUDA, where the
    attention runs in our CUDA kernels or SDPA and no BLAS product is recorded."""
    if dev != "cpu":
        return None, []
    from lladapter_ext import _C

    _C.start_recording_attention_products()
    try:
        step()
    finally:
        products = _C.stop_recording_attention_products()
    return products, [functools.partial(_C.replay_attention_products, products)]


def product_flop(products) -> int:
    """2 m n k summed over recorded attention products (rows m, n, k, ...)."""
    return int((2 * products[:, 0] * products[:, 1] * products[:, 2]).sum())


def timed_pass(work, dev) -> float:
    """Seconds of one call of work (a callable, or a list of them called in order), perf_counter around it,
    synchronized on CUDA."""
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for call in (work if isinstance(work, list) else [work]):
        call()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def profiled_gemms(step, dev, top=10):
    """One real step under torch.profiler: the (a, b) shapes of its aten::mm / aten::addmm / openblas_mm calls
    (nn.gemm_route's "openblas" route records itself as lladapter::openblas_mm), the counts of
    other matmul-family ops (batched matmuls, SDPA: attention, which the floor does not hold; aten::matmul and
    aten::linear are wrappers that dispatch to these and are not counted), and the step's `top` ops (CUDA:
    kernels) by self time, each as (name, share of the profile's self time, calls): where the time beyond the
    floor goes, in every run."""
    from torch.profiler import ProfilerActivity, profile

    device_times = dev == "cuda"
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_times else []),
                     record_shapes=True) as prof:
            step()
            if dev == "cuda":
                torch.cuda.synchronize()
    except RuntimeError as e:  # (CUPTI unavailable: the GEMM check and a CPU-side profile still come out)
        if not device_times:
            raise
        print(f"   profiling with CUDA activity failed ({e}); profiling the CPU side only", file=sys.stderr)
        device_times = False
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
            torch.cuda.synchronize()
    shapes, other = [], {}
    for e in prof.events():
        if e.name in ("aten::mm", "aten::addmm", "lladapter::openblas_mm"):
            s = e.input_shapes[1:3] if e.name == "aten::addmm" else e.input_shapes[:2]
            shapes.append(tuple(tuple(x) for x in s))
        elif e.name in ("aten::bmm", "aten::baddbmm") or "scaled_dot_product" in e.name:
            other[e.name] = other.get(e.name, 0) + 1

    def self_time(e):  # (torch < 2.4 names the device time self_cuda_time_total)
        if not device_times:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    rows = [(e.key, self_time(e), e.count) for e in prof.key_averages() if self_time(e) > 0]
    if device_times and not rows:  # no kernel timings came back (CUPTI without the rights, say): the CPU side's
        device_times = False
        rows = [(e.key, self_time(e), e.count) for e in prof.key_averages() if self_time(e) > 0]
    total = sum(t for _, t, _ in rows) or 1
    rows.sort(key=lambda r: -r[1])
    return shapes, other, dict(clock="GPU" if device_times else "CPU",
                               ops=[(name[:70], t / total, n) for name, t, n in rows[:top]])


def gemm_check(listed, profiled):
    """'same shapes' when the floor's GEMMs and a profiled step's aten::mm/addmm calls are the same multiset of
    (a, b) shapes, else what differs."""
    a, b = Counter(listed), Counter(profiled)
    if a == b:
        return "same shapes"
    diff = [f"{what}: {dict(d)}" for what, d in (("listed, not run", a - b), ("run, not listed", b - a)) if d]
    return "; ".join(diff)


# ------------------------------------------------------------------ parent: run, repeat, tabulate
def main():
    p = common_args(__doc__)
    p.add_argument("--shape", default=None, help="model shape: a preset name or tinyllama-1.1b (default: "
                   "llama-7b on cuda, smollm2-135m on cpu)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--adapter-len", type=int, default=10)
    p.add_argument("--adapter-layer", type=int, default=30, help="adapted top layers (clipped to the depth)")
    p.add_argument("--repeats", type=int, default=None, help="rounds over all variants (median taken)")
    p.add_argument("--decode-prompt", type=int, default=None)
    p.add_argument("--decode-new", type=int, default=None)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--decode-iters", type=int, default=None)
    p.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(VARIANTS) + " (default: "
                   f"all; on cuda all but {COMPILED!r}, whose compile the GPU check's minutes do not cover)")
    p.add_argument("--keep-freed-heap", choices=("all", "ours", "none"), default="all",
                   help="CPU: which variants run with host_heap.keep_freed_heap() (glibc keeps freed memory for the "
                   "next step and the exact-fit allocator lets a freed block serve the next of its size, as "
                   "lladapter's training loops set it): all (default: the same allocator policy for "
                   "every variant, so the ratios compare the code), ours (as each product runs out of the box), none")
    p.add_argument("--paired-steps", type=int, default=None,
                   help="after the rounds, every variant in a process of its own, all alive at once, timed one "
                   "training step each in turn, N rounds (default: 6 on cpu, 2 with --quick, 0 on cuda); the "
                   "speed-ups of adjacent steps are printed beside the rounds' (0: off)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve-steps", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.shape = args.shape or ("llama-7b" if gpu else "smollm2-135m")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.batch = args.batch or (2 if args.quick else 4)
    args.seq = args.seq or (64 if args.quick else (512 if gpu else 128))
    args.iters = args.iters or (10 if gpu else 3)
    args.repeats = args.repeats or (1 if gpu or args.quick else 2)
    args.decode_prompt = args.decode_prompt or (128 if gpu else 32)
    args.decode_new = args.decode_new if args.decode_new is not None else (128 if gpu else 24)
    # CPU: a shared machine stalls single generations; the median of 5 drops them
    args.decode_iters = args.decode_iters or (3 if gpu else 5)
    if args.paired_steps is None:
        args.paired_steps = 0 if gpu else (2 if args.quick else 6)
    if args.variant and args.serve_steps:  # child process of the paired rounds
        serve_steps(args.variant, args)
        return
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args)))
        return

    if args.variants is None:
        args.variants = ",".join(v for v in VARIANTS if not (gpu and v == COMPILED))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; expected a subset of {list(VARIANTS)}")
    argv = ["--device", args.device, "--shape", args.shape, "--dtype", args.dtype, "--batch", str(args.batch),
            "--seq", str(args.seq), "--iters", str(args.iters), "--adapter-len", str(args.adapter_len),
            "--adapter-layer", str(args.adapter_layer), "--decode-prompt", str(args.decode_prompt),
            "--decode-new", str(args.decode_new), "--decode-batch", str(args.decode_batch),
            "--decode-iters", str(args.decode_iters), "--keep-freed-heap", args.keep_freed_heap]
    runs = {v: [] for v in variants}
    skipped, failed = {}, {}
    for r in range(args.repeats):  # interleaved rounds: load changes on a shared machine hit every variant
        for v in variants:
            if v in skipped or v in failed:
                continue
            try:
                res = run_child(__file__, v, argv)
            except RuntimeError as e:
                failed[v] = str(e).strip().splitlines()[-1]
                print(f"[{v}] FAILED: {e}", file=sys.stderr)
                continue
            if "skipped" in res:
                skipped[v] = res["skipped"]
            else:
                runs[v].append(dict(res, round=r))
            print(f"  round {r + 1}/{args.repeats} {v}: " + (res.get("skipped") or
                  f"step {res['step_s'] * 1e3:.0f} ms, decode "
                  + (f"{res['decode_tokens_per_s']:.1f} tok/s" if res["decode_tokens_per_s"] else "not run")),
                  file=sys.stderr, flush=True)
    paired = {}
    ran = [v for v in variants if runs[v]]
    if args.paired_steps > 0 and ANCHOR in ran and len(ran) > 1:
        try:
            paired = paired_timings(__file__, ran, argv + ["--serve-steps"], args.paired_steps)
        except RuntimeError as e:
            failed["paired rounds"] = str(e).strip().splitlines()[-1]
            print(f"[paired rounds] FAILED: {e}", file=sys.stderr)
    rows = []
    for v in variants:
        if not runs[v]:
            continue
        med = lambda k: statistics.median(x[k] for x in runs[v]) if runs[v][0][k] is not None else None  # noqa
        rows.append(dict(variant=v, step_s=med("step_s"), tokens_per_s=args.batch * args.seq / med("step_s"),
                         peak_bytes=med("peak_bytes"), decode_tokens_per_s=med("decode_tokens_per_s"),
                         decode_step_s=med("decode_step_s"), decode_read_bandwidth=med("decode_read_bandwidth"),
                         decode_bandwidth_fraction=med("decode_bandwidth_fraction"),
                         trainable=runs[v][0]["trainable"], first_loss=runs[v][0]["first_loss"],
                         first_step_s=med("first_step_s"), repeats=len(runs[v])))
        if "matmul_floor_s" in runs[v][0]:  # our variant: the step's GEMMs timed alone, in the same process
            rows[-1].update(matmul_floor_s=med("matmul_floor_s"), step_vs_matmul_floor=med("step_vs_matmul_floor"),
                            **{k: runs[v][0][k] for k in (
                                "matmul_floor_flop", "matmul_floor_gemms", "matmul_floor_gemvs", "profiled_mm",
                                "profiled_other_matmul", "gemm_check", "profile_top")})
            if "attention_products" in runs[v][0]:
                rows[-1].update(attention_products_s=med("attention_products_s"),
                                step_vs_matmul_floor_with_attention=med("step_vs_matmul_floor_with_attention"),
                                **{k: runs[v][0][k] for k in ("attention_products", "attention_products_flop")})
    anchor = next((r for r in rows if r["variant"] == ANCHOR), None)
    anchor_steps = {x["round"]: x["step_s"] for x in runs.get(ANCHOR, [])}
    for r in rows:
        r["train_speedup_vs_peft"] = anchor and anchor["step_s"] / r["step_s"]
        # per round: the anchor's step over this variant's, both of one round (minutes apart, not the whole run)
        r["train_speedup_vs_peft_rounds"] = [anchor_steps[x["round"]] / x["step_s"] for x in runs[r["variant"]]
                                             if x["round"] in anchor_steps]
        if r["variant"] in paired and ANCHOR in paired:  # adjacent turns of the paired rounds
            per_round = [a / t for a, t in zip(paired[ANCHOR], paired[r["variant"]])]
            r.update(paired_step_s=statistics.median(paired[r["variant"]]),
                     train_speedup_vs_peft_paired=statistics.median(per_round),
                     train_speedup_vs_peft_paired_rounds=per_round)
        r["memory_vs_peft"] = anchor and r["peak_bytes"] / anchor["peak_bytes"]
        r["decode_speedup_vs_peft"] = (anchor and r["decode_tokens_per_s"] and anchor["decode_tokens_per_s"]
                                       and r["decode_tokens_per_s"] / anchor["decode_tokens_per_s"])
    c = llama_config(args)
    step_bytes = decode_weight_bytes(c, getattr(torch, args.dtype))
    title = (f"end-to-end, {args.shape} shape ({c.n_layers} layers, width {c.dim}, heads {c.n_heads}/{c.n_kv_heads}) "
             f"{args.dtype}, random weights; train batch {args.batch} x {args.seq} (loss on the second half), "
             f"adapter K={c.adapter_len} in the top {c.n_adapted_layers} layers, AdamW; decode: batch "
             f"{args.decode_batch}, {args.decode_prompt}-token prompt + {args.decode_new} greedy tokens")
    mem_note = "CUDA max allocated" if gpu else "RSS growth over imports"
    heap = "" if gpu else {"all": "; freed heap kept for every variant (--keep-freed-heap)",
                           "ours": "; freed heap kept for lladapter (its training loops' policy), default for peers",
                           "none": "; glibc's default heap policy for every variant"}[args.keep_freed_heap]
    print(f"\n== {title}\n   {machine_name(args.device)}, torch {torch.__version__}; median of {args.repeats} "
          f"interleaved round(s); ratios vs {ANCHOR}{heap}")
    print(f"{'variant':28s} {'trainable':>10s} {'step':>9s} {'tokens/s':>9s} {'peak mem':>9s} {'decode':>9s}   "
          f"{'train':>6s} {'memory':>6s} {'decode':>6s}  {'floor':>6s}  loss@step0")
    for r in rows:
        f = lambda x: f"{x:5.2f}x" if x else "   -  "  # noqa: E731
        dec = f"{r['decode_tokens_per_s']:7.1f}/s" if r["decode_tokens_per_s"] else "      -  "
        print(f"{r['variant']:28s} {r['trainable']:10,d} {r['step_s'] * 1e3:7.0f}ms {r['tokens_per_s']:9.0f} "
              f"{r['peak_bytes'] / 2**20:6.0f}MiB {dec}   {f(r['train_speedup_vs_peft'])} {f(r['memory_vs_peft'])} "
              f"{f(r['decode_speedup_vs_peft'])}  {f(r.get('step_vs_matmul_floor'))}  {r['first_loss']:.4f}")
    for r in rows:
        if r.get("matmul_floor_s"):
            other = ", ".join(f"{n} x{k}" for n, k in r["profiled_other_matmul"].items()) or "none"
            print(f"   train {r['variant']}: step {r['step_s'] * 1e3:.1f} ms; {r['step_vs_matmul_floor']:.2f}x the "
                  f"matmul floor, step over floor in passes timed in turn ({r['matmul_floor_s'] * 1e3:.1f} ms of GEMMs "
                  f"alone: the step's "
                  f"{r['matmul_floor_gemms']} GEMMs"
                  + (f" and {r['matmul_floor_gemvs']} GEMVs" if r.get("matmul_floor_gemvs") else "")
                  + f", {r['matmul_floor_flop'] / 1e9:.1f} GFLOP, "
                  f"{r['matmul_floor_flop'] / r['matmul_floor_s'] / 1e9:.1f} GFLOP/s); a profiled step ran "
                  f"{r['profiled_mm']} aten::mm/addmm/openblas_mm ({r['gemm_check']}; other matmul ops: {other})")
            if r.get("attention_products"):
                a_s = r["attention_products_s"]
                print(f"   train {r['variant']}, the attention kernels' own GEMMs: {r['attention_products']} BLAS "
                      f"block products a step, {r['attention_products_flop'] / 1e9:.1f} GFLOP, {a_s * 1e3:.1f} ms "
                      f"timed alone ({r['attention_products_flop'] / a_s / 1e9:.1f} GFLOP/s); with them in the floor "
                      f"the step is {r['step_vs_matmul_floor_with_attention']:.2f}x its GEMMs")
            print(f"   profile of one step, {r['variant']} (self {r['profile_top']['clock']} time, first round): "
                  + ", ".join(f"{name} {100 * share:.1f}% (x{n})" for name, share, n in r["profile_top"]["ops"]))
    for r in rows:
        if r["variant"] != ANCHOR and len(r["train_speedup_vs_peft_rounds"]) > 1:
            print(f"   train {r['variant']} vs {ANCHOR}, round by round: "
                  + ", ".join(f"{x:.2f}x" for x in r["train_speedup_vs_peft_rounds"]))
    for r in rows:
        if r["variant"] != ANCHOR and r.get("train_speedup_vs_peft_paired"):
            per = r["train_speedup_vs_peft_paired_rounds"]
            print(f"   train {r['variant']} vs {ANCHOR}, paired (processes alive at once, one step each in turn, "
                  f"{len(per)} rounds): "
                  f"{r['train_speedup_vs_peft_paired']:.2f}x (median; {min(per):.2f}-{max(per):.2f}x), step "
                  f"{r['paired_step_s'] * 1e3:.0f} ms against {ANCHOR}'s "
                  f"{statistics.median(paired[ANCHOR]) * 1e3:.0f} ms")
    for r in rows:
        if r["decode_bandwidth_fraction"]:
            print(f"   decode {r['variant']}: {step_bytes / r['decode_step_s'] / 1e9:.1f} GB/s of weights "
                  f"({step_bytes / 2**20:.0f} MiB in a step of {r['decode_step_s'] * 1e3:.1f} ms after the prefill) = "
                  f"{100 * r['decode_bandwidth_fraction']:.0f}% of the "
                  f"{'copy' if gpu else 'read'} bandwidth measured with it, {r['decode_read_bandwidth'] / 1e9:.1f} "
                  f"GB/s (medians over pairs measured in turn)")
    print(f"   peak mem = {mem_note}. Trainable parameters: ours and LitGPT have one gate per head and layer, PEFT "
          f"one per layer (the prompts, K x width per layer, are the same size in all). loss@step0: the first\n"
          f"   step's loss, equal across variants when the weights are (zero gates: every model is the base model).\n"
          f"   floor: step time / the same step's GEMMs (projections, prompt K/V, LM head; forward and input "
          f"gradients) timed alone in the same process, the median over passes of the two timed in turn; on the\n"
          f"   CPU the attention kernels' block products, recorded in a step, are timed alone in the same passes.")
    compiled = next((r for r in rows if r["variant"] == COMPILED), None)
    if compiled:
        print(f"   {COMPILED}: the training step under torch.compile (`lladapter finetune --compile`); its first step "
              f"took {compiled['first_step_s']:.1f} s, compiling included; decoding is not compiled (the same as "
              f"lladapter kernels')")
    for ours in (r for r in rows if r.get("matmul_floor_s")):  # the distance to the physical limits, in one line
        bw = ours["decode_bandwidth_fraction"]
        with_attention = ours.get("step_vs_matmul_floor_with_attention")
        print(f"   limits, {ours['variant']}: train step {ours['step_vs_matmul_floor']:.2f}x its matmul floor"
              + (f" ({with_attention:.2f}x with the attention's GEMMs in it)" if with_attention else "") + "; decode "
              + (f"weight traffic {100 * bw:.0f}% of the {'copy' if gpu else 'read'} bandwidth" if bw else "not run"))
    for v, why in skipped.items():
        print(f"   {v}: skipped: {why}")
    for v, why in failed.items():
        print(f"   {v}: FAILED: {why}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(title=title, machine=machine_name(args.device), torch=torch.__version__,
                           memory=mem_note, decode_step_bytes=step_bytes, rows=rows,
                           keep_freed_heap=None if gpu else args.keep_freed_heap,
                           paired_steps=args.paired_steps,
                           skipped=skipped, failed=failed), fh, indent=1)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
