"""`editstream bench chat`: streamed chat over HTTP, as an OpenAI client sees it, with edits live.

A private redis-server, the pipeline (one replica of the given method) and the HTTP gateway run on
this machine. The same questions (edit records of a data set: real questions) are asked twice as
streamed chat completions (`stream: true`, greedy): first with no edit stored (the unedited model,
served the same way), then after their facts were posted and applied. Each record is asked in two
forms: its stored question, which the exact-prompt fast path serves without a search, and its first
paraphrase, which must be found by the retriever (and pass the relation gate); the two are reported
apart, and the paraphrase is the number that measures the mechanism. Per request it times the first
streamed token (the first non-empty content piece) and the whole reply, and it checks whether the
question's own edit fired and the reply holds the edit's answer (as whole words). Requests go one
at a time, after warm-up requests; the unedited pass must end before the facts go in, so the two
passes run one after the other (keep the machine otherwise idle).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from editstream import wild
from editstream.data import load_edits
from editstream.edits import EditRequest
from services.transport.redis_server import RedisServer, free_port
from services.wiring.demo import method_options
from services.wiring.system import System, SystemConfig

log = logging.getLogger(__name__)


def stream_chat(client: httpx.Client, question: str, max_tokens: int, min_version: int = 0) -> dict[str, Any]:
    """One streamed chat request: seconds to the first content piece and to the end, the reply, and
    the edit that fired (from the last chunk's `editstream` field)."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "stream": True}
    body["min_version"] = min_version
    started = time.perf_counter()
    first, text, fired = None, "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            (choice,) = json.loads(line[len("data: ") :])["choices"] or [{}]
            piece = choice.get("delta", {}).get("content")
            if piece and first is None:
                first = time.perf_counter() - started
            text += piece or ""
            fired = choice.get("editstream", {}).get("fired", fired)
    return {"ttft_s": first, "total_s": time.perf_counter() - started, "text": text, "fired": fired}


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(1000 * statistics.median(ordered), 1),
        "p90_ms": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 1),
        "mean_ms": round(1000 * statistics.fmean(ordered), 1),
    }


def _pass(client: httpx.Client, questions: list[str], tokens: int, min_version: int, what: str) -> list[dict]:
    return [stream_chat(client, q, tokens, min_version) for q in tqdm(questions, desc=what, unit="request")]


def _form(edits: list[EditRequest], before: list[dict], edited: list[dict], after: list[dict]) -> dict[str, Any]:
    """First-token and whole-reply times of one form of the questions, unedited vs edited, and how
    often the question's own edit fired and the reply held its answer. The unedited model is timed
    before the edits and again after they are retracted (A-B-A), and both passes count as unedited,
    so a drift of the machine over the run does not land on one side of the ratio."""
    unedited = before + after
    ttft = {"unedited": [r["ttft_s"] for r in unedited], "edited": [r["ttft_s"] for r in edited]}
    if any(t is None for runs in ttft.values() for t in runs):
        raise RuntimeError("a streamed reply had no content piece: cannot time its first token")
    fired = [r["fired"] == f"chat-{i}" for i, r in enumerate(edited)]
    holds = [wild.contains(wild.cut(r["text"], e.target), e.target) for e, r in zip(edits, edited, strict=True)]
    runs = {"unedited": unedited, "edited": edited}
    return {
        "ttft": {k: _summary(v) for k, v in ttft.items()},
        "ttft_unedited_before_after_median_ms": [
            _summary([r["ttft_s"] for r in p])["median_ms"] for p in (before, after)
        ],
        "total": {k: _summary([r["total_s"] for r in v]) for k, v in runs.items()},
        "ttft_ratio_median": round(statistics.median(ttft["edited"]) / statistics.median(ttft["unedited"]), 3),
        "edit_fired": round(sum(fired) / len(edits), 3),
        "reply_holds_target": round(sum(holds) / len(edits), 3),
        "fired_after_retract": round(sum(r["fired"] is not None for r in after) / len(edits), 3),
    }


def _journal(client: httpx.Client, facts: list[dict]) -> int:
    """Send facts (edits or retracts) through the gateway; the last journal seq they took."""
    queued = client.post("/facts", json={"facts": facts, "wait": True}).json()["queued"]
    return max(q["seq"] for q in queued)


def run_chat_bench(
    method: str, data: str, n: int, tokens: int, run_dir: Path, checkpoint: str | None = None, warmup: int = 3
) -> dict[str, Any]:
    """Time the first streamed token of `n` questions from `data` (stored and paraphrased), unedited
    and with their edits."""
    edits = [e for e in load_edits(data, limit=n * 2) if e.is_question and e.paraphrases][:n]
    if len(edits) < n:
        raise ValueError(
            f"{data!r} has {len(edits)} question prompts with a paraphrase among its first {n * 2} records; need {n}"
        )
    forms = {"stored": [e.prompt for e in edits], "paraphrase": [e.paraphrases[0] for e in edits]}
    from services.http.gateway import start_http  # Ray Serve: imported only when serving

    with RedisServer(directory=run_dir / "redis") as server:
        namespace = f"chat-{uuid.uuid4().hex[:8]}"
        config = SystemConfig(
            redis_url=server.url,
            run_dir=str(run_dir),
            method=method,
            namespace=namespace,
            replicas=1,
            evaluators=0,
            method_options=method_options(method, checkpoint),
        )
        system = System(config).start()
        try:
            url = start_http(server.url, namespace, config.model, port=free_port())
            with httpx.Client(base_url=url, timeout=120) as client:
                while not client.get("/status").json()["ready_replicas"]:
                    time.sleep(0.5)
                for e in edits[:warmup]:
                    stream_chat(client, e.prompt, tokens)
                before = {form: _pass(client, qs, tokens, 0, f"unedited, {form}") for form, qs in forms.items()}
                facts = [{"prompt": e.prompt, "target": e.target, "edit_id": f"chat-{i}"} for i, e in enumerate(edits)]
                last = _journal(client, facts)
                stream_chat(client, edits[0].prompt, 1, last)  # waits until the replica applied them all
                edited = {form: _pass(client, qs, tokens, last, f"edited, {form}") for form, qs in forms.items()}
                retracts = [{"op": "retract", "retracts": f["edit_id"], "edit_id": f"un-{f['edit_id']}"} for f in facts]
                last = _journal(client, retracts)
                stream_chat(client, edits[0].prompt, 1, last)
                after = {form: _pass(client, qs, tokens, last, f"unedited again, {form}") for form, qs in forms.items()}
        finally:
            from ray import serve

            serve.shutdown()
            system.stop()
    doc = {
        "method": method,
        "model": config.model,
        "data": data,
        "n": n,
        "max_tokens": tokens,
        **{form: _form(edits, before[form], edited[form], after[form]) for form in forms},
        "examples": [
            {"question": q, "target": e.target, "unedited": u["text"], "edited": r["text"]}
            for e, q, u, r in list(
                zip(edits, forms["paraphrase"], before["paraphrase"], edited["paraphrase"], strict=True)
            )[:5]
        ],
    }
    log.info("chat bench: %s", {form: doc[form] for form in forms})
    return doc
