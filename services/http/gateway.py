"""The HTTP front of a running system: a Ray Serve application in front of the replicas.

* `POST /v1/completions`: the OpenAI completions API (greedy decoding), so existing clients talk
  to the edited model; each choice also says which edit fired and the replica version that answered
  (`editstream` field). `min_version` (an extension) waits until the answering replica applied it.
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
from typing import Any

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from editstream.errors import ConfigError, InvalidEditError
from editstream.events import Retract, parse_event
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
            return JSONResponse({"detail": "this token may read, not write: /facts needs the write token"}, 403)
        return JSONResponse({"detail": "missing or wrong bearer token"}, 401, headers={"WWW-Authenticate": "Bearer"})
    if request.method in ("POST", "PUT", "PATCH"):
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse({"detail": "a request body needs a Content-Length header"}, 411)
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return JSONResponse({"detail": f"request body of {length} bytes; at most {MAX_BODY_BYTES}"}, 413)
    return await call_next(request)


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str | list[str] = Field(..., description="a prompt or at most 32 of them")
    max_tokens: int = Field(16, ge=1, le=512)
    temperature: float | None = Field(None, ge=0, description="ignored: decoding is greedy")
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only 1")
    echo: bool = False
    user: str | None = None
    min_version: int = Field(0, ge=0, description="editstream: wait until the replica applied this seq")


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


def cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    """Text up to the first stop sequence, and whether one was found."""
    stops = [stop] if isinstance(stop, str) else (stop or [])
    cuts = [text.index(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


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

    async def _ask(self, prompts: list[str], max_tokens: int, min_version: int) -> list[dict]:
        names = self._ready_replicas()
        if not names:
            raise HTTPException(503, "no replica is ready (starting, or catching up with the journal)")
        start = next(self._rr)
        last_error: Exception | None = None
        for i in range(len(names)):  # a replica that died since its last heartbeat: try the next one
            name = names[(start + i) % len(names)]
            try:
                return await ReplicaClient(self._handle(name)).ask(prompts, max_tokens, min_version)
            except (ValueError, ray.exceptions.RayActorError) as e:
                self._handles.pop(name, None)
                last_error = e
        raise HTTPException(503, f"no replica answered: {last_error}")

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> dict:
        if body.echo:
            raise HTTPException(400, "echo=true is not supported")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise HTTPException(400, "prompt must be a non-empty string or a list of them")
        if len(prompts) > MAX_PROMPTS or max(len(p) for p in prompts) > MAX_PROMPT_CHARS:
            raise HTTPException(
                400, f"at most {MAX_PROMPTS} prompts of at most {MAX_PROMPT_CHARS} characters each per request"
            )
        answers = await self._ask(prompts, body.max_tokens, body.min_version)
        choices = []
        for i, a in enumerate(answers):
            text, stopped = cut_at_stop(a["text"], body.stop)
            choices.append(
                {
                    "index": i,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "stop" if stopped or a["finish_reason"] == "stop" else "length",
                    "editstream": {"fired": a["fired"], "version": a["version"], "replica": a["replica"]},
                }
            )
        prompt_tokens = sum(a["prompt_tokens"] for a in answers)
        completion_tokens = sum(a["completion_tokens"] for a in answers)
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

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
