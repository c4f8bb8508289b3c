"""Benchmark commands: `editstream bench quality|cost|forgetting`, and (from `bench_system`) the
benchmarks of the running system: `pipeline|cluster|chaos|chat`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from editstream.models import EMBEDDED_LLM
from editstream.retrieval import DEFAULT_ANN_THRESHOLD
from services.cli import bench_gpu, bench_system
from services.cli.common import edit_scope_arg, parse_options

log = logging.getLogger("editstream")


def _bench_quality(args: argparse.Namespace) -> int:
    from editstream.bench.provenance import provenance
    from editstream.bench.quality import run_quality
    from editstream.bench.wild_scores import unedited_wild
    from editstream.data import load_edits
    from editstream.methods import create_method
    from editstream.models import load_causal_lm
    from editstream.replica import Replica

    chunk_sizes = [int(t) for t in args.T.split(",")]
    edits = load_edits(args.data, limit=args.limit, seed=args.seed)
    lm = load_causal_lm(args.model, device=args.device)
    docs = []
    shared_encoder, wild_base = None, None
    started = provenance()  # the commit and date the run started at, not when its file is written
    for name in args.method.split(","):
        options = {"checkpoint": args.checkpoint} if name in ("recipe", "text-rag") else {}
        options.update(parse_options(args.option))
        if shared_encoder is not None and name in ("recipe", "text-rag", "scen"):
            options["encoder"] = shared_encoder
        method = create_method(name, lm, **options)
        shared_encoder = getattr(getattr(method, "retrieval", method), "encoder", None) or shared_encoder
        replica = Replica(method)
        replica.set_edit_scope(args.edit_scope)
        if args.wild_tokens and wild_base is None:
            wild_base = unedited_wild(replica, edits, args.wild_tokens)  # shared by every method of the run
        result = run_quality(replica, edits, chunk_sizes, args.wild_tokens, args.chat, wild_base=wild_base)
        doc = {
            "method": name,
            "model": lm.name,
            "data": args.data,
            "seed": args.seed,
            "limit": args.limit,
            "checkpoint": args.checkpoint,
            "options": parse_options(args.option),
            "tag": args.tag,
            "edit_scope": args.edit_scope if method.plan_only else "weights",
            "relation_gate": getattr(getattr(method, "retrieval", method), "gate", None) is not None,
            **result,
            **started,
            "finished": provenance()["date"],
        }
        docs.append(doc)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            stem = Path(args.data).stem if args.data.endswith(".json") else args.data
            tag = f"-{args.tag}" if args.tag else ""
            path = out / f"quality-{stem}-{name}{tag}-n{len(edits)}.json"
            path.write_text(json.dumps(doc, indent=2))
            log.info("wrote %s", path)
    if args.json:
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        print(quality_table(docs))
    return 0


def _bench_cost(args: argparse.Namespace) -> int:
    import gc

    import torch

    from editstream.bench import cost
    from editstream.bench.provenance import provenance
    from editstream.data import load_edits
    from editstream.methods import create_method
    from editstream.models import load_causal_lm
    from editstream.replica import Replica

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_causal_lm(args.model, device=args.device)
    edits = [e for name in ("counterfact-train", "zsre-train", "counterfact", "zsre") for e in load_edits(name)]
    edits = list({e.prompt: e for e in edits}.values())
    if args.method == "scen":
        return _write_doc(args, _scen_cost(args, lm, edits), "cost-scen.json")
    recipe = create_method("recipe", lm, checkpoint=args.checkpoint)
    encoder = recipe.retrieval.encoder
    rag = create_method("text-rag", lm, checkpoint=args.checkpoint, encoder=encoder)
    big = create_method("recipe", lm, checkpoint=args.checkpoint, encoder=encoder, ann_threshold=args.ann_threshold)
    throughput = cost.edit_throughput(recipe, edits[:512])
    artifacts = recipe.compute(edits[: args.stored])
    memory = cost.memory_per_edit(recipe, artifacts)
    rag_artifacts = rag.compute(edits[: args.stored])
    cost.fill(rag, rag_artifacts, args.stored)
    gc.collect()
    before = cost.rss_bytes()
    cost.fill(big, artifacts, args.large)
    if hasattr(big.retrieval.index, "wait"):  # timed as served once its IVF lists are in (trained on a thread)
        big.retrieval.index.wait()
    gc.collect()
    memory_large = {
        "n": args.large,
        "rss_bytes_per_edit": round((cost.rss_bytes() - before) / args.large, 1),
        "how": "RSS growth of this process while the large setup's edits were applied (real artifacts, then "
        "copies with random keys); the method's state only, not a replica actor's",
        "index": type(getattr(big.retrieval.index, "inner", big.retrieval.index)).__name__,
    }
    setups = {
        "unedited": Replica(create_method("none", lm)),
        f"recipe@{args.stored}": Replica(recipe),
        f"text-rag@{args.stored}": Replica(rag),
        f"recipe@{args.large}": Replica(big),
    }
    # the timed path: paraphrases of stored edits, which are not stored prompts, so every query
    # searches the index; beside it the exact-prompt fast path (the stored prompts themselves)
    searched = [e.paraphrases[0] for e in edits[: args.stored] if e.paraphrases][: args.probes]
    latency = cost.query_latency(setups, searched, args.new_tokens, args.rounds)
    exact = cost.query_latency(setups, [e.prompt for e in edits[: args.probes]], args.new_tokens, args.rounds)
    for table in (latency, exact):
        base = table["unedited"]["median_ms"]
        for row in table.values():
            row["vs_unedited"] = round(row["median_ms"] / base, 3)
    doc = {
        "model": lm.name,
        "checkpoint": args.checkpoint,
        "new_tokens": args.new_tokens,
        "encoder_runtime": encoder.runtime,
        "ann_threshold": args.ann_threshold,
        "edit_throughput": throughput,
        "memory": memory,
        "memory_large": memory_large,
        "query_latency": latency,
        "query_latency_probes": "paraphrases of stored edits (not stored prompts): the key search runs",
        "query_latency_exact_prompt": exact,
        **provenance(),
    }
    return _write_doc(args, doc, "cost-recipe.json")


def _scen_cost(args: argparse.Namespace, lm, edits: list) -> dict:
    from editstream.bench import cost
    from editstream.bench.provenance import provenance
    from editstream.methods import create_method
    from editstream.replica import Replica

    scen = create_method("scen", lm)
    real = [e for e in edits if e.subject][: args.real]
    artifacts, seconds = cost.edit_seconds(scen, real)
    memory = cost.memory_per_edit(scen, artifacts)
    cost.fill(scen, artifacts, args.stored, key="neuron_w")
    replicas = {"unedited": Replica(create_method("none", lm)), f"scen@{args.stored}": Replica(scen)}
    latency = cost.query_latency(replicas, [e.prompt for e in real[: args.probes]], args.new_tokens, args.rounds)
    base = latency["unedited"]["median_ms"]
    for row in latency.values():
        row["vs_unedited"] = round(row["median_ms"] / base, 3)
    return {
        "method": "scen",
        "model": lm.name,
        "new_tokens": args.new_tokens,
        "real_edits": len(real),
        "edit_seconds": seconds,
        "memory": memory,
        "query_latency": latency,
        **provenance(),
    }


def _bench_recall(args: argparse.Namespace) -> int:
    from editstream.bench.provenance import provenance
    from editstream.bench.recall import run_recall
    from editstream.data import load_edits
    from editstream.methods.recipe.method import load_retrieval
    from editstream.models import load_causal_lm

    started = provenance()
    limit = args.limit or None
    edit_sets = {name: load_edits(name, limit=limit) for name in args.sets.split(",") if name}
    distractors = [e for name in args.distractors.split(",") if name for e in load_edits(name, limit=limit)]
    lm = load_causal_lm(args.model, device="cpu")
    retrieval = load_retrieval(lm, args.checkpoint, None, encoder_int8=args.encoder_int8)
    sweep = [int(x) for x in args.sweep.split(",") if x]
    result = run_recall(
        retrieval, edit_sets, distractors, args.threshold, args.nprobe, args.remove, args.seed, sweep_nprobes=sweep
    )
    doc = {
        "sets": args.sets,
        "distractor_sets": args.distractors,
        "encoder": retrieval.encoder.name,
        "relation_gate": retrieval.gate is not None,
        "seed": args.seed,
        **result,
        **started,
        "finished": provenance()["date"],
    }
    return _write_doc(args, doc, f"recall-ann-t{args.threshold}-p{args.nprobe}.json")


def _write_doc(args: argparse.Namespace, doc: dict, name: str) -> int:
    text = json.dumps(doc, indent=2)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / name).write_text(text)
    print(text)
    return 0


def _bench_forgetting(args: argparse.Namespace) -> int:
    import ray

    from editstream.bench.provenance import provenance
    from editstream.data import load_edits
    from editstream.report import write_report
    from services.bench import study as st
    from services.transport.redis_server import RedisServer

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run_root = Path(args.run_dir)
    facts = load_edits(args.data, seed=args.seed, limit=args.facts)
    timing = {}
    if not args.analyse_only:
        with RedisServer() as server:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                options = parse_options(args.option)
                timing = st.run_study(
                    server.url, run_root, methods, facts, args.budget, args.timeout, options, args.chunk, args.rounds
                )
            finally:
                ray.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for m in methods:
        results[m] = {
            **st.analyse(st.load_eval(run_root / m), len(facts), args.bin),
            **st.applied_span(run_root / m),
            **({"timed_out": True} if timing.get(m, {}).get("timed_out") else {}),
        }
        report = write_report(run_root / m)
        for png in report.parent.glob("*.png"):
            (out / f"{m}-{png.name}").write_bytes(png.read_bytes())
    title = f"{len(facts)} CounterFact edits streamed through {', '.join(methods)} (SmolLM2-135M)"
    st.plot(results, out / "study.png", title)
    doc = {
        "facts": len(facts),
        "data": args.data,
        "seed": args.seed,
        "weight_method_options": parse_options(args.option),
        "methods": results,
        **provenance(),
    }
    (out / "study.json").write_text(json.dumps(doc, indent=2))
    for m, r in results.items():
        print(
            f"{m:>8}: retention of old edits below 0.8 from {r['gradual_phase_from_edits']} edits; "
            f"collapse from {r['collapse_from_edits']}; alarm by {r['alarm_first_fired_by_edits']}"
        )
    return 0


def quality_table(docs: list[dict]) -> str:
    """The benchmark rows of several methods as one aligned text table: WILD first (answer-first,
    exact in brackets), teacher-forced beside."""
    cols = (
        ("wild rel", "wild_reliability"),
        ("(exact)", "wild_exact_reliability"),
        ("wild gen", "wild_generality"),
        ("(exact)", "wild_exact_generality"),
        ("retrieved", "reliability_retrieved"),
        ("wild loc", "wild_locality"),
        ("subj loc", "subject_locality"),
        ("echo", "echo"),
        ("fluency", "fluency"),
        ("tf rel", "reliability"),
        ("tf gen", "generality"),
        ("tf loc", "locality"),
    )
    head = f"{'method':<10} {'T':>5} {'n':>5} " + " ".join(f"{name:>9}" for name, _ in cols)
    lines = [head, "-" * len(head)]
    for doc in docs:
        for row in doc["rows"]:
            values = " ".join(f"{row[key]:>9.3f}" if row.get(key) is not None else f"{'-':>9}" for _, key in cols)
            lines.append(f"{doc['method']:<10} {row['T']:>5} {row['n']:>5} {values}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (quality: the lifelong-editing protocol)")
    bench = p.add_subparsers(dest="bench", required=True)
    q = bench.add_parser("quality", help="lifelong editing: chunks of T sequential edits, all scored after the last")
    q.add_argument("--method", default="recipe", help="method name, or several separated by commas")
    q.add_argument("--data", default="counterfact", help="edit split alias (counterfact, zsre) or a file path")
    q.add_argument("--T", default="1,10,100,1000", help="chunk sizes, comma-separated")
    q.add_argument("--limit", type=int, default=None, help="use the first N edits after the seeded shuffle")
    q.add_argument("--seed", type=int, default=0, help="shuffle seed")
    q.add_argument("--model", default=EMBEDDED_LLM, help="causal LM: embedded name, HF id or local path")
    q.add_argument("--checkpoint", default=None, help="RECIPE checkpoint dir (default: the packaged one)")
    q.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if available)")
    q.add_argument("--out", default="bench/results", help="directory for the JSON results ('' for none)")
    q.add_argument("--json", action="store_true", help="print one JSON document to stdout instead of a table")
    q.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. expert=full (repeatable)",
    )
    q.add_argument("--tag", default="", help="suffix for the result file name, e.g. 'published'")
    q.add_argument(
        "--wild-tokens",
        type=int,
        default=50,
        help="new tokens of the WILD greedy generations (cut at the first '.', newline or end); 0: teacher-forced only",
    )
    q.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also score the chat form (question as the user turn); default: when the prompts are questions",
    )
    edit_scope_arg(q)
    q.set_defaults(func=_bench_quality)
    c = bench.add_parser("cost", help="edit throughput vs the encoder, query latency with many edits, memory/edit")
    c.add_argument("--method", default="recipe", choices=("recipe", "scen"), help="which method's costs")
    c.add_argument("--real", type=int, default=50, help="scen: edits actually trained (the rest are copies)")
    c.add_argument("--stored", type=int, default=10000, help="edits stored for the main comparison")
    c.add_argument("--large", type=int, default=100000, help="edits stored for the scale point")
    c.add_argument(
        "--ann-threshold",
        type=int,
        default=DEFAULT_ANN_THRESHOLD,
        help="the scale point's key index turns IVF at this count, as served (0: flat)",
    )
    c.add_argument("--probes", type=int, default=20, help="prompts timed per round")
    c.add_argument("--rounds", type=int, default=3, help="rounds over the probes")
    c.add_argument("--new-tokens", type=int, default=8, help="tokens generated per query")
    c.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    c.add_argument("--model", default=EMBEDDED_LLM)
    c.add_argument("--checkpoint", default=None, help="RECIPE checkpoint dir (default: the packaged one)")
    c.add_argument("--device", default=None)
    c.add_argument("--out", default="bench/results", help="directory for the JSON results ('' for none)")
    c.set_defaults(func=_bench_cost)
    r = bench.add_parser(
        "recall",
        help="own-edit recall of the IVF key index (ann_threshold) against exact search, on benchmark data",
        description="Stores RECIPE keys of every edit of --sets plus --distractors (train splits) in a flat "
        "index and in the index a replica uses with ann_threshold, in one stream order; asks each edit's prompt "
        "and paraphrases through the served retrieval (sentinel, relation gate; never the exact-prompt lookup); "
        "removes a share of the distractors and asks again. Prints and writes JSON.",
    )
    r.add_argument("--sets", default="counterfact,zsre,qaedit", help="edit sets whose prompts are asked")
    r.add_argument("--distractors", default="counterfact-train,zsre-train", help="sets stored but never asked")
    r.add_argument("--limit", type=int, default=0, help="first N records of each set (0: all)")
    r.add_argument("--threshold", type=int, default=1000, help="keys held before the index turns IVF")
    r.add_argument("--nprobe", type=int, default=64, help="IVF lists scanned per query (the replicas' default: 64)")
    r.add_argument(
        "--sweep", default="1,4,8,16,32,64,128", help="nprobe values whose best-key agreement with flat is reported"
    )
    r.add_argument("--remove", type=float, default=0.2, help="share of distractors removed for the second pass")
    r.add_argument("--encoder-int8", action="store_true", help="keys and queries from the int8 sentence encoder")
    r.add_argument("--seed", type=int, default=0, help="stream order and removal sample")
    r.add_argument("--model", default=EMBEDDED_LLM)
    r.add_argument("--checkpoint", default=None, help="RECIPE checkpoint dir (default: the packaged one)")
    r.add_argument("--out", default="bench/results/scale", help="directory for the JSON ('' for none)")
    r.set_defaults(func=_bench_recall)
    bench_system.add_parsers(bench)
    bench_gpu.add_parser(bench)

    fg = bench.add_parser(
        "forgetting", help="the forgetting study: one CounterFact stream through several methods, measured live"
    )
    fg.add_argument("--methods", default="rome,memit,recipe", help="methods, comma-separated")
    fg.add_argument("--data", default="counterfact", help="edit split alias or file")
    fg.add_argument("--facts", type=int, default=1000, help="facts streamed (first N after the seeded shuffle)")
    fg.add_argument("--seed", type=int, default=0)
    fg.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="evaluator time budget (share of its wall time); the chunked feed already paces it, so 1.0",
    )
    fg.add_argument("--chunk", type=int, default=10, help="facts fed at a time; the feeder then waits for --rounds")
    fg.add_argument("--rounds", type=int, default=1, help="evaluator rounds after each chunk, on its state")
    fg.add_argument("--bin", type=int, default=50, help="edits per bin of the curves")
    fg.add_argument("--timeout", type=float, default=7200, help="seconds to wait for all methods")
    fg.add_argument("--run-dir", default="runs/forgetting", help="Arrow logs, one directory per method")
    fg.add_argument("--out", default="bench/results/forgetting", help="study.json, study.png and report PNGs")
    fg.add_argument("--analyse-only", action="store_true", help="re-analyse the logs in --run-dir, run nothing")
    fg.add_argument(
        "--option", action="append", default=[], help="KEY=VALUE for rome and memit (e.g. steps=10), repeatable"
    )
    fg.set_defaults(func=_bench_forgetting)
