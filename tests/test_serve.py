"""lladapter serve: the engine (continuous batching of mixed adapters) and the OpenAI-compatible HTTP server, tested
as users use it: a real uvicorn server on 127.0.0.1 and the official openai client, raw HTTP for the error cases.

The model is a tiny random LLaMA (weights large enough that greedy decoding has no near-ties) with mistral-common's
real SentencePiece tokenizer; two adapters with random prompts and gates of different lengths, depths and gate
activations, so that each changes the text. Every text is checked against generation.generate on a model with that
adapter loaded alone.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from llama_helpers import mistral_sentencepiece_model, save_hf, tiny_hf_model  # noqa: E402

from lladapter_ext.generation import generate  # noqa: E402
from lladapter_ext.loaders import load_model  # noqa: E402
from lladapter_ext.serving import Engine, GenerationRequest, QueueFull, RequestError  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# (adapter_len, adapter_layer, gate_act) of the two adapters; the tiny model has 3 layers
ADAPTERS = {"alpha": (4, 2, "tanh"), "beta": (6, 3, "identity")}
PROMPTS = ["Hello there, my friend", "The quick brown fox", "Once upon a time in a land far away", "A",
           "Numbers: one two three four five six"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    model_dir = d / "tiny"
    save_hf(tiny_hf_model(gqa=True, vocab_size=32000), model_dir)
    shutil.copy(mistral_sentencepiece_model(), model_dir / "tokenizer.model")
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    paths = {}
    for seed, (name, (K, L, act)) in enumerate(ADAPTERS.items()):
        model, _ = load_model(model_dir, adapter_len=K, adapter_layer=L, gate_act=act)
        torch.manual_seed(100 + seed)
        with torch.no_grad():
            for n, p in model.named_adapter_parameters():
                p.normal_(0.0, 0.6 if n.endswith("gate") else 1.0)
        paths[name] = str(d / f"{name}.safetensors")
        model.save_adapter(paths[name])
    return str(model_dir), paths


def alone(assets, name: str, prompts: list[str], max_new_tokens: int, **kw) -> list[str]:
    """What generation.generate gives each prompt alone, on the base model or with one adapter loaded."""
    model_dir, paths = assets
    model, tok = load_model(model_dir, adapter_layer=0) if name == "base" else \
        load_model(model_dir, adapter=paths[name])
    return [generate(model, tok, [p], max_new_tokens, **kw)[0] for p in prompts]


def new_engine(assets, **kw) -> Engine:
    model_dir, paths = assets
    model, tok = load_model(model_dir, adapter_layer=0)
    engine = Engine(model, tok, **kw)
    for name, path in paths.items():
        engine.load_adapter(name, path)
    return engine


def collect(engine: Engine, name: str, prompt: str, max_tokens: int, **kw):
    events = []
    req = GenerationRequest(engine.tokenizer.encode(prompt, bos=True), engine.get(name), max_tokens,
                            lambda kind, data: events.append((kind, data)), **kw)
    engine.submit(req)
    return req, events


def run_until_done(engine: Engine, reqs, limit: int = 10_000):
    for _ in range(limit):
        if all(r.finished for r in reqs):
            return
        engine.step()
    raise AssertionError("requests did not finish")


# ---------------------------------------------------------------------------------------------- the engine
def test_mixed_batch_greedy_text_equals_alone(assets):
    """Five requests over two adapters and the base model, different prompt lengths, three joining mid-flight in a
    batch bounded at 3 rows: each gets the greedy text it gets alone."""
    names = ["alpha", "beta", "base", "alpha", "beta"]
    expected = [alone(assets, n, [p], 12)[0] for n, p in zip(names, PROMPTS)]
    base = alone(assets, "base", PROMPTS, 12)
    for n in ("alpha", "beta"):  # each adapter changes the text: the test tells rows' adapters apart
        assert sum(a != b for a, b in zip(alone(assets, n, PROMPTS, 12), base)) >= 3, n
    engine = new_engine(assets, max_batch_size=3)
    reqs = []
    for i, (n, p) in enumerate(zip(names, PROMPTS)):
        reqs.append(collect(engine, n, p, 12))
        if i == 1:
            engine.step()
            engine.step()  # two requests running before the others arrive
    run_until_done(engine, [r for r, _ in reqs])
    for (req, events), want, n in zip(reqs, expected, names):
        assert "".join(d for k, d in events if k == "text") == want == req.text, n
        assert events[-1] == ("done", "length")
    assert engine.load() == {"running": 0, "queued": 0}


def test_seeded_sampling_and_stop_strings_match_alone(assets):
    want = alone(assets, "beta", PROMPTS[1:2], 10, temperature=0.8, top_p=0.9, seed=7)[0]
    want_stop = alone(assets, "alpha", PROMPTS[:1], 12, stop=[" DB"])[0]
    engine = new_engine(assets, max_batch_size=4)
    r1, _ = collect(engine, "beta", PROMPTS[1], 10, temperature=0.8, top_p=0.9, seed=7)
    r2, _ = collect(engine, "base", PROMPTS[2], 10, temperature=1.0, seed=3)
    r3, e3 = collect(engine, "alpha", PROMPTS[0], 12, stop=[" DB"])
    run_until_done(engine, [r1, r2, r3])
    assert r1.text == want
    assert r3.text == want_stop
    assert e3[-1] == ("done", "stop" if len(r3.generated) < 12 else "length")


def test_engine_refuses_bad_requests_naming_the_field(assets):
    engine = new_engine(assets, max_batch_size=2, max_queue=1)
    ctx = engine.context
    cases = [(dict(prompt_ids=[]), "prompt"), (dict(prompt_ids=[5] * ctx), "prompt"),
             (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=ctx), "max_tokens"),
             (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p")]
    for change, param in cases:
        args = dict(prompt_ids=[1, 5, 6], adapter=engine.get("alpha"), max_tokens=4, on_event=lambda *a: None)
        args.update(change)
        with pytest.raises(RequestError) as e:
            engine.submit(GenerationRequest(**args))
        assert e.value.param == param
    r, _ = collect(engine, "alpha", "x", 4)
    with pytest.raises(QueueFull):  # one request waits (max_queue=1): the next is refused, not dropped
        collect(engine, "alpha", "y", 4)
    run_until_done(engine, [r])
    assert r.finish_reason == "length"


def test_timeout_cancel_and_failing_listener_free_their_slots(assets):
    engine = new_engine(assets, max_batch_size=4)
    slow, slow_events = collect(engine, "alpha", PROMPTS[0], 50, timeout=0.0)
    gone, gone_events = collect(engine, "beta", PROMPTS[1], 50)
    ok, _ = collect(engine, "base", PROMPTS[2], 6)

    def broken(kind, data):
        raise RuntimeError("listener bug")
    bad = GenerationRequest(engine.tokenizer.encode("hi", bos=True), engine.get("beta"), 50, broken)
    engine.submit(bad)
    engine.step()
    gone.cancel()
    n_before = len(gone_events)
    run_until_done(engine, [slow, gone, ok, bad])
    assert slow_events[-1][0] == "error" and "timed out" in slow_events[-1][1]
    assert len(gone_events) == n_before and len(gone.generated) < 50  # no event after the cancel
    assert bad.cancelled and len(bad.generated) < 50
    assert ok.text == alone(assets, "base", PROMPTS[2:3], 6)[0]
    assert engine.load()["running"] == 0


def test_adapter_loading_checks_the_base(assets, tmp_path):
    model_dir, paths = assets
    engine = new_engine(assets)
    with pytest.raises(RequestError, match="already"):
        engine.load_adapter("alpha", paths["alpha"])
    from lladapter_ext.interop import Adapter, write_adapter
    narrow = Adapter(n_layers=3, prompts={2: torch.randn(2, 32)}, gates={2: torch.zeros(4)}, gate_act="tanh")
    write_adapter(narrow, tmp_path / "narrow.safetensors", "lladapter")
    with pytest.raises(RequestError, match="width 32"):
        engine.load_adapter("narrow", tmp_path / "narrow.safetensors")
    assert engine.get("narrow") is None
    with pytest.raises(RequestError, match="base model cannot"):
        engine.unload_adapter("base")


# ---------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def server(assets):
    from lladapter_ext.server import serve_in_thread

    engine = new_engine(assets, max_batch_size=4, max_queue=8)
    url, stop = serve_in_thread(engine)
    yield url, engine
    stop()


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def http(url, method: str, path: str, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers


def test_openai_client_completions_chat_and_streaming(server, assets):
    url, _ = server
    c = client(url)
    assert {m.id for m in c.models.list().data} == {"base", "alpha", "beta"}
    for name in ("alpha", "beta", "base"):
        want = alone(assets, name, PROMPTS[1:2], 10)[0]
        r = c.completions.create(model=name, prompt=PROMPTS[1], max_tokens=10, temperature=0)
        assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 10 and r.model == name
        pieces = [ch.choices[0].text for ch in c.completions.create(model=name, prompt=PROMPTS[1], max_tokens=10,
                                                                     temperature=0, stream=True)]
        assert "".join(pieces) == want

    model_dir, paths = assets
    model, tok = load_model(model_dir, adapter=paths["beta"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    want = generate(model, tok, [tok.apply_chat_template(messages)], 8)[0]
    r = c.chat.completions.create(model="beta", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="beta", messages=messages, max_tokens=8, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(server, assets):
    url, _ = server
    good = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    want = alone(assets, "alpha", PROMPTS[:1], 6)[0]
    cases = [
        (dict(good, model="nope"), 404, "model"),
        (dict(good, max_tokens="ten"), 400, "max_tokens"),
        (dict(good, max_tokens=0), 400, "max_tokens"),
        (dict(good, max_tokens=10_000), 400, "max_tokens"),
        (dict(good, temperature=-1), 400, "temperature"),
        (dict(good, top_p=1.5), 400, "top_p"),
        (dict(good, n=2), 400, "n"),
        (dict(good, prompt=" word" * 400), 400, "prompt"),
        (dict(good, prompt=17), 400, "prompt"),
        (dict(good, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (dict(good, logprobs=3), 400, "logprobs"),
        ({k: v for k, v in good.items() if k != "model"}, 400, "model"),
    ]
    for body, status, param in cases:
        code, out, _ = http(url, "POST", "/v1/completions", body)
        assert code == status, (body, out)
        assert out["error"]["param"] == param and out["error"]["message"], out
        code, out, _ = http(url, "POST", "/v1/completions", good)
        assert code == 200 and out["choices"][0]["text"] == want
    code, out, _ = http(url, "POST", "/v1/completions", raw=b'{"model": "alpha", "prompt": ')
    assert code == 400 and "JSON" in out["error"]["message"]
    code, out, _ = http(url, "POST", "/v1/chat/completions", {"model": "beta", "messages": [{"role": "x"}]})
    assert code == 400 and out["error"]["param"] == "messages[0]"
    with pytest.raises(openai.NotFoundError):
        client(url).completions.create(model="nope", prompt="x", max_tokens=2)
    assert http(url, "GET", "/health")[1]["status"] == "ok"


def test_adapters_load_and_unload_while_serving(server, assets):
    url, engine = server
    model_dir, paths = assets
    code, out, _ = http(url, "POST", "/v1/adapters", {"name": "gamma", "path": paths["beta"]})
    assert code == 201 and out["id"] == "gamma"
    assert http(url, "POST", "/v1/adapters", {"name": "gamma", "path": paths["beta"]})[0] == 409
    assert http(url, "POST", "/v1/adapters", {"name": "delta", "path": "/no/such/file"})[0] == 400
    want = alone(assets, "beta", PROMPTS[2:3], 40)[0]
    c = client(url)
    stream = c.completions.create(model="gamma", prompt=PROMPTS[2], max_tokens=40, temperature=0, stream=True)
    pieces = [next(iter(stream)).choices[0].text]
    assert http(url, "DELETE", "/v1/adapters/gamma")[0] == 200  # while the request is in flight
    pieces += [ch.choices[0].text for ch in stream]
    assert "".join(pieces) == want  # nothing dropped
    assert "gamma" not in {m.id for m in c.models.list().data}
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gamma", prompt="x", max_tokens=2)
    assert http(url, "DELETE", "/v1/adapters/gamma")[0] == 404


def test_full_queue_answers_429_and_loses_nothing(server, assets):
    url, engine = server
    gate = threading.Event()
    step = engine.step

    def held_step():
        gate.wait()
        step()
    engine.step = held_step
    try:
        with ThreadPoolExecutor(engine.max_queue) as pool:
            body = {"model": "beta", "prompt": PROMPTS[3], "max_tokens": 5, "temperature": 0}
            futures = [pool.submit(http, url, "POST", "/v1/completions", body) for _ in range(engine.max_queue)]
            for _ in range(200):
                if engine.load()["queued"] == engine.max_queue:
                    break
                time.sleep(0.02)
            code, out, headers = http(url, "POST", "/v1/completions", body)
            assert code == 429 and out["error"]["type"] == "rate_limit_error" and int(headers["Retry-After"]) >= 1
            gate.set()
            want = alone(assets, "beta", PROMPTS[3:4], 5)[0]
            assert [f.result()[1]["choices"][0]["text"] for f in futures] == [want] * engine.max_queue
    finally:
        engine.step = step
        gate.set()


def test_client_disconnect_cancels_the_request(server):
    url, engine = server
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        step()
    engine.step = slow_step
    try:
        before = engine.generated_tokens
        c = client(url)
        stream = c.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=100, temperature=0, stream=True)
        next(iter(stream))
        stream.close()
        for _ in range(200):
            if engine.load()["running"] == 0:
                break
            time.sleep(0.05)
        assert engine.load()["running"] == 0
        assert engine.generated_tokens - before < 100  # stopped early: the slot was freed
    finally:
        engine.step = step


def test_concurrent_clients_over_several_adapters(server, assets):
    """A bounded load test on loopback: 8 clients for 3 s over the base model and two adapters; every request
    succeeds and gets exactly its own text."""
    url, _ = server
    names = ["base", "alpha", "beta"]
    want = {(n, p): alone(assets, n, [p], 8)[0] for n in names for p in PROMPTS[:3]}
    deadline = time.monotonic() + 3.0

    def worker(k: int):
        c = client(url)
        latencies = []
        while time.monotonic() < deadline:
            n, p = names[(k + len(latencies)) % 3], PROMPTS[(k * 7 + len(latencies)) % 3]
            t0 = time.perf_counter()
            r = c.completions.create(model=n, prompt=p, max_tokens=8, temperature=0)
            latencies.append(time.perf_counter() - t0)
            assert r.choices[0].text == want[(n, p)], (n, p)
        return latencies

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        per_client = list(pool.map(worker, range(8)))
    wall = time.perf_counter() - t0
    assert all(per_client)  # every client got answers; a failed or lost request would have raised
    lat = sorted(x for c in per_client for x in c)
    print(f"\nload test: 8 clients, {len(lat)} requests in {wall:.1f} s, 0 failed; latency p50 "
          f"{lat[len(lat) // 2] * 1e3:.0f} ms, p95 {lat[int(0.95 * (len(lat) - 1))] * 1e3:.0f} ms")


def test_lladapter_serve_command(assets):
    """The command line as users start it: `python -m lladapter_ext serve --model DIR --adapter NAME=PATH`."""
    import os
    import signal
    import subprocess
    import sys

    model_dir, paths = assets
    bad = subprocess.run([sys.executable, "-m", "lladapter_ext", "serve", "--model", model_dir, "--adapter",
                          "x=/no/such/adapter"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "/no/such/adapter" in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lladapter_ext", "serve", "--model", model_dir, "--adapter",
                             f"beta={paths['beta']}", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if http(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        r = client(url).completions.create(model="beta", prompt=PROMPTS[4], max_tokens=8, temperature=0)
        assert r.choices[0].text == alone(assets, "beta", PROMPTS[4:5], 8)[0]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert "serving beta: lladapter adapter" in out and "serving base: the base model" in out, (out, err)
    assert proc.returncode == 0, err
