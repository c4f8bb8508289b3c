"""The HTTP gateway (Ray Serve): OpenAI completions, POST /facts, GET /status, bearer token, bind address."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest
from openai import OpenAI

from services.http.gateway import ChatRequest, CompletionRequest, StopWatch, cut_at_stop, fields_of
from services.transport.redis_server import free_port
from services.wiring.system import System, SystemConfig

pytestmark = [pytest.mark.redis, pytest.mark.ray]

TOKEN = "test-token-123"
WRITE_TOKEN = "write-token-456"


def test_fields_of_and_stop_sequences():
    assert fields_of({"prompt": "p", "target": "t", "paraphrases": ["a", "b"]}) == {
        "prompt": "p",
        "target": "t",
        "paraphrases": '["a", "b"]',
    }
    with pytest.raises(ValueError, match="'target' must be a string"):
        fields_of({"prompt": "p", "target": 3})
    assert cut_at_stop("Paris. And then", ".") == ("Paris", True)
    assert cut_at_stop("Paris", ["\n", "xx"]) == ("Paris", False)


def test_a_streamed_text_is_cut_at_a_stop_split_over_pieces():
    watch = StopWatch(["END", "\n\n"])
    sent = [watch.feed(p) for p in ["Lyon", " is", " E", "N", "D and more"]]
    assert "".join(sent) == "Lyon is " and watch.stopped
    assert watch.feed("x") == "" and watch.rest() == ""
    watch = StopWatch("xyz")
    assert watch.feed("abx") == "a"  # the last 2 characters wait: they could be the start of "xyz"
    assert watch.rest() == "bx"
    watch = StopWatch(None)
    assert watch.feed("a") == "a" and watch.rest() == ""


def test_chat_and_sampling_requests_are_checked_by_name():
    from fastapi import HTTPException

    chat = ChatRequest(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}])
    assert chat.conversation() == ("Hi?", [{"role": "system", "content": "Be brief."}])
    parts = ChatRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}]
    )
    assert parts.conversation() == ("AB", [])
    refused = [
        (
            ChatRequest(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
            "role 'assistant'",
        ),
        (ChatRequest(messages=[{"role": "user", "content": "Hi"}], tools=[{"type": "function"}]), "tools"),
        (ChatRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "image_url"),
    ]
    for request, reason in refused:
        with pytest.raises(HTTPException, match=reason):
            request.conversation()
    for fields, reason in [({"n": 2}, "n > 1"), ({"logprobs": 2}, "logprobs"), ({"top_p": 0.5}, "top_p without")]:
        with pytest.raises(HTTPException, match=reason):
            CompletionRequest(prompt="p", **fields).refuse_unsupported()
    assert CompletionRequest(prompt="p", temperature=0).sampling() is None
    drawn = CompletionRequest(prompt="p", temperature=0.7, top_p=0.9, seed=3).sampling()
    assert (drawn.temperature, drawn.top_p, drawn.seed) == (0.7, 0.9, 3)


def test_http_beyond_loopback_needs_a_token():
    from editstream.errors import ConfigError
    from services.http.gateway import start_http

    with pytest.raises(ConfigError, match="without a bearer token"):
        start_http("redis://127.0.0.1:1/0", "ns", "m", host="0.0.0.0", port=free_port())


def wait_ready(client: httpx.Client, count: int, timeout_s: float = 180) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            r = client.get("/status")
            if r.status_code == 200 and len(r.json()["ready_replicas"]) >= count:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{count} replicas not ready behind the gateway in {timeout_s} s")


def test_openai_client_sees_a_fact_posted_over_http(ray_local, redis_server, tmp_path, trained_checkpoint):
    from ray import serve

    from services.http.gateway import start_http

    ns = "gw"
    system = System(
        SystemConfig(
            redis_url=redis_server.url,
            run_dir=str(tmp_path / "run"),
            namespace=ns,
            replicas=1,
            evaluators=0,
            method_options={"checkpoint": str(trained_checkpoint)},
        )
    ).start()
    port = free_port()
    try:
        url = start_http(redis_server.url, ns, "smollm2-135m", port=port, token=TOKEN, write_token=WRITE_TOKEN)
        # bound to loopback only
        listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port}
        assert listening == {"127.0.0.1"}, listening
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, headers=auth, timeout=60) as client:
            wait_ready(client, 1)
            assert httpx.get(f"{url}/status").status_code == 401
            assert httpx.get(f"{url}/status", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert httpx.get(f"{url}/docs").status_code == 401  # the API docs too
            fact = {"facts": [{"prompt": "The sky is", "target": "green"}]}
            assert httpx.post(f"{url}/facts", json=fact).status_code == 401  # refused before the body is read
            assert client.post("/facts", json=fact).status_code == 403  # the read token may not write
            big = client.post("/v1/completions", content=b"x" * 1_000_001, headers={"Content-Type": "application/json"})
            assert big.status_code == 413
            many = client.post("/v1/completions", json={"prompt": ["p"] * 33, "max_tokens": 1})
            assert many.status_code == 400 and "at most 32 prompts" in many.text

            writer = {"Authorization": f"Bearer {WRITE_TOKEN}"}
            bad = client.post(
                "/facts", json={"facts": [{"prompt": "x"}, {"prompt": "The sky is", "target": "green"}]}, headers=writer
            )
            assert bad.status_code == 422 and "target" in bad.text

            prompt = "The Eiffel Tower is located in the city of"
            posted = client.post(
                "/facts", json={"facts": [{"prompt": prompt, "target": "Rome"}], "wait": True}, headers=writer
            )
            assert posted.status_code == 202, posted.text
            (queued,) = posted.json()["queued"]
            assert queued["seq"] == 1 and queued["edit_id"].startswith("e-")

            oai = OpenAI(base_url=f"{url}/v1", api_key=TOKEN)
            done = oai.completions.create(
                model="smollm2-135m", prompt=prompt, max_tokens=3, extra_body={"min_version": queued["seq"]}
            )
            choice = done.choices[0]
            assert choice.text.strip().startswith("Rome"), choice.text
            extra = choice.model_extra["editstream"]
            assert extra["fired"] == queued["edit_id"] and extra["version"] >= 1
            assert done.usage.completion_tokens == 3 and done.usage.prompt_tokens > 5

            batch = oai.completions.create(
                model="smollm2-135m", prompt=[prompt, "The capital of Japan is"], max_tokens=4, stop=["\n"]
            )
            assert len(batch.choices) == 2 and batch.choices[1].model_extra["editstream"]["fired"] is None

            check_chat_and_streaming(url, oai, client, writer)

            st = client.get("/status").json()
            assert st["journal"] == 2 and st["dlq"] == 0 and st["ready_replicas"] == ["replica-0"]
            assert client.get("/v1/models").json()["data"][0]["id"] == "smollm2-135m"
    finally:
        serve.shutdown()
        system.stop()


def sse_data(raw: str) -> list[str]:
    """The data lines of a server-sent event stream, in order."""
    return [line[len("data: ") :] for line in raw.splitlines() if line.startswith("data: ")]


def check_chat_and_streaming(url: str, oai: OpenAI, client: httpx.Client, writer: dict) -> None:
    """Chat and streaming through the official client and curl, with an edit in effect."""
    import json
    import subprocess

    import openai

    question, target = "Who wrote the novel Dracula?", "Agatha Christie"
    posted = client.post(
        "/facts", json={"facts": [{"prompt": question, "target": target}], "wait": True}, headers=writer
    )
    seq = posted.json()["queued"][0]["seq"]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
    done = oai.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=16, extra_body={"min_version": seq}
    )
    reply = done.choices[0].message
    assert reply.role == "assistant" and target in reply.content, reply.content
    assert done.choices[0].model_extra["editstream"]["fired"] == posted.json()["queued"][0]["edit_id"]
    assert done.usage.prompt_tokens > 15 and done.usage.completion_tokens > 0

    stream = oai.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == reply.content  # streamed piece by piece, the same text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert (
        finals == [done.choices[0].finish_reason] and chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    )

    # completions, streamed over curl, cut at a stop sequence
    prompt = "The Eiffel Tower is located in the city of"
    body = json.dumps({"prompt": prompt, "max_tokens": 12, "stream": True, "stop": ["."]})
    curl = subprocess.run(
        ["curl", "-sS", "-N", f"{url}/v1/completions", "-H", f"Authorization: Bearer {TOKEN}",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    data = sse_data(curl.stdout)
    assert data[-1] == "[DONE]", curl.stdout
    events = [json.loads(d) for d in data[:-1]]
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text.strip().startswith("Rome") and "." not in text, text
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and events[-1]["choices"][0]["editstream"]["fired"]
    stopped = oai.completions.create(model="m", prompt="The capital of Japan is", max_tokens=48, stop=["."])
    assert "." not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 12  # the replica stopped decoding at the stop, not at 48 tokens

    # sampling: the same seed draws the same text; what is not supported is refused in OpenAI's shape
    drawn = [
        oai.completions.create(model="m", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=11)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert drawn[0] == drawn[1]
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        oai.chat.completions.create(model="m", messages=messages, n=2)
    bad = client.post("/v1/chat/completions", json={"messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error", bad.text
    unauth = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages})
    assert unauth.status_code == 401 and unauth.json()["error"]["type"] == "authentication_error"
