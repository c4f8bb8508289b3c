"""The HTTP gateway (Ray Serve): OpenAI completions, POST /facts, GET /status, bearer token, bind address."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest
from openai import OpenAI

from services.http.gateway import cut_at_stop, fields_of
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

            st = client.get("/status").json()
            assert st["journal"] == 1 and st["dlq"] == 0 and st["ready_replicas"] == ["replica-0"]
            assert client.get("/v1/models").json()["data"][0]["id"] == "smollm2-135m"
    finally:
        serve.shutdown()
        system.stop()
