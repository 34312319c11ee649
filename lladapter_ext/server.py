"""`lladapter serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, server-sent events for streaming) in
front of a serving.Engine: one base model, many adapters, continuous batching of mixed requests.

    POST /v1/completions, /v1/chat/completions   OpenAI's shapes; "model" picks the adapter (or the base model);
                                                  "stream": true sends server-sent events ending with [DONE]
    GET  /v1/models                               the base model and every loaded adapter
    POST /v1/adapters {"name", "path"}            load an adapter while serving (201)
    DELETE /v1/adapters/{name}                    unload it (requests in flight finish)
    GET  /health                                  {"status": "ok", "running", "queued"}

Errors come as OpenAI's error object {"error": {"message", "type", "param", "code"}}: 400 for a bad field (named
in "param"), 404 for an unknown model, 429 with Retry-After when the queue is full, 504 when a request times out.
docs/serving.md has the examples.
"""
import asyncio
import json
import socket
import threading
import time
import uuid

from . import _optional
from .serving import Engine, GenerationRequest, QueueFull, RequestError

__all__ = ["create_app", "serve", "serve_in_thread"]

# Fields of OpenAI's requests that this server does not implement: refused when set to a value that changes the
# result (a silent ignore would return something else than asked for).
_UNSUPPORTED = {"logprobs": (None, False, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
                "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
                "tools": (None, []), "functions": (None, []), "top_logprobs": (None, 0),
                "response_format": (None, {"type": "text"})}


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}


def _error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _field(body: dict, name: str, kind, default, check=None, why: str = ""):
    """body[name] (default when absent or null) of type kind (a tuple of types), passing check, else a 400 naming
    the field. bool is not accepted where a number is expected (JSON true is not 1)."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                             list: "an array", dict: "an object"}[k] for k in kinds)
        raise _HTTPError(400, f"{name} must be {names}, got {json.dumps(value)[:80]}", name)
    if check is not None and not check(value):
        raise _HTTPError(400, f"{name} {why}, got {json.dumps(value)[:80]}", name)
    return value


def _stop_strings(body: dict) -> list[str]:
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise _HTTPError(400, "stop must be a string or an array of at most 4 strings", "stop")
    return [s for s in stop if s]


class _Job:
    """One request's bridge between the engine thread and the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()

    def on_event(self, kind: str, data) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, data))


def create_app(engine: Engine):
    """The FastAPI application serving `engine` (started and stopped with the app)."""
    fastapi = _optional.require("fastapi", "lladapter serve")
    from contextlib import asynccontextmanager

    JSONResponse = _optional.require("fastapi.responses", "lladapter serve").JSONResponse
    sse = _optional.require("sse_starlette", "lladapter serve (streaming)")

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = fastapi.FastAPI(title="lladapter", lifespan=lifespan)

    @app.exception_handler(_HTTPError)
    async def _http_error(request, exc: _HTTPError):
        return JSONResponse(_error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def _validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(_error_body(f"{param}: {first.get('msg', 'invalid request')}", "invalid_request_error",
                                        param), status_code=400)

    def _model_card(m) -> dict:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "lladapter",
                "root": engine.base_name, "parent": None if m.is_base else engine.base_name}

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(m) for m in engine.models()]}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(request: fastapi.Request):
        body = await _json_body(request)
        name = _field(body, "name", str, None)
        path = _field(body, "path", str, None)
        if not name or not path:
            raise _HTTPError(400, "give the adapter's name and path", "name" if not name else "path")
        try:
            served = await asyncio.to_thread(engine.load_adapter, name, path)
        except RequestError as e:
            raise _HTTPError(409 if e.param == "name" else 400, str(e), e.param) from e
        except (OSError, ValueError) as e:
            raise _HTTPError(400, str(e), "path") from e
        return _model_card(served)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        try:
            engine.unload_adapter(name)
        except KeyError as e:
            raise _HTTPError(404, f"no model named {name!r} is being served", "name", "not_found_error",
                             "model_not_found") from e
        except RequestError as e:
            raise _HTTPError(400, str(e), e.param) from e
        return {"id": name, "object": "model", "deleted": True}

    async def _json_body(request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _HTTPError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise _HTTPError(400, "the request body must be a JSON object")
        return body

    def _request(body: dict, prompt_ids: list[int], job: _Job, default_max_tokens: int | None) -> GenerationRequest:
        name = _field(body, "model", str, None)
        if name is None:
            raise _HTTPError(400, "model is required (GET /v1/models lists them)", "model")
        served = engine.get(name)
        if served is None:
            raise _HTTPError(404, f"the model {name!r} does not exist (served: "
                             f"{', '.join(m.name for m in engine.models())})", "model", "not_found_error",
                             "model_not_found")
        for key, allowed in _UNSUPPORTED.items():
            if key in body and body[key] not in allowed:
                raise _HTTPError(400, f"{key} is not supported by this server", key)
        _field(body, "n", int, 1, lambda n: n == 1, "must be 1 (one choice per request)")
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        room = engine.context - len(prompt_ids)
        max_tokens = _field(body, max_key, int, default_max_tokens if default_max_tokens else max(room, 1))
        seed = _field(body, "seed", int, None)
        req = GenerationRequest(
            prompt_ids, served, max_tokens, job.on_event,
            temperature=float(_field(body, "temperature", (int, float), 1.0)),
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            seed=seed, stop=_stop_strings(body), stream=_field(body, "stream", bool, False))
        try:
            engine.submit(req)
        except RequestError as e:
            param = max_key if e.param == "max_tokens" else e.param
            raise _HTTPError(400, str(e).replace("max_tokens", max_key), param) from e
        except QueueFull as e:
            raise _HTTPError(429, f"{e}; retry after {e.retry_after} s", None, "rate_limit_error",
                             headers={"Retry-After": str(e.retry_after)}) from e
        return req

    async def _events(request, req: GenerationRequest, job: _Job):
        """(kind, data) events of req until done or error; cancels it when the client goes away."""
        try:
            while True:
                try:
                    kind, data = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        req.cancel()
                        return
                    continue
                yield kind, data
                if kind in ("done", "error"):
                    return
        finally:
            if not req.finished:
                req.cancel()

    def _usage(req: GenerationRequest) -> dict:
        n = len(req.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": len(req.generated), "total_tokens": n + len(req.generated)}

    async def _respond(request, body: dict, prompt_ids: list[int], chat: bool, default_max_tokens):
        job = _Job(asyncio.get_running_loop())
        req = _request(body, prompt_ids, job, default_max_tokens)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind_name = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if req.stream:
                delta = {"role": "assistant"} if first else {}
                if text:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}

        def chunk(text, finish, first=False, usage=None) -> str:
            out = {"id": rid, "object": kind_name + (".chunk" if chat else ""), "created": created,
                   "model": req.adapter.name, "choices": [choice(text, finish, first)]}
            if usage is not None:
                out["usage"] = usage
            return json.dumps(out)

        if req.stream:
            async def stream():
                first = True
                async for kind, data in _events(request, req, job):
                    if kind == "text":
                        yield {"data": chunk(data, None, first)}
                        first = False
                    elif kind == "done":
                        yield {"data": chunk(None, data, first, _usage(req))}
                    else:
                        yield {"data": json.dumps(_error_body(str(data), "server_error"))}
                yield {"data": "[DONE]"}
            return sse.EventSourceResponse(stream(), ping=15)

        error = None
        async for kind, data in _events(request, req, job):
            if kind == "error":
                error = str(data)
        if req.cancelled:
            return JSONResponse(_error_body("the client disconnected", "invalid_request_error"), status_code=499)
        if error is not None:
            status = 504 if "timed out" in error else 500
            raise _HTTPError(status, error, None, "timeout_error" if status == 504 else "server_error")
        return JSONResponse({"id": rid, "object": kind_name, "created": created, "model": req.adapter.name,
                             "choices": [choice(req.text, req.finish_reason)], "usage": _usage(req)})

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await _json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            if not all(0 <= t < engine.model.config.vocab_size for t in prompt):
                raise _HTTPError(400, f"prompt: token ids must be in [0, {engine.model.config.vocab_size})",
                                 "prompt")
            ids = list(prompt)
        elif isinstance(prompt, str):
            ids = engine.tokenizer.encode(prompt, bos=True)
        else:
            raise _HTTPError(400, "prompt must be a string (or an array of one string, or of token ids)", "prompt")
        return await _respond(request, body, ids, chat=False, default_max_tokens=16)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        body = await _json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _HTTPError(400, "messages must be a non-empty array of {role, content} objects", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise _HTTPError(400, f"messages[{i}] must be an object with a role (system, user or assistant) "
                                 "and a string content", f"messages[{i}]")
        tok = engine.tokenizer
        if not tok.chat_template:
            raise _HTTPError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
        text = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                       add_generation_prompt=True)
        # the template writes the BOS token itself when the model wants one
        ids = tok.encode(text, bos=not (tok.bos_token and text.startswith(tok.bos_token)))
        return await _respond(request, body, ids, chat=True, default_max_tokens=None)

    return app


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until interrupted (Ctrl-C)."""
    uvicorn = _optional.require("uvicorn", "lladapter serve")
    uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)


def serve_in_thread(engine: Engine, host: str = "127.0.0.1", log_level: str = "warning"):
    """Start the server on a free port of `host` in a daemon thread (tests, benchmarks, notebooks); returns
    (base URL, stop), stop() shutting it down. The socket is bound before the thread starts: no port race."""
    uvicorn = _optional.require("uvicorn", "lladapter serve")
    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start")
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    return f"http://{host}:{sock.getsockname()[1]}", stop
