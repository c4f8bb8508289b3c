"""The HTTP front of a running system: a Ray Serve application in front of the replicas.

* `POST /v1/chat/completions`: the OpenAI chat API. The conversation goes through the model's chat
  template; the edit is looked up on the last user message (the question), and its prefix sits
  right before those words. `stream: true` sends server-sent events as tokens are decoded.
* `POST /v1/completions`: the OpenAI completions API, streamed or not, so existing clients talk
  to the edited model; each choice also says which edit fired and the replica version that answered
  (`editstream` field). `min_version` (an extension) waits until the answering replica applied it.
  Both decode greedily unless `temperature` > 0 (then `top_p` and `seed` apply); what is not
  supported (n > 1, logprobs, tools, penalties) is refused with a 400 in OpenAI's error shape.
* `GET /v1/models`: the one model served.
* `POST /facts`: validates fact events (the wire contract) and XADDs them to the facts stream;
  with `"wait": true` it also waits until ingest journaled them and returns their seqs, which a
  client passes as `min_version` to read its own writes. A bad fact rejects the whole request (422)
  with the reason per fact, so nothing is half-sent.
* `GET /status`: journal, lag, DLQ, replicas (version, digest, ready).

Queries go only to replicas that are ready (caught up with the journal as it stood when they
started) and alive (heartbeat younger than `stale_s`), round robin. With tokens configured, every
route (the API docs included) needs `Authorization: Bearer <read token>`, and `POST /facts` the
write token (the same one unless a separate write token is set); the check runs in a middleware,
before a body is read, as does the size limit (`MAX_BODY_BYTES`; 411 without a Content-Length).
Bound to 127.0.0.1 unless told; any other address is refused without a token.
(No `from __future__ import annotations` here: FastAPI reads the route signatures' types at runtime.)
"""

import asyncio
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve

from editstream.errors import ConfigError, InvalidEditError
from editstream.events import Retract, parse_event
from editstream.generation import Sampling
from services.transport.store import RedisStore, connect, status
from services.wiring.clients import ReplicaClient
from services.wiring.placement import SLOTS

log = logging.getLogger(__name__)

app = FastAPI(title="editstream", description="A knowledge-edited LLM behind the OpenAI completions API")
app.state.tokens = (None, None)  # (read, write); set by the Gateway on its replica
MAX_BODY_BYTES = 1_000_000
MAX_PROMPTS = 32  # per completions request: one request holds a replica while it decodes
MAX_PROMPT_CHARS = 8000
WRITE_ROUTES = frozenset({"/facts"})
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def error_response(request: Request, status_code: int, message: Any, headers: dict | None = None) -> JSONResponse:
    """An error as the route's clients read it: OpenAI's `{"error": {...}}` under /v1/, else
    FastAPI's `{"detail": ...}` (POST /facts keeps its per-fact reasons)."""
    if not request.url.path.startswith("/v1/"):
        return JSONResponse({"detail": message}, status_code, headers=headers)
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(status_code)
    kind = kind or ("invalid_request_error" if status_code < 500 else "server_error")
    text = message if isinstance(message, str) else json.dumps(message)
    return JSONResponse({"error": {"message": text, "type": kind, "param": None, "code": None}}, status_code, headers)


@app.exception_handler(HTTPException)
async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(request, exc.status_code, exc.detail, getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if not request.url.path.startswith("/v1/"):
        return JSONResponse({"detail": exc.errors()}, 422)
    where = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
    return error_response(request, 400, f"invalid request: {where}")


def _bearer_ok(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


@app.middleware("http")
async def guard(request: Request, call_next):
    """Authorise and bound a request before anything reads its body."""
    read, write = request.app.state.tokens
    needed = write if request.url.path in WRITE_ROUTES else read
    if needed and not _bearer_ok(request, needed):
        if read and needed != read and _bearer_ok(request, read):
            return error_response(request, 403, "this token may read, not write: /facts needs the write token")
        return error_response(request, 401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    if request.method in ("POST", "PUT", "PATCH"):
        length = request.headers.get("content-length")
        if length is None:
            return error_response(request, 411, "a request body needs a Content-Length header")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return error_response(request, 413, f"request body of {length} bytes; at most {MAX_BODY_BYTES}")
    return await call_next(request)


class Decoding(BaseModel):
    """What chat and completions requests share: length, sampling, stops, streaming."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=512, description="default 16 (completions), 256 (chat)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or unset: greedy; > 0: sample")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling (with temperature > 0)")
    seed: int | None = Field(None, description="repeatable sampling")
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, description="only 1")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    min_version: int = Field(0, ge=0, description="editstream: wait until the replica applied this seq")

    def refuse_unsupported(self) -> None:
        """A 400 naming each asked-for feature this server does not have (never silently ignored)."""
        asked = {
            "n > 1": self.n > 1,
            "logprobs": bool(self.logprobs),
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "logit_bias": bool(self.logit_bias),
            "top_p without temperature > 0": self.top_p not in (None, 1) and not self.temperature,
            "more than 4 stop sequences": len(self.stops()) > 4,
        }
        refused = [name for name, on in asked.items() if on]
        if refused:
            raise HTTPException(400, f"not supported: {', '.join(refused)}")

    def stops(self) -> list[str]:
        """The request's stop sequences: the replica ends decoding at one, the gateway cuts there."""
        return stop_list(self.stop)

    def sampling(self) -> Sampling | None:
        if not self.temperature:
            return None
        return Sampling(self.temperature, self.top_p or 1.0, self.seed)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(Decoding):
    prompt: str | list[str] = Field(..., description="a prompt or at most 32 of them")
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """The message's text (content parts of type "text" joined; any other part is refused)."""
        if isinstance(self.content, str):
            return self.content
        kinds = {part.get("type") for part in self.content}
        if kinds - {"text"}:
            raise HTTPException(400, f"only text content is supported, got parts of type {sorted(map(str, kinds))}")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(Decoding):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=512)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def conversation(self) -> tuple[str, list[dict[str, str]]]:
        """The question (the last message, a user's) and the turns before it, for the template."""
        if self.messages[-1].role != "user":
            raise HTTPException(400, f"the last message must be the user's, got role {self.messages[-1].role!r}")
        if self.tools or self.tool_choice not in (None, "none"):
            raise HTTPException(400, "not supported: tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise HTTPException(400, f"not supported: response_format {self.response_format.get('type')!r}")
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        question = turns[-1]["content"]
        if not question or len(question) > MAX_PROMPT_CHARS:
            raise HTTPException(400, f"the last user message must hold 1 to {MAX_PROMPT_CHARS} characters")
        return question, turns[:-1]


class FactsRequest(BaseModel):
    facts: list[dict[str, Any]] = Field(..., min_length=1, max_length=1000)
    wait: bool = Field(False, description="wait until ingest journaled every fact; returns their seqs")


def fields_of(fact: dict[str, Any]) -> dict[str, str]:
    """A JSON fact as stream fields: strings, paraphrases as a JSON list (the wire contract)."""
    out = {}
    for key, value in fact.items():
        if key == "paraphrases" and isinstance(value, list):
            out[key] = json.dumps(value)
        elif isinstance(value, str):
            out[key] = value
        else:
            raise InvalidEditError(f"field {key!r} must be a string, got {type(value).__name__}")
    return out


def stop_list(stop: str | list[str] | None) -> list[str]:
    """A request's `stop` (one string or a list) as a list of its non-empty sequences."""
    return [s for s in ([stop] if isinstance(stop, str) else (stop or [])) if s]


def cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    """Text up to the first stop sequence, and whether one was found."""
    stops = stop_list(stop)
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopWatch:
    """Cuts a streamed text at the first stop sequence: `feed` returns what may be sent now, holding
    back a tail that could still grow into a stop; `stopped` once one was found."""

    def __init__(self, stop: str | list[str] | None) -> None:
        self.stops = stop_list(stop)
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut, self.stopped = cut_at_stop(self.text, self.stops)
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stops), default=0)
        ready = len(cut) - hold
        out = cut[self.sent : max(ready, self.sent)]
        self.sent += len(out)
        return out

    def rest(self) -> str:
        """What was held back, once the text ended without a stop."""
        out = "" if self.stopped else self.text[self.sent :]
        self.sent += len(out)
        return out


def sse(doc: dict | str) -> str:
    """One server-sent event."""
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(app)
class Gateway:
    def __init__(
        self,
        redis_url: str,
        namespace: str,
        ray_namespace: str,
        model: str,
        token: str | None = None,
        stale_s: float = 10.0,
        write_token: str | None = None,
    ) -> None:
        self.store = RedisStore(connect(redis_url), namespace)
        self.namespace, self.ray_namespace, self.model = namespace, ray_namespace, model
        self.stale_s = stale_s
        app.state.tokens = (token, write_token or token)
        self._handles: dict[str, Any] = {}
        self._rr = itertools.count()

    def _ready_replicas(self) -> list[str]:
        return self.store.ready_replicas(self.stale_s)

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = ray.get_actor(f"{self.namespace}:{name}", namespace=self.ray_namespace)
        return self._handles[name]

    def _in_turn(self) -> list[str]:
        """The ready replicas, starting with the next one round robin (503 if none)."""
        names = self._ready_replicas()
        if not names:
            raise HTTPException(503, "no replica is ready (starting, or catching up with the journal)")
        start = next(self._rr)
        return [names[(start + i) % len(names)] for i in range(len(names))]

    async def _ask(self, prompts: list[str], max_tokens: int, body: Decoding, chat: bool = False) -> list[dict]:
        last_error: Exception | None = None
        for name in self._in_turn():  # a replica that died since its last heartbeat: try the next one
            try:
                client = ReplicaClient(self._handle(name))
                return await client.ask(
                    prompts, max_tokens, body.min_version, chat=chat, sampling=body.sampling(), stop=body.stops()
                )
            except (ValueError, ray.exceptions.RayActorError) as e:
                self._handles.pop(name, None)
                last_error = e
        raise HTTPException(503, f"no replica answered: {last_error}")

    async def _stream(
        self, prompt: str, max_tokens: int, body: Decoding, chat: bool, history: list[dict[str, str]]
    ) -> tuple[dict | None, Any]:
        """The first item of a streamed answer and the rest of its stream, from the first replica
        that starts one (a replica that failed before its first item is skipped)."""
        last_error: Exception | None = None
        for name in self._in_turn():
            try:
                client = ReplicaClient(self._handle(name))
                items = client.ask_stream(
                    prompt, max_tokens, body.min_version, 30.0, chat, history, body.sampling(), body.stops()
                )
                first = await (await items.__anext__())
                return first, items
            except (ValueError, ray.exceptions.RayActorError) as e:
                self._handles.pop(name, None)
                last_error = e
        raise HTTPException(503, f"no replica answered: {last_error}")

    async def _pieces(
        self, prompt: str, max_tokens: int, body: Decoding, chat: bool = False, history: list | None = None
    ) -> AsyncIterator[tuple[str, dict | None]]:
        """(text, None) per piece to send, cut at the request's stop sequences, then ("", answer)."""
        first, items = await self._stream(prompt, max_tokens, body, chat, history or [])
        watch = StopWatch(body.stop)
        item: dict | None = first
        while item is not None and not item.get("done"):
            text = watch.feed(item["text"])
            if text:
                yield text, None
            item = await (await items.__anext__())
        text = watch.rest()
        if text:
            yield text, None
        if item is not None and watch.stopped:
            item["finish_reason"] = "stop"
        yield "", item

    def _stream_response(self, events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @staticmethod
    def _usage(answers: list[dict]) -> dict:
        prompt_tokens = sum(a["prompt_tokens"] for a in answers)
        completion_tokens = sum(a["completion_tokens"] for a in answers)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @staticmethod
    def _extra(a: dict) -> dict:
        return {"fired": a["fired"], "version": a["version"], "replica": a["replica"]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        body.refuse_unsupported()
        if body.echo:
            raise HTTPException(400, "not supported: echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise HTTPException(400, "prompt must be a non-empty string or a list of them")
        if len(prompts) > MAX_PROMPTS or max(len(p) for p in prompts) > MAX_PROMPT_CHARS:
            raise HTTPException(
                400, f"at most {MAX_PROMPTS} prompts of at most {MAX_PROMPT_CHARS} characters each per request"
            )
        max_tokens = body.max_tokens or 16
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time())}
        head["model"] = self.model
        if body.stream:
            if len(prompts) > 1:
                raise HTTPException(400, "not supported: streaming more than one prompt")
            return self._stream_response(self._completion_events(prompts[0], max_tokens, body, head))
        answers = await self._ask(prompts, max_tokens, body)
        choices = []
        for i, a in enumerate(answers):
            text, stopped = cut_at_stop(a["text"], body.stop)
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "stop" if stopped or a["finish_reason"] == "stop" else "length",
                    "editstream": self._extra(a),
                }
            )
        return {**head, "choices": choices, "usage": self._usage(answers)}

    async def _completion_events(self, prompt: str, max_tokens: int, body: Decoding, head: dict) -> AsyncIterator[str]:
        async for text, answer in self._pieces(prompt, max_tokens, body):
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
            if answer is not None:
                choice.update(finish_reason=answer["finish_reason"], editstream=self._extra(answer))
            yield sse({**head, "choices": [choice]})
            if answer is not None and body.include_usage():
                yield sse({**head, "choices": [], "usage": self._usage([answer])})
        yield sse("[DONE]")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request) -> Any:
        body.refuse_unsupported()
        question, history = body.conversation()
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time())}
        head["model"] = self.model
        if body.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}
            return self._stream_response(self._chat_events(question, history, max_tokens, body, chunk_head))
        text, answer = "", None
        async for piece, done in self._pieces(question, max_tokens, body, chat=True, history=history):
            text, answer = text + piece, done or answer
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": answer["finish_reason"],
            "editstream": self._extra(answer),
        }
        return {**head, "choices": [choice], "usage": self._usage([answer])}

    async def _chat_events(
        self, question: str, history: list[dict[str, str]], max_tokens: int, body: ChatRequest, head: dict
    ) -> AsyncIterator[str]:
        yield sse(
            {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        )
        async for text, answer in self._pieces(question, max_tokens, body, chat=True, history=history):
            if answer is None:
                yield sse({**head, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
                continue
            choice = {
                "index": 0,
                "delta": {},
                "finish_reason": answer["finish_reason"],
                "editstream": self._extra(answer),
            }
            yield sse({**head, "choices": [choice]})
            if body.include_usage():
                yield sse({**head, "choices": [], "usage": self._usage([answer])})
        yield sse("[DONE]")

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "editstream"}]}

    @app.post("/facts", status_code=202)
    async def facts(self, body: FactsRequest, request: Request) -> dict:
        parsed, errors = [], []
        for i, fact in enumerate(body.facts):
            try:
                fields = fields_of(fact)
                parsed.append((fields, parse_event(fields)))
            except InvalidEditError as e:
                errors.append({"index": i, "reason": str(e)})
        if errors:
            raise HTTPException(422, {"rejected": errors, "queued": 0})
        pipe = self.store.r.pipeline(transaction=False)
        for fields, _ in parsed:
            pipe.xadd(self.store.keys.facts, fields)
        entries = pipe.execute()
        queued = [
            {"entry": e.decode(), "edit_id": ev.edit_id, "op": "retract" if isinstance(ev, Retract) else "edit"}
            for e, (_, ev) in zip(entries, parsed, strict=True)
        ]
        if body.wait:
            await self._wait_journaled(queued)
        return {"queued": queued}

    async def _wait_journaled(self, queued: list[dict], timeout_s: float = 30.0) -> None:
        """Fill in each fact's journal seq once ingest assigned it (a duplicate gets the first seq)."""
        deadline = time.time() + timeout_s
        pending = list(queued)
        while pending and time.time() < deadline:
            found = self.store.r.hmget(self.store.keys.ids, [q["edit_id"] for q in pending])
            for q, raw in zip(list(pending), found, strict=True):
                if raw is not None:
                    q["seq"] = int(raw.decode().split(":", 1)[0])
                    pending.remove(q)
            if pending:
                await asyncio.sleep(0.05)
        for q in pending:
            q["seq"] = None  # not journaled in time (or rejected to the DLQ: see GET /status)

    @app.get("/status")
    async def get_status(self, request: Request) -> dict:
        return {**status(self.store), "ready_replicas": self._ready_replicas()}


def start_http(
    redis_url: str,
    namespace: str,
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    write_token: str | None = None,
) -> str:
    """Run the gateway on Ray Serve (on the connected cluster); returns its base URL. Refuses an
    address beyond loopback without a token: anyone who reached it could edit the model."""
    if host not in LOOPBACK and not token:
        raise ConfigError(
            f"refusing to serve HTTP on {host} without a bearer token: set $EDITSTREAM_HTTP_TOKEN "
            "(and $EDITSTREAM_HTTP_WRITE_TOKEN for POST /facts), or bind to 127.0.0.1"
        )
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    ray_namespace = ray.get_runtime_context().namespace
    options: dict[str, Any] = {"num_cpus": 0}
    if ray.cluster_resources().get(SLOTS["ingest"], 0) > 0:  # a cluster with control nodes: run there
        options["resources"] = {SLOTS["ingest"]: 0.001}
    serve.run(
        Gateway.options(ray_actor_options=options).bind(
            redis_url, namespace, ray_namespace, model, token, 10.0, write_token
        ),
        name=f"{namespace}-gateway",
        route_prefix="/",
        blocking=False,
    )
    return f"http://{host}:{port}"
