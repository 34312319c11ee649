"""Tokenizers: SentencePiece tokenizer.model, HF tokenizer.json (+ tokenizer_config.json), GGUF-embedded
vocabularies (SentencePiece-style and GPT-2 byte-level BPE), BOS/EOS handling and chat templates. The GGUF vocab of
the real SmolLM2 file is compared with transformers' tokenizer in test_loaders.py (it shares the slow load)."""
import json

import pytest

from lladapter_ext.tokenizer import load_tokenizer
from llama_helpers import mistral_sentencepiece_model

STRINGS = ["Hello world", " leading space", "two  spaces and trailing ", "line\nbreaks\n\n and\ttabs",
           "héllo wörld ñ Ünïcödé", "日本語のテキスト", "emoji 🤗👍🏽 (byte fallback)", "1234567 + 3.14 = ?",
           "don't I'll", "<s> is not special in text", "", " ", "\n", "   three"]


@pytest.fixture(scope="module")
def sp_processor():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=mistral_sentencepiece_model())


def test_sentencepiece_model_file(sp_processor):
    tok = load_tokenizer(mistral_sentencepiece_model())
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (32000, 1, 2, True)
    for s in STRINGS:
        assert tok.encode(s, bos=False) == sp_processor.encode(s), s
        assert tok.encode(s) == [1] + sp_processor.encode(s)
        assert tok.encode(s, bos=False, eos=True) == sp_processor.encode(s) + [2]
        assert tok.decode(tok.encode(s, eos=True)) == sp_processor.decode(sp_processor.encode(s))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def _sp_gguf(path, sp):
    """Write the SentencePiece model's vocabulary into a GGUF file the way llama.cpp's converter does."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_sentencepiece_style_vocab_matches_sentencepiece(tmp_path, sp_processor):
    path = tmp_path / "sp.gguf"
    _sp_gguf(path, sp_processor)
    tok = load_tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (32000, 1, 2, True)
    for s in STRINGS + ["    def f(x):\n        return x  # indent", "a" * 40, "Ωmega ∑ ≠ ∞"]:
        assert tok.encode(s, bos=False) == sp_processor.encode(s), s
        assert tok.decode(tok.encode(s)) == sp_processor.decode(sp_processor.encode(s)), s
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "[user] hi</s>[assistant]"


def test_hf_tokenizer_json_with_config(tmp_path, sp_processor):
    from lladapter_ext.tokenizer import _sentencepiece_bpe

    sp = sp_processor
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.get_piece_size())]
    backend = _sentencepiece_bpe(pieces, [sp.get_score(i) for i in range(len(pieces))], types, sp.unk_id(), True)
    backend.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True, "chat_template": template}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.vocab_size) == (1, 2, None, True, 32000)
    for s in STRINGS:
        assert tok.encode(s) == [1] + sp.encode(s), s
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>user: hi\n"
    # transformers >= 5 writes the template to chat_template.jinja, which wins
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    assert load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "<x>"
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["bos_token"] = "<nope>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="bos_token '<nope>' is not in tokenizer.json"):
        load_tokenizer(tmp_path)


def _gpt2_gguf(path, vocab, merges, specials, pre):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|bos|>"])
    w.add_eos_token_id(vocab["<|eos|>"])
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("pre", ["default", "smollm", "llama-bpe"])
def test_gguf_gpt2_style_bpe_matches_tokenizers(tmp_path, pre):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = ["The quick brown fox jumps over the lazy dog 123 times.", "naïve café — déjà vu 🤗",
              "def add(a, b):\n    return a + b\n", "It's 2024; we'll see, won't we?"] * 20
    ref = Tokenizer(models.BPE())
    if pre == "smollm":
        ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre == "llama-bpe":
        from lladapter_ext.tokenizer import _LLAMA3_SPLIT

        ref.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    ref.train_from_iterator(corpus, trainer)
    model = json.loads(ref.to_str())["model"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    path = tmp_path / "bpe.gguf"
    _gpt2_gguf(path, model["vocab"], merges, {"<|bos|>", "<|eos|>"}, pre)
    tok = load_tokenizer(path)
    bos, eos = model["vocab"]["<|bos|>"], model["vocab"]["<|eos|>"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (bos, eos, True)
    for s in corpus[:4] + ["unseen wörds 98765", "  spaces   ", "<|eos|> stays one token"]:
        assert tok.encode(s, bos=False) == ref.encode(s).ids, s
        assert tok.decode(tok.encode(s, bos=False), skip_special=False) == s
    assert tok.encode("<|eos|>", bos=True) == [bos, eos]
    assert tok.decode(tok.encode("hi", eos=True)) == "hi"  # BOS/EOS dropped by default


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
