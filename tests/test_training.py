"""Fine-tuning loop: schedule, optimizer groups, NaN guard, atomic checkpoints, exact resume, gloo DDP, learning.

The model is ``_tiny_lm.make_test_model()``: the real lladapter_ext.model.LlamaForCausalLM (tiny config) when it
is importable, else the test double. LLADAPTER_TEST_MODEL=double|llama forces one.
"""
import json
import logging
import math
import os
import random
import shutil
import socket
from types import SimpleNamespace

import pytest
import torch

from lladapter_ext import batching as B
from lladapter_ext import data as D
from lladapter_ext import evaluation as E
from lladapter_ext import host_heap
from lladapter_ext import training as T
from _tiny_lm import ByteTokenizer, make_test_model, model_kind

TOK = ByteTokenizer(chat_template="toy")  # its toy template keeps rows short (about 45 byte tokens)
MAX_LEN = 64


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """32 short chat records whose answers the adapter can learn: a colour's name spelled backwards (plus
    noise) is answered with the colour."""
    colours = ["red", "blue", "green", "cyan", "pink", "gold"]
    rng = random.Random(7)
    lines = []
    for _ in range(32):
        c = rng.choice(colours)
        lines.append(json.dumps({"messages": [{"role": "user", "content": c[::-1] + "." * rng.randint(0, 9)},
                                              {"role": "assistant", "content": c}]}))
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def dataset(data_path):
    return D.load_dataset(data_path, TOK, MAX_LEN)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: conftest.one_torch_thread


def config(tmp_path, name="run", **kw):
    base = dict(out_dir=str(tmp_path / name), epochs=2, micro_batch_size=4, lr=2e-2, warmup_epochs=0.5,
                progress=False, plot=False)
    base.update(kw)
    return T.TrainConfig(**base)


def adapter(model):
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


# ---------------------------------------------------------------------------------------------- schedule

def test_lr_at_values():
    kw = dict(base_lr=1e-2, total_steps=100, warmup_steps=10, min_lr=1e-4)
    assert T.lr_at(0, **kw) == pytest.approx(1e-3)
    assert T.lr_at(4, **kw) == pytest.approx(5e-3)
    assert T.lr_at(9, **kw) == pytest.approx(1e-2)
    assert T.lr_at(10, **kw) == pytest.approx(1e-2)
    assert T.lr_at(55, **kw) == pytest.approx((1e-2 + 1e-4) / 2)  # half way through the cosine
    assert T.lr_at(32.5, **kw) == pytest.approx(1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi / 4)) / 2)
    assert T.lr_at(99, **kw) == pytest.approx(1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * 89 / 90)) / 2)
    assert T.lr_at(100, **kw) == T.lr_at(500, **kw) == 1e-4
    assert T.lr_at(0, base_lr=1.0, total_steps=4) == 1.0  # no warmup: the cosine starts at base_lr
    lrs = [T.lr_at(s, **kw) for s in range(100)]
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        T.lr_at(0, base_lr=1.0, total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        T.lr_at(-1, base_lr=1.0, total_steps=5)


def test_resolve_lr():
    assert T.resolve_lr(None, 9e-3, 64) == pytest.approx(2.25e-3)
    assert T.resolve_lr(1e-3, 9e-3, 64) == 1e-3
    with pytest.raises(ValueError, match="lr must be > 0"):
        T.resolve_lr(0.0, 9e-3, 64)


def test_trainer_steps_the_schedule_every_iteration(tmp_path, dataset):
    cfg = config(tmp_path, epochs=3, warmup_epochs=1, blr=9e-3, lr=None, min_lr=1e-5, micro_batch_size=8)
    trainer = T.Trainer(make_test_model(), dataset, cfg)
    result = trainer.train()
    spe = len(dataset) // 8
    assert (trainer.steps_per_epoch, trainer.total_steps, trainer.warmup_steps) == (spe, 3 * spe, spe)
    assert trainer.base_lr == pytest.approx(9e-3 * 8 / 256)
    expected = [T.lr_at(s, base_lr=trainer.base_lr, total_steps=3 * spe, warmup_steps=spe, min_lr=1e-5)
                for s in range(3 * spe)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected, rel=1e-12)
    assert [h["step"] for h in result.history] == list(range(1, 3 * spe + 1))


# ---------------------------------------------------------------------------------------------- optimizer

def test_optimizer_groups_decay_prompts_not_gates():
    model = make_test_model()
    groups = T.adapter_param_groups(model, 0.02)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay"}
    assert by_name["decay"]["param_names"] and all("prompt" in n for n in by_name["decay"]["param_names"])
    assert by_name["no_decay"]["param_names"] and all("gate" in n for n in by_name["no_decay"]["param_names"])
    assert by_name["decay"]["weight_decay"] == 0.02 and by_name["no_decay"]["weight_decay"] == 0.0
    opt = T.build_optimizer(model, 0.5)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    # a step with zero gradients moves only what decays: p *= 1 - lr * wd
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.fill_(1.0)
            p.grad = torch.zeros_like(p)
    opt.step()
    for name, value in model.adapter_state_dict().items():
        want = 1.0 - 0.5 * 0.02 if "prompt" in name else 1.0
        assert torch.allclose(value, torch.full_like(value, want)), name


def test_optimizer_refuses_trainables_outside_the_adapter():
    model = make_test_model()
    next(p for p in model.parameters() if not p.requires_grad).requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters outside model.adapter_parameters"):
        T.build_optimizer(model, 1e-3)


def test_config_validation(tmp_path, dataset):
    with pytest.raises(ValueError, match="precision must be one of"):
        config(tmp_path, precision="fp8")
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1, got 0"):
        config(tmp_path, micro_batch_size=0)
    with pytest.raises(ValueError, match="precision='bf16' .* needs the model on a CUDA device"):
        T.Trainer(make_test_model(), dataset, config(tmp_path, precision="bf16"))


# ---------------------------------------------------------------------------------------------- NaN guard

def poison(model, bad_calls):
    """Make forward call number k (1-based) return a NaN loss for k in bad_calls."""
    forward, calls = model.forward, [0]

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls[0] += 1
        if calls[0] in bad_calls:
            return SimpleNamespace(logits=out.logits, loss=out.loss * float("nan"))
        return out
    model.forward = poisoned
    return model


def test_non_finite_steps_are_skipped_and_counted(tmp_path, dataset):
    model = poison(make_test_model(), {3, 4, 7})
    snapshots = []
    result = T.finetune(model, dataset, config(tmp_path, max_steps=9, max_bad_steps=3),
                        on_step=lambda r: snapshots.append(adapter(model)))
    skipped = [h["skipped"] for h in result.history]
    assert skipped == [False, False, True, True, False, False, True, False, False]
    assert result.n_bad_steps == 3
    for i, was_skipped in enumerate(skipped):
        if was_skipped:  # no update on a skipped step
            assert all(torch.equal(snapshots[i][k], snapshots[i - 1][k]) for k in snapshots[i])
        elif i:
            assert any(not torch.equal(snapshots[i][k], snapshots[i - 1][k]) for k in snapshots[i])
    logged = [json.loads(line) for line in open(result.log_path)]
    assert [r["skipped"] for r in logged] == skipped and math.isnan(logged[2]["loss"])


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, dataset):
    model = poison(make_test_model(), {2, 3, 4, 5})
    seen = []
    cfg = config(tmp_path, max_steps=10, max_bad_steps=3)
    with pytest.raises(T.NonFiniteLossError, match=r"non-finite for 3 optimizer steps in a row \(steps 2-4; "
                                                  r"max_bad_steps=3\)"):
        T.finetune(model, dataset, cfg, on_step=lambda r: seen.append(r["step"]))
    assert seen == [1, 2, 3]
    logged = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    assert [r["skipped"] for r in logged] == [False, True, True, True]


def test_non_finite_gradient_is_skipped_too(tmp_path, dataset):
    model = make_test_model()
    hook = next(iter(model.adapter_parameters())).register_hook(lambda g: g * float("inf"))
    result = T.finetune(model, dataset, config(tmp_path, max_steps=2, max_bad_steps=5))
    hook.remove()
    # inf (or, on a zero gradient, inf * 0 = nan) in one adapter gradient: the grad norm is non-finite, both skip
    assert [h["skipped"] for h in result.history] == [True, True]
    assert all(math.isfinite(h["loss"]) for h in result.history)


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_layout_log_and_plot(tmp_path, dataset):
    model = make_test_model()
    result = T.finetune(model, dataset, config(tmp_path, max_steps=6, save_every=2, keep_checkpoints=2,
                                               plot=True))
    ckpts = os.path.join(result.out_dir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["latest", "step-00000004", "step-00000006"]
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step-00000006"
    assert sorted(os.listdir(os.path.join(ckpts, "step-00000006"))) == ["adapter.safetensors", "trainer_state.pt"]
    from safetensors.torch import load_file
    final = load_file(result.adapter_path)
    assert all(torch.equal(final[k], v) for k, v in model.adapter_state_dict().items())
    state = torch.load(os.path.join(ckpts, "step-00000006", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 6 and state["data"]["index"] == 6 % (len(dataset) // 4)
    logged = [json.loads(line) for line in open(result.log_path)]
    assert [r["step"] for r in logged] == list(range(1, 7))
    assert set(logged[0]) >= {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "skipped"}
    assert open(result.plot_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    text = result.summary()
    assert "trained 6 steps (0 skipped" in text and result.adapter_path in text and result.plot_path in text
    assert not [n for n in os.listdir(result.out_dir) if ".tmp" in n]


def test_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, dataset, monkeypatch):
    model = make_test_model()
    cfg = config(tmp_path, max_steps=6, save_every=3)
    real_save = torch.save

    def save_then_crash(obj, path, *a, **k):
        if obj.get("step") == 6:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full (simulated)")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(T.torch, "save", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        T.finetune(model, dataset, cfg)
    monkeypatch.setattr(T.torch, "save", real_save)
    assert T.latest_checkpoint(cfg.out_dir).endswith("step-00000003")
    assert not os.path.exists(os.path.join(cfg.out_dir, "checkpoints", "step-00000006"))
    # resuming from step 3 redoes steps 4-6
    cfg.resume = True
    result = T.finetune(make_test_model(), dataset, cfg)
    assert result.steps == 6 and [h["step"] for h in result.history] == list(range(1, 7))


def test_atomic_adapter_write_keeps_old_file_on_failure(tmp_path):
    model = make_test_model()
    path = str(tmp_path / "a.safetensors")
    T.save_adapter_atomic(model, path)
    before = open(path, "rb").read()

    def broken(p):
        with open(p, "wb") as f:
            f.write(b"half")
        raise RuntimeError("killed mid-write")
    model.save_adapter = broken
    with pytest.raises(RuntimeError, match="killed mid-write"):
        T.save_adapter_atomic(model, path)
    assert open(path, "rb").read() == before


def test_refuses_to_overwrite_a_run_or_resume_with_another_config(tmp_path, dataset):
    cfg = config(tmp_path, max_steps=2)
    T.finetune(make_test_model(), dataset, cfg)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        T.finetune(make_test_model(), dataset, cfg)
    with pytest.raises(ValueError, match=r"config differs from the checkpoint's .*'lr': \(0.02, 0.01\)"):
        T.finetune(make_test_model(), dataset, config(tmp_path, max_steps=2, lr=1e-2, resume=True))
    # a checkpoint written before TrainConfig had the fsdp field: the missing field counts as its default
    state_path = os.path.join(T.latest_checkpoint(cfg.out_dir), T.STATE_FILE)
    state = torch.load(state_path, weights_only=True)
    saved = json.loads(state["config"])
    del saved["fsdp"]
    state["config"] = json.dumps(saved, sort_keys=True)
    torch.save(state, state_path)
    assert T.finetune(make_test_model(), dataset, config(tmp_path, max_steps=2, resume=True)).steps == 2
    with pytest.raises(ValueError, match=r"config differs from the checkpoint's .*'fsdp': \(False, True\)"):
        T.finetune(make_test_model(), dataset, config(tmp_path, max_steps=2, fsdp=True, resume=True))


# ---------------------------------------------------------------------------------------------- resume

class Killed(Exception):
    pass


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_after_kill_reproduces_the_straight_run(tmp_path, dataset, accum):
    common = dict(epochs=2, micro_batch_size=4 // accum, grad_accum_steps=accum, save_every=4)
    straight_model = make_test_model()
    straight = T.finetune(straight_model, dataset, config(tmp_path, "straight", **common))
    assert straight.steps == 2 * (len(dataset) // 4) == 16

    def kill_at_7(record):
        if record["step"] == 7:
            raise Killed
    with pytest.raises(Killed):
        T.finetune(make_test_model(), dataset, config(tmp_path, "killed", **common), on_step=kill_at_7)
    out = str(tmp_path / "killed")
    assert T.latest_checkpoint(out).endswith("step-00000004")
    assert len(open(os.path.join(out, "log.jsonl")).readlines()) == 7  # steps 5-7 are lost and redone
    resumed_model = make_test_model()
    resumed = T.finetune(resumed_model, dataset, config(tmp_path, "killed", resume=True, **common))
    assert resumed.losses == straight.losses  # exactly, every step
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in straight.history]
    logged = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    assert logged == straight.losses
    for k, v in straight_model.adapter_state_dict().items():
        assert torch.equal(resumed_model.adapter_state_dict()[k], v), k


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_straight_run(tmp_path, data_path, dataset):
    """A real kill: a training process is SIGKILLed once it has written a checkpoint, wherever it then is."""
    import signal
    import subprocess
    import sys
    import time
    common = dict(max_steps=16, micro_batch_size=4, lr=2e-2, warmup_steps=3, save_every=3, progress=False,
                  plot=False)
    straight_model = make_test_model()
    straight = T.finetune(straight_model, dataset, T.TrainConfig(out_dir=str(tmp_path / "straight"), **common))
    out = str(tmp_path / "killed")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_worker.py")
    proc = subprocess.Popen([sys.executable, worker, data_path, out, json.dumps(common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while T.latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the worker wrote no checkpoint in 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # the worker sleeps 0.2 s per step: somewhere after step 4
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(open(os.path.join(out, "log.jsonl")).readlines())
    assert 3 <= killed_at < 16
    resumed_model = make_test_model()
    resumed = T.finetune(resumed_model, dataset, T.TrainConfig(out_dir=out, resume=True, **common))
    assert resumed.losses == straight.losses
    for k, v in straight_model.adapter_state_dict().items():
        assert torch.equal(resumed_model.adapter_state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------- equivalences

def test_accumulation_equals_a_bigger_micro_batch(tmp_path, dataset):
    """The loss is normalised over the whole step, so splitting a step into micro-batches changes nothing
    beyond float summation order."""
    a, b = make_test_model(), make_test_model()
    ra = T.finetune(a, dataset, config(tmp_path, "a", max_steps=8, micro_batch_size=4))
    rb = T.finetune(b, dataset, config(tmp_path, "b", max_steps=8, micro_batch_size=1, grad_accum_steps=4))
    assert ra.losses == pytest.approx(rb.losses, rel=1e-5)
    for k, v in a.adapter_state_dict().items():
        # fp32: the grads differ by summation order (~1e-7 relative); Adam's normalised updates keep that small
        torch.testing.assert_close(b.adapter_state_dict()[k], v, rtol=1e-4, atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_run_matches_single_process(tmp_path, data_path, dataset):
    import torch.multiprocessing as mp

    from _train_worker import ddp_worker
    kw = dict(max_steps=8, lr=2e-2, warmup_steps=2, micro_batch_size=2, save_every=4)
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(ddp_worker, nprocs=2, join=True,
             args=(2, _free_port(), data_path, MAX_LEN, TOK.chat_template, str(tmp_path / "ddp"), str(results), kw))
    r0, r1 = (torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(2))
    for k in r0["adapter"]:
        assert torch.equal(r0["adapter"][k], r1["adapter"][k]), k  # identical on both ranks, bit for bit
    assert r0["losses"] == r1["losses"]
    single = make_test_model()
    ref = T.finetune(single, dataset, config(tmp_path, "single", **{**kw, "micro_batch_size": 4}))
    assert r0["losses"] == pytest.approx(ref.losses, rel=1e-5)
    for k, v in single.adapter_state_dict().items():
        torch.testing.assert_close(r0["adapter"][k], v, rtol=1e-4, atol=1e-6)  # fp32 summation order only
    logged = [json.loads(line)["loss"] for line in open(tmp_path / "ddp" / "log.jsonl")]
    assert logged == r0["losses"]


@pytest.mark.slow
@pytest.mark.skipif(model_kind() != "llama", reason="FSDP shards model.layers: needs the real model")
def test_two_process_fsdp_run_matches_single_process_and_resumes(tmp_path, data_path, dataset):
    """FSDP2 over 2 gloo processes (base weights and adapter sharded): the same adapter as one unsharded process
    with the same global batch; its checkpoints hold the full adapter and optimizer state, and resuming one
    (re-sharding them) reproduces the straight run bit for bit."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from _train_worker import ddp_worker
    # (with activation checkpointing, which changes no number: FSDP then shards the checkpointed blocks)
    kw = dict(max_steps=8, lr=2e-2, warmup_steps=2, micro_batch_size=2, save_every=4, fsdp=True,
              activation_checkpointing=True)
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(ddp_worker, nprocs=2, join=True,
             args=(2, _free_port(), data_path, MAX_LEN, TOK.chat_template, str(tmp_path / "fsdp"), str(results), kw))
    r0, r1 = (torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(2))
    single = make_test_model()
    ref = T.finetune(single, dataset, config(tmp_path, "single", **{**kw, "micro_batch_size": 4, "fsdp": False}))
    assert r0["losses"] == r1["losses"]
    # fp32 summation order only: the reduce-scatter adds the 2 ranks' partial gradients in another order than one
    # process's backward over 4 rows (~1e-7 relative), and Adam's normalised updates keep that small
    assert r0["losses"] == pytest.approx(ref.losses, rel=1e-5)
    # gradients summed, not averaged, over the ranks (Adam would hide a constant factor in the adapter)
    logged = [json.loads(line) for line in open(tmp_path / "fsdp" / "log.jsonl")]
    assert [r["grad_norm"] for r in logged] == pytest.approx([h["grad_norm"] for h in ref.history], rel=1e-5)
    for k, v in single.adapter_state_dict().items():
        assert torch.equal(r0["adapter"][k], r1["adapter"][k]), k  # gathered: the same full tensor on both ranks
        torch.testing.assert_close(r0["adapter"][k], v, rtol=1e-4, atol=1e-6)
    # the checkpoint holds the full (gathered) adapter and optimizer state, keyed by parameter name
    ck = tmp_path / "fsdp" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-00000008"
    saved = load_file(str(ck / "step-00000008" / "adapter.safetensors"))
    assert saved.keys() == r0["adapter"].keys() and all(torch.equal(saved[k], r0["adapter"][k]) for k in saved)
    opt = torch.load(ck / "step-00000008" / "trainer_state.pt", weights_only=True)["optimizer"]
    assert {k: v["exp_avg"].shape for k, v in opt["state"].items()} == {k: v.shape for k, v in saved.items()}
    # resume from step 4 (as after a kill there) on 2 processes: the same run, bit for bit
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ck / "step-00000004", resumed / "checkpoints" / "step-00000004")
    (resumed / "checkpoints" / "latest").write_text("step-00000004\n")
    shutil.copy(tmp_path / "fsdp" / "log.jsonl", resumed / "log.jsonl")
    results2 = tmp_path / "results2"
    results2.mkdir()
    mp.spawn(ddp_worker, nprocs=2, join=True,
             args=(2, _free_port(), data_path, MAX_LEN, TOK.chat_template, str(resumed), str(results2),
                   {**kw, "resume": True}))
    r0b = torch.load(results2 / "rank0.pt", weights_only=True)
    assert r0b["losses"] == r0["losses"]
    for k, v in r0["adapter"].items():
        assert torch.equal(r0b["adapter"][k], v), k


def test_fsdp_config_checks(tmp_path, dataset):
    with pytest.raises(ValueError, match="fsdp=True with precision='fp16' is not supported"):
        config(tmp_path, fsdp=True, precision="fp16")
    # one process: nothing to shard, an ordinary run
    model = make_test_model()
    result = T.finetune(model, dataset, config(tmp_path, "one", max_steps=2, fsdp=True))
    assert result.steps == 2 and not any(hasattr(p, "device_mesh") for p in model.parameters())


# ---------------------------------------------------------------------------------------------- learning

def test_short_run_loss_falls(tmp_path, dataset):
    model = make_test_model()
    before = E.evaluate_loss(model, dataset)
    result = T.finetune(model, dataset, config(tmp_path, epochs=16, lr=1e-1, warmup_epochs=1))
    after = E.evaluate_loss(model, dataset)
    # the double goes from about 6.3 to 4.5 here (measured); the bound leaves room for other tiny models
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    assert result.n_bad_steps == 0


# ---------------------------------------------------------------------------------------------- host heap

# A child process (the policy is process-wide and not undone): the page faults of 24 rounds of allocating and filling
# a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB: by default a fresh mmap every round) with small
# allocations in between, as a training step's activations are, and the growth of the resident size. `mode`: the
# whole policy ("policy"), only its glibc half ("mallopt": torch's own allocator stays), or none ("none").
_HEAP_PROBE = r"""
import json, resource, sys, torch
from lladapter_ext import _C, host_heap

mode = sys.argv[1]
if mode == "policy":
    kept = host_heap.keep_freed_heap()
elif mode == "mallopt":
    kept = host_heap._keep_heap_blocks(host_heap._glibc())
else:
    kept = False
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
rss0, faults, small = rss(), [], []
for _ in range(24):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(16 * 2**20)
    block.fill_(1.0)
    small.append(repr(object()) * 4)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(kept=kept, exact_fit=_C.exact_fit_allocator_installed(), faults=faults,
                      rss_growth=rss() - rss0)))
"""


def _heap_probe(mode, env_value=None):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("LLADAPTER_KEEP_FREED_HEAP", "THP_MEM_ALLOC_ENABLE")}
    if env_value is not None:
        env["LLADAPTER_KEEP_FREED_HEAP"] = env_value
    res = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_heap._glibc() is None, reason="a glibc heap policy")
def test_keep_freed_heap_reuses_the_memory_a_step_freed():
    block = 64 * 2**20
    block_pages = block // os.sysconf("SC_PAGE_SIZE")
    kept = _heap_probe("policy")
    # From the second round on, the freed block serves the next: no fault, and the heap holds one block.
    assert kept["kept"] is True and kept["exact_fit"] is True and sum(kept["faults"][1:]) < block_pages // 8, kept
    assert kept["rss_growth"] < 1.5 * block, kept
    # Without the exact-fit allocator (torch's posix_memalign, 64-byte alignment) glibc's padding keeps one freed
    # block from serving the next until freed blocks merge: the heap grew to 8 blocks here. (If this starts to
    # fail, glibc serves aligned requests from freed blocks of their size, and the allocator may be unneeded.)
    aligned = _heap_probe("mallopt")
    assert aligned["kept"] is True and aligned["exact_fit"] is False, aligned
    assert aligned["rss_growth"] > 3 * block, aligned
    default = _heap_probe("policy", "0")  # LLADAPTER_KEEP_FREED_HEAP=0: glibc's defaults stay, and every round faults
    assert default["kept"] is False and default["exact_fit"] is False, default
    huge_pages = "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else False
    assert min(default["faults"][-8:]) >= (block // (2 * 2**20) if huge_pages else block_pages), default


# The exact-fit allocator keeps torch's CPU allocator's contract (a child process: installing it is process-wide).
_ALLOCATOR_PROBE = r"""
import json, torch
from lladapter_ext import _C, host_heap
from torch.profiler import ProfilerActivity, profile

before = torch.arange(1000.0)  # allocated by torch's own allocator, freed after the switch
assert host_heap.keep_freed_heap() and _C.exact_fit_allocator_installed()
assert _C.install_exact_fit_allocator() is False  # once per process
sizes = [1, 3, 63, 64, 65, 1000, 4097, 2**20 + 5]
tensors = [torch.empty(n, dtype=torch.uint8).fill_(7) for n in sizes]
out = dict(misaligned=[n for n, t in zip(sizes, tensors) if t.data_ptr() % 64],
           sums=[int(t.sum()) for t in tensors], empty_ptr=torch.empty(0).data_ptr(),
           before=float(before.sum()))
del before, tensors
try:
    torch.empty(2**60, dtype=torch.uint8)
except torch.OutOfMemoryError as e:
    out["oom"] = str(e)
x = torch.randn(256, 256)
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    y = x @ x
out["profiled_bytes"] = max(e.cpu_memory_usage for e in prof.key_averages() if e.key == "aten::mm")
out["y_ok"] = bool(torch.allclose(y, (x.double() @ x.double()).float(), rtol=1e-4, atol=1e-4))
print(json.dumps(out))
"""


@pytest.mark.skipif(host_heap._glibc() is None, reason="a glibc heap policy")
def test_exact_fit_allocator_keeps_torchs_cpu_allocator_contract():
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("LLADAPTER_KEEP_FREED_HEAP", "THP_MEM_ALLOC_ENABLE")}
    res = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["misaligned"] == [] and out["empty_ptr"] == 0 and out["before"] == 499500.0, out
    assert out["sums"] == [7 * n for n in (1, 3, 63, 64, 65, 1000, 4097, 2**20 + 5)], out
    assert "exact-fit CPU allocator): not enough memory" in out["oom"] and str(2**60) in out["oom"], out
    assert out["profiled_bytes"] == 256 * 256 * 4 and out["y_ok"], out  # (profile_memory still sees allocations)


@pytest.mark.skipif(host_heap._glibc() is None, reason="a glibc heap policy")
def test_keep_freed_heap_leaves_torchs_huge_page_allocator():
    import subprocess
    import sys
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
    env.pop("LLADAPTER_KEEP_FREED_HEAP", None)
    code = ("from lladapter_ext import _C, host_heap; import json; "
            "print(json.dumps([host_heap.keep_freed_heap(), _C.exact_fit_allocator_installed()]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [True, False]


def test_keep_freed_heap_refuses_a_bad_setting(monkeypatch):
    monkeypatch.setattr(host_heap, "_kept", False)
    monkeypatch.setenv("LLADAPTER_KEEP_FREED_HEAP", "yes")
    with pytest.raises(ValueError, match="LLADAPTER_KEEP_FREED_HEAP must be 0 or 1, got 'yes'"):
        host_heap.keep_freed_heap()


def test_cpu_training_keeps_the_freed_heap(tmp_path, dataset, monkeypatch):
    calls = []
    monkeypatch.setattr(T, "keep_freed_heap", lambda: calls.append(1) or True)
    T.Trainer(make_test_model(), dataset, config(tmp_path, epochs=1)).train()
    assert calls == [1]


def _saved_bytes(model, batch):
    """Bytes autograd keeps for backward during one training forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return total[0]


def test_activation_checkpointing_saves_memory_and_changes_no_number(tmp_path, dataset):
    plain, ckpt = make_test_model(), make_test_model()
    a = T.finetune(plain, dataset, config(tmp_path, "plain", max_steps=4))
    b = T.finetune(ckpt, dataset, config(tmp_path, "ckpt", max_steps=4, activation_checkpointing=True))
    assert b.losses == pytest.approx(a.losses, rel=1e-6)
    batch = B.collate(dataset.examples[:4], dataset.pad_id)
    assert _saved_bytes(ckpt, batch) < _saved_bytes(plain, batch)  # (the logits, not checkpointed, dominate)
    with torch.no_grad():  # inference is unchanged
        torch.testing.assert_close(ckpt(**batch).logits, plain(**batch).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no set_activation_checkpointing"):
        T.enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_compile_trains_like_eager_and_resumes_exactly(tmp_path, dataset):
    """compile=True: the training forward and backward run under torch.compile (one graph with symbolic shapes:
    the micro-batches differ in length), give the eager run's losses and adapter up to fp32 rounding (the compiled
    code sums in other orders), and a killed compiled run resumes to exactly its straight run. Refused with fsdp."""
    import torch._dynamo

    torch._dynamo.reset()
    common = dict(epochs=1, save_every=4)
    eager_model, compiled_model = make_test_model(), make_test_model()
    eager = T.finetune(eager_model, dataset, config(tmp_path, "eager", **common))
    batches = T.Batches(dataset, 4, seed=0)
    widths = {mb["input_ids"].shape[1] for _ in range(batches.steps_per_epoch)
              for mb in batches.next_step().micro_batches}
    assert len(widths) > 1  # (what the symbolic shapes are for)
    compiles_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = T.finetune(compiled_model, dataset, config(tmp_path, "compiled", compile=True, **common))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > compiles_before  # it did compile
    assert compiled.steps == eager.steps == len(dataset) // 4
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    eager_adapter = adapter(eager_model)
    assert adapter(compiled_model).keys() == eager_adapter.keys()  # (the model's own names: no "_orig_mod." prefix)
    for k, v in adapter(compiled_model).items():
        torch.testing.assert_close(v, eager_adapter[k], rtol=1e-4, atol=1e-6)

    def kill_at_6(record):
        if record["step"] == 6:
            raise Killed
    with pytest.raises(Killed):
        T.finetune(make_test_model(), dataset, config(tmp_path, "killed", compile=True, **common), on_step=kill_at_6)
    resumed_model = make_test_model()
    resumed = T.finetune(resumed_model, dataset, config(tmp_path, "killed", compile=True, resume=True, **common))
    assert resumed.losses == compiled.losses  # exactly, every step
    for k, v in adapter(compiled_model).items():
        assert torch.equal(adapter(resumed_model)[k], v), k
    with pytest.raises(ValueError, match="fsdp=True with compile=True is not supported"):
        config(tmp_path, "sharded", fsdp=True, compile=True)


def test_activation_checkpointing_wraps_layers_of_a_model_without_a_switch():
    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
                                              for _ in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(4, 8)
    plain_grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    assert T.enable_activation_checkpointing(model) == "layers"
    ckpt_grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    for g1, g2 in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    counts = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (counts.append(1), t)[1], lambda t: t):
        model(x).sum().backward()
    assert len(counts) == 3  # only each block's input is kept (one per checkpointed block)


def test_packed_rows_train_with_position_and_segment_ids(tmp_path, data_path):
    packed = D.load_dataset(data_path, TOK, 2 * MAX_LEN, packing=True)
    plain = D.load_dataset(data_path, TOK, 2 * MAX_LEN)
    assert len(packed) < len(plain) and sum(packed.lengths) == sum(plain.lengths)
    seen = []
    model = make_test_model()
    with torch.no_grad():
        for p in model.adapter_parameters():  # non-zero gates: the prompt branch takes part too
            p.normal_(0.0, 0.5)
    # exact packing: the same loss tokens, each predicted as in its own row, so the same mean loss
    want, got = E.evaluate_loss(model, plain, batch_size=4), E.evaluate_loss(model, packed, batch_size=4)
    assert got["tokens"] == want["tokens"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)  # fp32 summation order only
    forward = model.forward
    model.forward = lambda **kw: (seen.append({"position_ids", "segment_ids"} <= set(kw)), forward(**kw))[1]
    result = T.finetune(model, packed, config(tmp_path, max_steps=3, micro_batch_size=2))
    assert seen and all(seen) and all(math.isfinite(x) for x in result.losses)


def test_evaluate_loss_is_the_token_weighted_mean(dataset):
    model = make_test_model()
    got = E.evaluate_loss(model, dataset, batch_size=5)
    whole = B.collate(dataset.examples, dataset.pad_id)
    with torch.no_grad():
        want = float(model(**whole).loss)
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["tokens"] == sum(e.n_loss_tokens for e in dataset.examples)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


# ---------------------------------------------------------------------------------------------- issue 20: hardening

def test_config_refuses_non_finite_and_out_of_range_numbers(tmp_path, dataset):
    for field, value in [("lr", float("inf")), ("lr", float("nan")), ("blr", float("inf")), ("min_lr", -1e-3),
                         ("min_lr", float("nan")), ("weight_decay", -1.0), ("weight_decay", float("inf")),
                         ("warmup_epochs", float("nan")), ("epochs", float("inf")), ("adam_eps", 0.0),
                         ("betas", (0.9, 1.0)), ("clip_grad_norm", float("inf")), ("warmup_steps", -1)]:
        with pytest.raises(ValueError, match=rf"^{field}.* must be .*got"):
            config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match="lr must be > 0 and finite, got inf"):
        T.resolve_lr(float("inf"), 9e-3, 64)
    with pytest.raises(ValueError, match=r"min_lr \(0.05\) must be <= the learning rate \(0.02\)"):
        T.Trainer(make_test_model(), dataset, config(tmp_path, min_lr=0.05))


def test_update_that_makes_the_adapter_non_finite_stops_before_any_save(tmp_path, dataset):
    """Finite loss and gradients, but an update that overflows (what --lr inf did): the run stops at that step,
    naming the tensor; nothing non-finite is written and the last good checkpoint stays the latest."""
    model = make_test_model()
    cfg = config(tmp_path, max_steps=6, save_every=2)
    trainer = T.Trainer(model, dataset, cfg)
    step, calls = trainer.optimizer.step, [0]
    first = trainer.param_names[0]

    def overflowing_step(*a, **k):
        out = step(*a, **k)
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                trainer.params[0].view(-1)[0] = float("inf")
        return out
    trainer.optimizer.step = overflowing_step
    with pytest.raises(T.NonFiniteAdapterError, match=rf"stopping at step 3: .* adapter tensor {first} non-finite"
                                                       r".*the latest good checkpoint is still .*step-00000002"):
        trainer.train()
    assert T.latest_checkpoint(cfg.out_dir).endswith("step-00000002")
    assert sorted(os.listdir(os.path.join(cfg.out_dir, "checkpoints"))) == ["latest", "step-00000002"]
    assert not os.path.exists(os.path.join(cfg.out_dir, "adapter.safetensors"))
    # and a checkpoint write of a non-finite adapter is refused as such, whatever made it non-finite
    with pytest.raises(T.NonFiniteAdapterError, match=rf"adapter tensor {first} is not finite"):
        trainer.save_checkpoint()


def test_an_lr_whose_update_overflows_stops_with_a_clear_error(tmp_path, dataset):
    cfg = config(tmp_path, max_steps=2, lr=3e38, warmup_epochs=0)  # finite, but AdamW's step size is not
    with pytest.raises(T.NonFiniteAdapterError, match=r"stopping at step 1: the optimizer update overflows .*"
                                                       r"learning rate \(3e\+38\) is far too high"):
        T.finetune(make_test_model(), dataset, cfg)
    assert T.latest_checkpoint(cfg.out_dir) is None


@pytest.mark.parametrize("failure", ["enospc", "torch-short-write"])
def test_full_disk_while_saving_names_the_path_and_leaves_no_temporaries(tmp_path, dataset, monkeypatch, failure):
    import errno
    model = make_test_model()
    cfg = config(tmp_path, max_steps=6, save_every=3)
    real_save = torch.save

    def save(obj, path, *a, **k):
        if obj.get("step") == 6:
            with open(path, "wb") as f:
                f.write(b"partial")
            if failure == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4310")
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(T.torch, "save", save)
    with pytest.raises(T.CheckpointWriteError) as e:
        T.finetune(model, dataset, cfg)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert "cannot write checkpoint step-00000006" in msg and "trainer_state.pt: no space left on device" in msg
    assert "the latest good checkpoint is still" in msg and msg.endswith("step-00000003")
    ckpts = os.path.join(cfg.out_dir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["latest", "step-00000003"]  # the partial checkpoint is gone


def test_stale_temporaries_are_cleaned_on_resume_and_the_good_checkpoint_kept(tmp_path, dataset):
    cfg = config(tmp_path, max_steps=6, save_every=2)

    def kill_at_3(record):
        if record["step"] == 3:
            raise Killed
    with pytest.raises(Killed):
        T.finetune(make_test_model(), dataset, cfg, on_step=kill_at_3)
    out, ckpts = cfg.out_dir, os.path.join(cfg.out_dir, "checkpoints")
    # what kills at other moments leave: a half-written checkpoint, log, adapter, pointer; and a checkpoint that
    # was being replaced by a re-save of its step (moved aside, the new copy not yet in place)
    os.makedirs(os.path.join(ckpts, ".tmp-step-00000004-99999"))
    open(os.path.join(ckpts, ".tmp-step-00000004-99999", "trainer_state.pt"), "wb").write(b"par")
    for name in ("log.jsonl.tmp-99999", "adapter.safetensors.tmp-99999.safetensors", "train_config.json.tmp-1"):
        open(os.path.join(out, name), "wb").write(b"par")
    open(os.path.join(ckpts, "latest.tmp-99999"), "wb").write(b"step-")
    os.replace(os.path.join(ckpts, "step-00000002"), os.path.join(ckpts, "step-00000002.old-99999"))
    cfg.resume = True
    result = T.finetune(make_test_model(), dataset, cfg)
    assert result.steps == 6 and [h["step"] for h in result.history] == list(range(1, 7))
    assert not [n for n in os.listdir(out) + os.listdir(ckpts) if ".tmp" in n or ".old-" in n]
    assert sorted(os.listdir(ckpts)) == ["latest", "step-00000004", "step-00000006"]


def test_corrupt_trainer_state_falls_back_to_the_previous_checkpoint(tmp_path, dataset, caplog):
    common = dict(max_steps=6, save_every=2, keep_checkpoints=3)
    straight = T.finetune(make_test_model(), dataset, config(tmp_path, "straight", **common))
    cfg = config(tmp_path, **common)

    def kill_at_5(record):
        if record["step"] == 5:
            raise Killed
    with pytest.raises(Killed):
        T.finetune(make_test_model(), dataset, cfg, on_step=kill_at_5)
    bad = os.path.join(cfg.out_dir, "checkpoints", "step-00000004", "trainer_state.pt")
    with open(bad, "r+b") as f:  # a torn write: the zip directory at the end is gone
        f.truncate(100)
    cfg.resume = True
    model = make_test_model()
    with caplog.at_level("WARNING", logger="lladapter_ext.training"):
        result = T.finetune(model, dataset, cfg)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"{bad} is unreadable" in warned and "falling back" in warned and "step-00000002" in warned, warned
    assert result.losses == straight.losses  # steps 3-6 redone from step 2, as in the straight run
    # nothing readable at all: an error naming the files
    for name in ("step-00000002", "step-00000004", "step-00000006"):
        with open(os.path.join(cfg.out_dir, "checkpoints", name, "trainer_state.pt"), "wb") as f:
            f.write(b"garbage")
    with pytest.raises(T.CheckpointCorruptError, match=r"no readable checkpoint .*step-00000006/trainer_state.pt "
                                                       r"is unreadable"):
        T.finetune(make_test_model(), dataset, cfg)


def test_a_corrupt_log_line_is_skipped_on_resume(tmp_path, dataset, caplog):
    cfg = config(tmp_path, max_steps=4, save_every=2)

    def kill_at_3(record):
        if record["step"] == 3:
            raise Killed
    with pytest.raises(Killed):
        T.finetune(make_test_model(), dataset, cfg, on_step=kill_at_3)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    lines = open(log_path).readlines()
    open(log_path, "w").writelines([lines[0], "{garbage\n", *lines[1:]])
    cfg.resume = True
    with caplog.at_level("WARNING", logger="lladapter_ext.training"):
        result = T.finetune(make_test_model(), dataset, cfg)
    assert any(f"{log_path}:2: skipping a corrupt log line" in r.getMessage() for r in caplog.records)
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in open(log_path)] == [1, 2, 3, 4]


def test_resume_refuses_changed_data_with_the_same_row_count(tmp_path, dataset, caplog):
    cfg = config(tmp_path, max_steps=4, save_every=2)

    def kill_at_3(record):
        if record["step"] == 3:
            raise Killed
    with pytest.raises(Killed):
        T.finetune(make_test_model(), dataset, cfg, on_step=kill_at_3)
    changed = D.TokenizedDataset([D.Example(list(e.input_ids), list(e.labels), e.source) for e in dataset.examples],
                                 dataset.pad_id, dataset.max_seq_len)
    changed.examples[5].input_ids[-2] += 1  # one token of one row
    cfg.resume = True
    with pytest.raises(D.DataChangedError, match=r"cannot resume .*step-00000002: the training data changed .* "
                                                 r"same 32 rows.*allow_data_change"):
        T.finetune(make_test_model(), changed, cfg)
    cfg.allow_data_change = True
    with caplog.at_level("WARNING", logger="lladapter_ext.training"):
        result = T.finetune(make_test_model(), changed, cfg)
    assert result.steps == 4 and any("training data changed" in r.getMessage() for r in caplog.records)


def test_resume_without_a_checkpoint_warns(tmp_path, dataset, caplog):
    with caplog.at_level("WARNING", logger="lladapter_ext.training"):
        result = T.finetune(make_test_model(), dataset, config(tmp_path, max_steps=1, resume=True))
    assert result.steps == 1
    assert any("resume: no checkpoint in" in r.getMessage() and "starting from step 0" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------------------------- runs going nowhere
def test_schedule_warnings_name_the_cause_and_the_option():
    from lladapter_ext.schedule import schedule_warnings

    # issue 16's run: 200 examples, batch 4, 2 epochs, the official defaults (2 warmup epochs, blr scaling)
    bad = schedule_warnings(base_lr=T.resolve_lr(None, 9e-3, 4), lr_given=False, blr=9e-3, effective_batch=4,
                            total_steps=100, warmup_steps=100)
    assert len(bad) == 2
    assert "whole schedule (100 steps) is warmup" in bad[0] and "--warmup-steps, e.g. 10" in bad[0]
    assert "peak learning rate 0.000141 is blr 0.009 x effective batch 4 / 256" in bad[1] and "--lr" in bad[1]
    mostly = schedule_warnings(base_lr=2e-2, lr_given=True, blr=9e-3, effective_batch=4, total_steps=100,
                               warmup_steps=60)
    assert len(mostly) == 1 and "60 of the 100 steps are warmup" in mostly[0]
    # the demo's settings and the official recipe at its own scale are fine
    assert schedule_warnings(base_lr=2e-2, lr_given=True, blr=9e-3, effective_batch=8, total_steps=100,
                             warmup_steps=10) == []
    assert schedule_warnings(base_lr=T.resolve_lr(None, 9e-3, 256), lr_given=False, blr=9e-3, effective_batch=256,
                             total_steps=1000, warmup_steps=400) == []


def test_loss_progress_warns_once_when_the_loss_is_flat():
    from lladapter_ext.schedule import LossProgress

    flat = LossProgress(total_steps=200)  # checks at step 50, windows of 10
    said = [flat.update(2.5 + 0.01 * ((i * 7) % 3), 1e-4) for i in range(200)]
    assert [i for i, m in enumerate(said) if m] == [49]
    assert "has not fallen after 50 steps" in said[49] and "learning rate 0.0001" in said[49]
    falling = LossProgress(total_steps=200)
    assert not any(falling.update(3.0 * 0.99 ** i, 1e-2) for i in range(200))
    nan_steps = LossProgress(total_steps=40)  # skipped (non-finite) steps do not count
    assert not any(nan_steps.update(float("nan"), 1e-2) for _ in range(40))


def test_a_run_with_the_official_defaults_on_small_data_says_why_it_will_not_learn(dataset, tmp_path, caplog):
    model = make_test_model()
    cfg = T.TrainConfig(out_dir=str(tmp_path / "run"), epochs=2, progress=False, plot=False)  # no lr, 2 warmup epochs
    with caplog.at_level(logging.WARNING, logger="lladapter_ext.training"):
        T.finetune(model, dataset, cfg)
    said = [r.getMessage() for r in caplog.records if r.name == "lladapter_ext.training"]
    assert any("is warmup" in m for m in said), said
    assert any("peak learning rate" in m and "--lr" in m for m in said), said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lladapter_ext.training"):
        T.finetune(make_test_model(), dataset, config(tmp_path, name="good"))
    assert not [r for r in caplog.records if r.name == "lladapter_ext.training"]


def test_schedule_summary_says_where_each_number_came_from(dataset, tmp_path):
    rows = len(dataset) // 4  # steps per epoch at the default micro-batch of 4
    trainer = T.Trainer(make_test_model(), dataset, T.TrainConfig(out_dir=str(tmp_path / "a"), epochs=2))
    assert trainer.schedule_summary() == (
        f"schedule: {2 * rows} optimizer steps (epochs 2 (set) x {rows} steps) of 4 rows (micro-batch 4 (default) x "
        f"accumulation 1 x 1 process(es)); warmup {2 * rows} steps (warmup_epochs 2 (default)); peak lr 0.000141 "
        "(blr 0.009 (default) x effective batch 4 / 256), cosine to 0")
    trainer = T.Trainer(make_test_model(), dataset, config(tmp_path, "b", max_steps=9, warmup_steps=2))
    assert trainer.schedule_summary().startswith("schedule: 9 optimizer steps (max_steps 9) of 4 rows")
    assert "warmup 2 steps (warmup_steps 2 (set)); peak lr 0.02 (lr, set)" in trainer.schedule_summary()
    # a value's recorded source (lladapter_ext.recipe: the CLI's options not given) replaces default/set
    trainer = T.Trainer(make_test_model(), dataset, config(tmp_path, "c", max_steps=9, warmup_steps=2,
                                                           sources={"warmup_steps": "recipe default: 0.1",
                                                                    "lr": "--lr"}))
    assert "warmup 2 steps (warmup_steps 2 (recipe default: 0.1)); peak lr 0.02 (lr, --lr)" in \
        trainer.schedule_summary()
