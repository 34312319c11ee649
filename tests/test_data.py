"""Data pipeline: templates, loss masks, truncation, packing, batching order and resume, errors, scoring."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from lladapter_ext import batching as B
from lladapter_ext import data as D
from lladapter_ext import evaluation as E
from _tiny_lm import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = ByteTokenizer()
CHAT_TOK = ByteTokenizer(chat_template="toy")

# Written out independently of lladapter_ext.data.
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
              "\n\n### Input:\n2 3\n\n### Response:")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSay hi.\n\n### Response:")


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def b(text):  # byte-tokenizer ids of a text without BOS
    return [x + 3 for x in text.encode("utf-8")]


# ---------------------------------------------------------------------------------------------- templates, masks

def test_alpaca_templates_are_the_official_strings():
    assert D.alpaca_prompt("Add the numbers.", "2 3") == WITH_INPUT
    assert D.alpaca_prompt("Say hi.", "") == NO_INPUT
    assert D.alpaca_prompt("Say hi.", None) == NO_INPUT


def test_alpaca_record_masks_prompt_and_appends_eos():
    rec = D.Record("alpaca", {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}, "x:1")
    [ex] = D.tokenize_record(rec, TOK, max_seq_len=512)
    prompt = [TOK.bos_id] + b(WITH_INPUT)
    assert ex.input_ids == prompt + b("5") + [TOK.eos_id]
    assert ex.labels == [-100] * len(prompt) + b("5") + [TOK.eos_id]
    assert ex.n_loss_tokens == 2  # "5" and EOS, each predicted from the previous position


def test_chat_with_template_trains_assistant_turns_only():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"}, {"role": "user", "content": "trailing, no loss"}]
    [ex] = D.tokenize_record(D.Record("chat", {"messages": msgs}, "x:1"), CHAT_TOK, 512)
    text = CHAT_TOK.apply_chat_template(msgs[:5], add_generation_prompt=False)
    trained = [(t, ex.labels[i] != -100) for i, t in enumerate(ex.input_ids)]
    # the rendered conversation (up to the last assistant turn), with an EOS after each assistant turn
    assert TOK.decode(ex.input_ids) == text
    assert ex.input_ids.count(TOK.eos_id) == 2
    trained_text = CHAT_TOK.decode([t for t, on in trained if on])
    assert trained_text == "Hello<|end|>\nCiao<|end|>\n"
    assert "trailing" not in TOK.decode(ex.input_ids)
    # the untrained prefix is exactly the generation prompt of the first assistant turn
    first = next(i for i, (_, on) in enumerate(trained) if on)
    assert TOK.decode(ex.input_ids[:first]) == CHAT_TOK.apply_chat_template(msgs[:2], add_generation_prompt=True)


def test_chat_template_that_rewrites_history_is_refused_with_the_record_source():
    class Unstable(ByteTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return f"[{len(messages)} messages]" + super().apply_chat_template(messages, add_generation_prompt)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(D.DataFormatError, match="^f.jsonl:9: the tokenizer's chat template is not prefix-stable"):
        D.tokenize_record(D.Record("chat", {"messages": msgs}, "f.jsonl:9"), Unstable("toy"), 512)


def test_chat_without_template_equals_alpaca_no_input():
    msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    [chat] = D.tokenize_record(D.Record("chat", {"messages": msgs}, "x:1"), TOK, 512)
    [alp] = D.tokenize_record(D.Record("alpaca", {"instruction": "Say hi.", "output": "hi"}, "x:2"), TOK, 512)
    assert chat.input_ids == alp.input_ids and chat.labels == alp.labels


def test_plain_text_trains_every_token_and_splits_long_documents():
    report = D.TokenizeReport()
    rows = D.tokenize_record(D.Record("text", {"text": "abcdefghij"}, "x:1"), TOK, 4, report)
    flat = [t for r in rows for t in r.input_ids]
    assert flat == [TOK.bos_id] + b("abcdefghij") + [TOK.eos_id]
    assert [len(r) for r in rows] == [4, 4, 4]
    assert all(r.labels == r.input_ids for r in rows)
    assert report.n_split_documents == 1


# ---------------------------------------------------------------------------------------------- truncation

def test_truncation_cuts_the_answer_end_and_drops_prompt_only_rows(tmp_path, caplog):
    path = write(tmp_path, "d.jsonl", [
        json.dumps({"instruction": "Say hi.", "output": "hello there"}),  # prompt 93 + answer 12 tokens
        json.dumps({"instruction": "Say hi." + "x" * 200, "output": "y"}),  # prompt alone > 100
        json.dumps({"instruction": "Say hi.", "output": "ok"}),
    ])
    max_len = len(NO_INPUT) + 1 + 5  # BOS + prompt + 5 answer tokens
    with caplog.at_level(logging.WARNING, logger="lladapter_ext.data"):
        ds = D.load_dataset(path, TOK, max_len)
    assert len(ds) == 2
    long, short = ds.examples
    assert len(long) == max_len and long.input_ids[-5:] == b("hello")
    assert long.labels[-5:] == b("hello") and long.input_ids[-1] != TOK.eos_id
    assert short.input_ids[-1] == TOK.eos_id
    assert ds.report.n_truncated == 1 and ds.report.n_answer_tokens_cut == len(" there") + 1
    assert ds.report.n_dropped == 1 and ds.report.dropped_sources == [f"{path}:2"]
    msg = caplog.text
    assert "1 truncated" in msg and "7 trained answer tokens" in msg and f"{path}:2" in msg


# ---------------------------------------------------------------------------------------------- packing, collate

def _examples(lengths):
    out = []
    for k, n in enumerate(lengths):
        ids = [3 + (k * 7 + j) % 200 for j in range(n)]
        labels = [-100] * (n // 2) + ids[n // 2:]
        out.append(D.Example(ids, labels, f"x:{k}"))
    return out


def test_packing_fits_rows_keeps_every_example_once_and_masks_boundaries():
    lengths = [30, 7, 12, 25, 3, 18, 9, 31, 16, 5, 22, 11]
    examples = _examples(lengths)
    rows = D.pack_examples(examples, max_seq_len=32)
    assert all(len(r) <= 32 for r in rows)
    assert len(rows) < len(examples)
    assert sum(len(r) for r in rows) == sum(lengths)
    assert len(rows) == -(-sum(lengths) // 32) + 1  # best-fit decreasing: one row over the lower bound here
    seen = []
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0]
        assert starts[0] == 0
        bounds = starts + [len(r)]
        for s, e in zip(bounds, bounds[1:]):
            seg = r.input_ids[s:e]
            k = next(k for k, ex in enumerate(examples) if ex.input_ids == seg)
            seen.append(k)
            assert r.position_ids[s:e] == list(range(e - s))
            assert r.labels[s] == -100 and r.labels[s + 1:e] == examples[k].labels[1:]
    assert sorted(seen) == list(range(len(examples)))
    assert D.pack_examples(examples, 32)[0].input_ids == rows[0].input_ids  # deterministic


def test_collate_packed_rows_segments_and_padding():
    # rows of 2 examples and of 1 (each example of length 1 somewhere), plus an unpacked row in the same batch
    rows = [D.pack_examples(_examples([1, 4]), 8)[0], D.pack_examples(_examples([3]), 8)[0], _examples([2])[0]]
    batch = B.collate(rows, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (3, 8)
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7],
                                              [0, 1, 2, 3, 4, 5, 6, 7]]
    # padding is one more segment of its own; an unpacked row is one segment
    assert batch["segment_ids"].tolist() == [[0, 1, 1, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1],
                                             [0, 0, 1, 1, 1, 1, 1, 1]]
    assert batch["labels"][0, :2].tolist() == [-100, -100]  # a new example's first label is never predicted


def test_packing_rejects_an_overlong_example():
    with pytest.raises(ValueError, match="x:0: example of 40 tokens exceeds max_seq_len=32"):
        D.pack_examples(_examples([40]), 32)


def test_collate_right_pads_and_masks():
    ex = _examples([3, 5])
    batch = B.collate(ex, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["input_ids"][0, :3].tolist() == ex[0].input_ids and batch["input_ids"][0, 3:].eq(0).all()
    assert batch["labels"][0].tolist() == ex[0].labels + [-100] * 5
    assert "position_ids" not in batch
    assert "segment_ids" not in batch
    packed = B.collate(D.pack_examples(ex, 8), pad_id=0)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # data order kept in a row
    assert packed["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]  # the model attends within a segment
    with pytest.raises(ValueError, match="rows is empty"):
        B.collate([], 0)


# ---------------------------------------------------------------------------------------------- order, resume

def test_epoch_order_is_deterministic_grouped_and_drops_the_tail():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (103,), generator=g).tolist()
    a = B.epoch_order(lengths, 8, seed=3, epoch=0)
    assert a == B.epoch_order(lengths, 8, seed=3, epoch=0)
    assert a != B.epoch_order(lengths, 8, seed=3, epoch=1) and a != B.epoch_order(lengths, 8, seed=4, epoch=0)
    flat = [i for batch in a for i in batch]
    assert len(a) == 12 and all(len(batch) == 8 for batch in a) and len(set(flat)) == 96

    def padding(batches):
        return sum(max(lengths[i] for i in bt) * len(bt) - sum(lengths[i] for i in bt) for bt in batches)
    plain = B.epoch_order(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert padding(a) < 0.5 * padding(plain)


def _dataset(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return D.TokenizedDataset(_examples(torch.randint(4, 30, (n,), generator=g).tolist()), pad_id=0,
                              max_seq_len=32)


def _same(s1, s2):
    return (s1.epoch, s1.index, s1.n_loss_tokens_global) == (s2.epoch, s2.index, s2.n_loss_tokens_global) and all(
        torch.equal(m1[k], m2[k]) for m1, m2 in zip(s1.micro_batches, s2.micro_batches) for k in m1)


def test_batches_resume_at_saved_position_reproduces_order_across_epochs():
    ds = _dataset()
    straight = B.Batches(ds, 3, grad_accum_steps=2, seed=5)
    assert straight.steps_per_epoch == 6 and straight.effective_batch == 6
    steps = [straight.next_step() for _ in range(15)]
    assert [s.epoch for s in steps] == [0] * 6 + [1] * 6 + [2] * 3
    assert all(len(s.micro_batches) == 2 and len(s.micro_batches[0]["input_ids"]) == 3 for s in steps)
    first = B.Batches(ds, 3, grad_accum_steps=2, seed=5)
    for _ in range(8):
        first.next_step()
    state = first.state_dict()
    assert (state["epoch"], state["index"]) == (1, 2)
    resumed = B.Batches(ds, 3, grad_accum_steps=2, seed=5)
    resumed.load_state_dict(state)
    for k in range(8, 15):
        assert _same(resumed.next_step(), steps[k])
    other = B.Batches(ds, 3, grad_accum_steps=1, seed=5)
    with pytest.raises(ValueError, match="effective_batch was 6 in the checkpoint, is 3 now"):
        other.load_state_dict(state)


def _rows(step):  # each row's labels without padding, in step order
    return [[x for x in row if x != -100] for m in step.micro_batches for row in m["labels"].tolist()]


def test_steps_hold_the_same_rows_however_the_effective_batch_is_split():
    ds = _dataset(50)
    single = B.Batches(ds, 4, seed=1)
    accum = B.Batches(ds, 2, grad_accum_steps=2, seed=1)
    ranks = [B.Batches(ds, 1, grad_accum_steps=2, world_size=2, rank=r, seed=1) for r in range(2)]
    for _ in range(single.steps_per_epoch + 2):
        s, a = single.next_step(), accum.next_step()
        parts = [r.next_step() for r in ranks]
        assert all(p.n_loss_tokens_global == s.n_loss_tokens_global for p in parts + [a])
        assert sorted(_rows(a)) == sorted(_rows(s)) == sorted(_rows(parts[0]) + _rows(parts[1]))
        assert not set(map(tuple, _rows(parts[0]))) & set(map(tuple, _rows(parts[1])))
        assert s.n_loss_tokens_global == sum(int((m["labels"][:, 1:] != -100).sum()) for m in s.micro_batches)


def test_batches_reject_data_smaller_than_one_step():
    with pytest.raises(ValueError, match="fewer than one optimizer step needs"):
        B.Batches(_dataset(5), 2, grad_accum_steps=2, world_size=2)


# ---------------------------------------------------------------------------------------------- malformed input

@pytest.mark.parametrize("line, message", [
    ('{"instruction": "a", "output": ', "invalid JSON"),
    ('{"instruction": "a"}', "field 'output' must be a string, got missing"),
    ('{"instruction": 3, "output": "b"}', "field 'instruction' must be a string, got int"),
    ('{"instruction": "  ", "output": "b"}', "field 'instruction' is empty"),
    ('{"prompt": "a", "completion": "b"}', "record has keys ['completion', 'prompt']"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "has no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "messages[0] must be an object with role"),
    ('{"messages": []}', "must be a non-empty list"),
    ('[1, 2]', "expected a JSON object, got list"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path, "bad.jsonl", ['{"instruction": "ok", "output": "ok"}', "", line])
    with pytest.raises(D.DataFormatError) as e:
        D.read_records(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_json_array_records_carry_their_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"text": "t"},\n  {"instruction": 1}\n]\n')
    with pytest.raises(D.DataFormatError, match=rf"^{path}:4: field 'instruction' must be a string"):
        D.read_records(path)
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {"text": "t"}\n]\n')
    recs = D.read_records(path)
    assert [(r.kind, r.source) for r in recs] == [("alpaca", f"{path}:2"), ("text", f"{path}:4")]
    path.write_text('[\n  {"instruction": "a", "output": "b"}\n  {"text": "t"}\n]\n')
    with pytest.raises(D.DataFormatError, match=rf"^{path}:3: invalid JSON"):
        D.read_records(path)
    jsonl_named_json = write(tmp_path, "e.json", ['{"text": "a"}', '{"text": "b"}'])
    assert [r.source for r in D.read_records(jsonl_named_json)] == [f"{jsonl_named_json}:1", f"{jsonl_named_json}:2"]


def test_file_level_errors(tmp_path):
    empty = write(tmp_path, "empty.jsonl", [""])
    with pytest.raises(D.DataFormatError, match="empty.jsonl:1: no records"):
        D.read_records(empty)
    with pytest.raises(D.DataFormatError, match="unsupported file extension '.csv'"):
        D.read_records(write(tmp_path, "x.csv", ["a,b"]))
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        D.read_records(tmp_path / "nothere.jsonl")
    txt = write(tmp_path, "doc.txt", ["hello world"])
    assert [r.kind for r in D.read_records(txt)] == ["text"]


# ---------------------------------------------------------------------------------------------- scoring, eval

def test_exact_match_normalises_whitespace_and_json():
    assert E.exact_match("  2021-03-05\n", "2021-03-05")
    assert E.exact_match("3,  7,\n19", "3, 7, 19")
    assert not E.exact_match("2021-03-5", "2021-03-05")
    assert E.exact_match('{"name": "A B", "age": 3}', '{"name":"A B","age":3}')
    assert not E.exact_match('{"name": "A B", "age": "3"}', '{"name":"A B","age":3}')
    assert not E.exact_match("not json", '{"a":1}')


def test_eval_prompts_alpaca_and_chat():
    recs = [D.Record("alpaca", {"instruction": "Say hi.", "output": "hi"}, "x:1"),
            D.Record("chat", {"messages": [{"role": "user", "content": "Q"},
                                           {"role": "assistant", "content": "A"}]}, "x:2")]
    (p1, r1, _), (p2, r2, _) = E.eval_prompts(recs, CHAT_TOK)
    assert (p1, r1) == (NO_INPUT, "hi")
    assert (p2, r2) == (CHAT_TOK.apply_chat_template([{"role": "user", "content": "Q"}]), "A")
    with pytest.raises(D.DataFormatError, match="x:3: plain-text record has no reference"):
        E.eval_prompts([D.Record("text", {"text": "t"}, "x:3")])


# ---------------------------------------------------------------------------------------------- demo data

def test_demo_data_is_regenerable_and_correct():
    script = os.path.join(ROOT, "scripts", "make_demo_data.py")
    done = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    train = D.read_records(os.path.join(ROOT, "data", "demo", "train.jsonl"))
    evaluation = D.read_records(os.path.join(ROOT, "data", "demo", "eval.jsonl"))
    assert len(train) == 400 and len(evaluation) == 100
    assert {r.kind for r in train + evaluation} == {"alpaca"}
    inputs = lambda rs: {(r.data["instruction"], r.data["input"]) for r in rs}  # noqa: E731
    assert not inputs(train) & inputs(evaluation) and len(inputs(train)) == 400
    for r in train + evaluation:
        task, instruction, out = r.data["task"], r.data["instruction"], r.data["output"]
        assert r.data["input"] == ""
        query = instruction.split(": ", 1)[-1]
        if task == "sort":
            assert out == ", ".join(map(str, sorted(int(x) for x in query.split(", "))))
        elif task == "json":
            obj = json.loads(out)
            assert obj["name"] in query and str(obj["age"]) in query and obj["city"] in query
        elif task == "unit":
            _, value, unit, _, _ = instruction.split()
            factor = {"km": 1000, "kg": 1000, "m": 100, "L": 1000}[unit]
            assert out.split()[0] == str(int(value) * factor)
        else:
            assert task == "date" and out[:4] in query and len(out) == 10


# ---------------------------------------------------------------------------------------------- real tokenizer

@pytest.fixture(scope="module")
def smollm_tokenizer():
    tokenizer_mod = pytest.importorskip("lladapter_ext.tokenizer", reason="needs the model branch's tokenizers")
    from lladapter_ext.loaders import default_model_path
    return tokenizer_mod.load_tokenizer(default_model_path())


def test_masks_with_the_real_smollm2_tokenizer_and_chat_template(smollm_tokenizer):
    tok = smollm_tokenizer
    msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    [chat] = D.tokenize_record(D.Record("chat", {"messages": msgs}, "x:1"), tok, 512)
    first = next(i for i, x in enumerate(chat.labels) if x != -100)
    assert chat.input_ids[:first] == tok.encode(tok.apply_chat_template(msgs[:1], add_generation_prompt=True))
    # the answer, then the template's end of turn (<|im_end|> is the EOS, so no second EOS is appended)
    assert chat.labels[first:] == chat.input_ids[first:] == tok.encode("hi<|im_end|>\n", bos=False)
    assert chat.input_ids.count(tok.eos_id) == 3  # system, user and assistant turns each end with it
    [alp] = D.tokenize_record(D.Record("alpaca", {"instruction": "Say hi.", "output": "hi"}, "x:2"), tok, 512)
    first = next(i for i, x in enumerate(alp.labels) if x != -100)
    assert alp.input_ids[:first] == tok.encode(NO_INPUT)
    assert alp.labels[first:] == tok.encode("hi", bos=False) + [tok.eos_id]


# ---------------------------------------------------------------------------------------------- issue 20

def test_a_directory_given_as_data_says_it_is_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"data file {tmp_path} is a directory; give the .jsonl"):
        D.read_records(tmp_path)
    with pytest.raises(IsADirectoryError, match=f"--data file {tmp_path} is a directory"):
        D.check_data_file(tmp_path, "--data file")


def test_data_fingerprint_follows_the_content_and_guards_resume(tmp_path):
    lines = [json.dumps({"instruction": f"Say {w}.", "output": w}) for w in ["a", "b", "c", "d"]]
    ds = D.load_dataset(write(tmp_path, "a.jsonl", lines), TOK, 256)
    same = D.load_dataset(write(tmp_path, "b.jsonl", lines), TOK, 256)
    other = D.load_dataset(write(tmp_path, "c.jsonl", lines[:3] + [lines[3].replace("d", "e")]), TOK, 256)
    assert D.data_fingerprint(ds) == D.data_fingerprint(same) != D.data_fingerprint(other)
    truncated = D.load_dataset(write(tmp_path, "a.jsonl", lines), TOK, len(ds[0]) - 1)
    assert D.data_fingerprint(ds) != D.data_fingerprint(truncated)
    state = B.Batches(ds, 2).state_dict()
    B.Batches(same, 2).load_state_dict(state)
    with pytest.raises(D.DataChangedError, match="the same 4 rows, but their content hash is"):
        B.Batches(other, 2).load_state_dict(state)
    resumed = B.Batches(other, 2)
    resumed.load_state_dict({**state, "index": 1}, allow_data_change=True)
    assert resumed.index == 1
    del state["data_sha256"]  # a checkpoint from before the hash was recorded: not checked
    B.Batches(other, 2).load_state_dict(state)
