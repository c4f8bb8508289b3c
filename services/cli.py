"""The `editstream` command line: train, bench, and the streaming system's commands.

Each subcommand's `--help` explains it. Library work (train, bench) imports neither Ray nor
Redis; the system commands import them when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from editstream.models import EMBEDDED_ENCODER, EMBEDDED_LLM

log = logging.getLogger("editstream")


def _train(args: argparse.Namespace) -> int:
    return _train_gate(args) if args.method == "relation-gate" else _train_recipe(args)


def _train_gate(args: argparse.Namespace) -> int:
    from editstream.data import load_edits
    from editstream.methods.recipe.relation import train_gate
    from editstream.models import load_encoder

    encoder = load_encoder(args.encoder, device=args.device)
    edits = [e for name in args.data for e in load_edits(name)]
    gate = train_gate(encoder, edits, steps=args.gate_steps, seed=args.seed)
    gate.info["data"] = list(args.data)
    gate.info["encoder"] = args.encoder
    gate.save(Path(args.out))
    print(json.dumps({"threshold": gate.threshold, **gate.info}, indent=2))
    return 0


def _train_recipe(args: argparse.Namespace) -> int:
    from editstream.config import config_from_dict
    from editstream.data import load_edits
    from editstream.methods.recipe.config import RecipeConfig, TrainConfig
    from editstream.methods.recipe.train import Trainer
    from editstream.models import load_causal_lm, load_encoder

    lm = load_causal_lm(args.model, device=args.device)
    encoder = load_encoder(args.encoder, device=args.device)
    edits = [e for name in args.data for e in load_edits(name)]
    config = config_from_dict(
        RecipeConfig,
        {
            "encoder": args.encoder,
            "generator_input": args.generator_input,
            "prompt_len": args.prompt_len,
            "target_mode": args.target_mode,
            "target_slots": args.target_slots,
            "end_slots": args.end_slots,
        },
    )
    schedule = config_from_dict(
        TrainConfig,
        {
            "retriever_steps": args.retriever_steps,
            "retriever_lr": args.retriever_lr,
            "generator_steps": args.steps,
            "generator_batch": args.batch,
            "generator_lr": args.lr,
            "locality_weight": args.locality_weight,
            "continuation_weight": args.continuation_weight,
            "continuation_tokens": args.continuation_tokens,
            "end_text": args.end_text,
            "subject_negatives": args.subject_negatives,
            "validate_every": args.validate_every,
            "seed": args.seed,
        },
    )
    init_from = Path(args.init_from) if args.init_from else None
    state = Trainer(lm, encoder, edits, Path(args.out), config, schedule, init_from).run()
    print(json.dumps(state["history"][-1] if state["history"] else {}, indent=2))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a method's networks (RECIPE) on the train splits")
    p.add_argument(
        "method",
        choices=["recipe", "relation-gate"],
        help="recipe: retriever and prompt generator; relation-gate: RECIPE's subject-blind second key "
        "(writes relation-gate.* into --out, beside a checkpoint)",
    )
    p.add_argument("--out", required=True, help="directory for checkpoints (resumes if it holds one)")
    p.add_argument(
        "--data",
        nargs="+",
        default=["counterfact-train", "zsre-train"],
        help="training files or aliases (never an edit.json split)",
    )
    p.add_argument("--model", default=EMBEDDED_LLM, help="causal LM: embedded name, HF id or local path")
    p.add_argument("--encoder", default=EMBEDDED_ENCODER, help="sentence encoder: embedded name, HF id or path")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if available)")
    p.add_argument(
        "--generator-input",
        default="prompt+target",
        choices=["prompt+target", "statement"],
        help="'statement': the paper's generator input; 'prompt+target': our variant",
    )
    p.add_argument("--prompt-len", type=int, default=3, help="generated prompt vectors per edit")
    p.add_argument(
        "--target-mode",
        default="appended",
        choices=["appended", "inside"],
        help="variant only: target tokens as extra slots (appended) or added onto generated slots",
    )
    p.add_argument("--target-slots", type=int, default=12, help="variant only: target tokens the prompt carries")
    p.add_argument("--steps", type=int, default=600, help="generator training steps")
    p.add_argument("--retriever-steps", type=int, default=3000, help="retriever training steps")
    p.add_argument("--batch", type=int, default=16, help="generator batch size (facts per step)")
    p.add_argument("--lr", type=float, default=1e-3, help="generator learning rate")
    p.add_argument("--locality-weight", type=float, default=0.0, help="weight of the locality KL term")
    p.add_argument(
        "--continuation-weight",
        type=float,
        default=1.0,
        help="weight of the KL, after the target, to the unedited model reading 'prompt target' (0: off)",
    )
    p.add_argument("--continuation-tokens", type=int, default=12, help="teacher continuation length (tokens)")
    p.add_argument("--end-slots", type=int, default=2, help="learned prefix slots after the target (0: none)")
    p.add_argument("--end-text", default=".\n", help="text whose token embeddings start the end slots")
    p.add_argument(
        "--subject-negatives",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="retriever negatives: the edit's subject in other relations' prompts, its prompt with other subjects",
    )
    p.add_argument("--retriever-lr", type=float, default=2e-3, help="retriever learning rate")
    p.add_argument(
        "--init-from",
        default=None,
        help="warm start from this checkpoint directory (weights whose shapes agree), e.g. the packaged one",
    )
    p.add_argument("--validate-every", type=int, default=100, help="steps between validations/exports")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gate-steps", type=int, default=3000, help="relation-gate: training steps")
    p.set_defaults(func=_train)


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
        if shared_encoder is not None and name in ("recipe", "text-rag"):
            options["encoder"] = shared_encoder
        method = create_method(name, lm, **options)
        method.edit_scope = args.edit_scope
        shared_encoder = getattr(getattr(method, "retrieval", None), "encoder", shared_encoder)
        replica = Replica(method)
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
            "relation_gate": getattr(getattr(method, "retrieval", None), "gate", None) is not None,
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
        return _write_cost(args, _scen_cost(args, lm, edits), "cost-scen.json")
    recipe = create_method("recipe", lm, checkpoint=args.checkpoint)
    encoder = recipe.retrieval.encoder
    rag = create_method("text-rag", lm, checkpoint=args.checkpoint, encoder=encoder)
    big = create_method("recipe", lm, checkpoint=args.checkpoint, encoder=encoder)
    throughput = cost.edit_throughput(recipe, edits[:512])
    artifacts = recipe.compute(edits[: args.stored])
    memory = cost.memory_per_edit(recipe, artifacts)
    rag_artifacts = rag.compute(edits[: args.stored])
    cost.fill(rag, rag_artifacts, args.stored)
    cost.fill(big, artifacts, args.large)
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
        "edit_throughput": throughput,
        "memory": memory,
        "query_latency": latency,
        "query_latency_probes": "paraphrases of stored edits (not stored prompts): the key search runs",
        "query_latency_exact_prompt": exact,
        **provenance(),
    }
    return _write_cost(args, doc, "cost-recipe.json")


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


def _write_cost(args: argparse.Namespace, doc: dict, name: str) -> int:
    text = json.dumps(doc, indent=2)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / name).write_text(text)
    print(text)
    return 0


def _bench_pipeline(args: argparse.Namespace) -> int:
    import ray

    from editstream.bench.provenance import provenance
    from services import bench_pipeline as bp
    from services.redis_server import RedisServer

    server = None
    url = args.redis_url
    if not url:  # a private server (AOF on, as deployed): no leftovers or snapshot policy of a shared one
        server = RedisServer().start()
        url = server.url
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    common = (url, args.run_dir, args.method, args.model, args.checkpoint)
    runs = {
        "latency": lambda: bp.latency_run(*common, args.latency_facts, args.rate),
        "sustained": lambda: bp.sustained_run(*common, args.sustained),
        "query": lambda: bp.query_run(*common, args.query_facts),
        "evaluator": lambda: bp.evaluator_run(*common, args.eval_edits),
        "editors": lambda: bp.editors_run(*common, args.editor_facts),
    }
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(runs))
    if unknown:
        raise SystemExit(f"--runs: unknown run(s) {unknown}; choose from {sorted(runs)}")
    out = Path(args.out) / f"pipeline-{args.method}.json" if args.out else None
    doc: dict = json.loads(out.read_text()) if out and out.is_file() else {}  # keep earlier runs' results
    doc.update({"method": args.method, "model": args.model})  # replicas and editors: per run
    try:
        for name in wanted:
            log.info("pipeline benchmark: %s run", name)
            doc[name] = {**runs[name](), **provenance()}  # each run records its own command, commit, date
            if out:  # written after every run, so a long benchmark cut short keeps what it measured
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(doc, indent=2))
    finally:
        ray.shutdown()
        if server:
            server.stop()
    print(json.dumps(doc, indent=2))
    return 0


def _bench_cluster(args: argparse.Namespace) -> int:
    from services.cluster import LocalCluster, load_spec
    from services.redis_server import RedisServer

    cluster, server = None, None
    address = args.address
    if not address:
        cluster = LocalCluster(load_spec(args.cluster)).start()
        os.environ.update(cluster.client_env)  # before Ray is imported: it reads its auth mode then
        address = cluster.address
    import ray

    from editstream.bench.provenance import provenance
    from services import bench_cluster as bc
    from services.demo import method_options
    from services.system import System, SystemConfig

    try:
        server = RedisServer().start()
        ray.init(address=address, namespace="bench-cluster", log_to_driver=False)
        config = SystemConfig(
            redis_url=server.url,
            run_dir=args.run_dir,
            method=args.method,
            model=args.model,
            namespace="bench-cluster",
            replicas=1,
            editors=1,
            evaluators=0,
            editor_threads=args.editor_threads,
            method_options=method_options(args.method, args.checkpoint),
        )
        system = System(config).start()
        doc: dict = {"method": args.method, "model": args.model, "ray_address": address}
        if cluster:
            doc["cluster"] = [vars(s) for s in cluster.specs]
        counts = [int(c) for c in args.replicas.split(",")]
        doc["queries"] = bc.query_throughput(system, system.store, counts, args.seconds, args.clients, args.edits)
        editors = [int(c) for c in args.editors.split(",")]
        doc["editors"] = {
            **bc.edit_throughput(system, system.store, editors, args.facts),
            "threads_per_editor": args.editor_threads,
        }
        doc.update(provenance())
        system.stop()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if server:
            server.stop()
        if cluster:
            cluster.stop()
    if args.out:
        out = Path(args.out) / f"cluster-{args.method}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2))
        log.info("wrote %s", out)
    print(json.dumps(doc, indent=2))
    return 0


def _bench_forgetting(args: argparse.Namespace) -> int:
    import ray

    from editstream.bench.provenance import provenance
    from editstream.data import load_edits
    from editstream.report import write_report
    from services import bench_study as st
    from services.redis_server import RedisServer

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run_root = Path(args.run_dir)
    facts = load_edits(args.data, seed=args.seed, limit=args.facts)
    timing = {}
    if not args.analyse_only:
        with RedisServer() as server:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                options = parse_options(args.option)
                timing = st.run_study(server.url, run_root, methods, facts, args.budget, args.timeout, options)
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


def parse_options(items: list[str]) -> dict:
    """KEY=VALUE method options; VALUE is read as JSON when it parses (numbers, true), else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {item!r}: expected KEY=VALUE, e.g. expert=full")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


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


def _method_args(p: argparse.ArgumentParser) -> None:
    """--method, --model, --checkpoint: the same three for every command that runs the system."""
    p.add_argument("--method", default="recipe", help="editing method (default recipe)")
    p.add_argument("--model", default=EMBEDDED_LLM, help="causal LM: embedded name, HF id or local path")
    p.add_argument("--checkpoint", default=None, help="RECIPE checkpoint dir (default: the packaged one)")


def _add_bench(sub: argparse._SubParsersAction) -> None:
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
    q.add_argument(
        "--edit-scope",
        choices=("answer", "text"),
        default="answer",
        help="how long a fired edit shapes a generation (RECIPE, SCEN, text-RAG): until the answer's first "
        "'.' or newline, after which the base model continues (answer, as served), or the whole text",
    )
    q.set_defaults(func=_bench_quality)
    c = bench.add_parser("cost", help="edit throughput vs the encoder, query latency with many edits, memory/edit")
    c.add_argument("--method", default="recipe", choices=("recipe", "scen"), help="which method's costs")
    c.add_argument("--real", type=int, default=50, help="scen: edits actually trained (the rest are copies)")
    c.add_argument("--stored", type=int, default=10000, help="edits stored for the main comparison")
    c.add_argument("--large", type=int, default=100000, help="edits stored for the scale point")
    c.add_argument("--probes", type=int, default=20, help="prompts timed per round")
    c.add_argument("--rounds", type=int, default=3, help="rounds over the probes")
    c.add_argument("--new-tokens", type=int, default=8, help="tokens generated per query")
    c.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    c.add_argument("--model", default=EMBEDDED_LLM)
    c.add_argument("--checkpoint", default=None, help="RECIPE checkpoint dir (default: the packaged one)")
    c.add_argument("--device", default=None)
    c.add_argument("--out", default="bench/results", help="directory for the JSON results ('' for none)")
    c.set_defaults(func=_bench_cost)
    pl = bench.add_parser("pipeline", help="edit latency at a rate, sustained ingest, query latency under load")
    _method_args(pl)
    pl.add_argument("--rate", type=float, default=50.0, help="facts/s for the latency run")
    pl.add_argument("--latency-facts", type=int, default=1000, help="facts in the latency run")
    pl.add_argument("--sustained", type=int, default=10000, help="facts in the sustained-ingest run")
    pl.add_argument("--query-facts", type=int, default=500, help="facts streamed during the query-latency run")
    pl.add_argument("--editor-facts", type=int, default=40, help="facts in the editor-scaling run")
    pl.add_argument("--eval-edits", type=int, default=200, help="edits applied before the evaluator-cost run")
    pl.add_argument(
        "--runs",
        default="latency,sustained,query,evaluator",
        help="which runs, comma-separated: latency, sustained, query, evaluator, editors "
        "(results merge into the existing JSON)",
    )
    pl.add_argument("--redis-url", default=None, help="an existing Redis (default: start a private redis-server)")
    pl.add_argument("--run-dir", default="runs/bench-pipeline")
    pl.add_argument("--out", default="bench/results")
    pl.set_defaults(func=_bench_pipeline)

    cl = bench.add_parser(
        "cluster", help="on a multi-node Ray cluster: query throughput vs replicas, edit throughput vs editors"
    )
    cl.add_argument("--cluster", default="cluster/local.yaml", help="local cluster file to start (see cluster/)")
    cl.add_argument("--address", default=None, help="an existing Ray cluster instead of starting --cluster")
    _method_args(cl)
    cl.add_argument("--replicas", default="1,2,4", help="replica counts for the query-throughput points")
    cl.add_argument("--editors", default="1,2", help="editor counts for the edit-throughput points")
    cl.add_argument("--seconds", type=float, default=30.0, help="query load per point")
    cl.add_argument("--clients", type=int, default=2, help="concurrent query clients per replica")
    cl.add_argument("--edits", type=int, default=100, help="edits stored before the query points")
    cl.add_argument("--facts", type=int, default=300, help="facts per edit-throughput point")
    cl.add_argument("--editor-threads", type=int, default=1, help="torch threads per editor (fixed across points)")
    cl.add_argument("--run-dir", default="runs/bench-cluster")
    cl.add_argument("--out", default="bench/results")
    cl.set_defaults(func=_bench_cluster)

    fg = bench.add_parser(
        "forgetting", help="the forgetting study: one CounterFact stream through several methods, measured live"
    )
    fg.add_argument("--methods", default="rome,memit,recipe", help="methods, comma-separated")
    fg.add_argument("--data", default="counterfact", help="edit split alias or file")
    fg.add_argument("--facts", type=int, default=1000, help="facts streamed (first N after the seeded shuffle)")
    fg.add_argument("--seed", type=int, default=0)
    fg.add_argument("--budget", type=float, default=0.2, help="evaluator time budget (share of its wall time)")
    fg.add_argument("--bin", type=int, default=50, help="edits per bin of the curves")
    fg.add_argument("--timeout", type=float, default=7200, help="seconds to wait for all methods")
    fg.add_argument("--run-dir", default="runs/forgetting", help="Arrow logs, one directory per method")
    fg.add_argument("--out", default="bench/results/forgetting", help="study.json, study.png and report PNGs")
    fg.add_argument("--analyse-only", action="store_true", help="re-analyse the logs in --run-dir, run nothing")
    fg.add_argument(
        "--option", action="append", default=[], help="KEY=VALUE for rome and memit (e.g. steps=10), repeatable"
    )
    fg.set_defaults(func=_bench_forgetting)

    ch = bench.add_parser(
        "chaos",
        help="the system under faults: mixed good/bad/duplicate/supersede/retract events, a SIGKILL of a random "
        "actor every few seconds, one Redis restart; checks nothing is lost or applied twice",
    )
    ch.add_argument("--method", default="recipe", help="editing method (scen runs two editors)")
    ch.add_argument("--minutes", type=float, default=10.0, help="how long the producer sends (default 10)")
    ch.add_argument("--rate", type=float, default=20.0, help="events per second (default 20)")
    ch.add_argument("--kill-every", type=float, default=10.0, help="seconds between SIGKILLs (default 10)")
    ch.add_argument("--checkpoint", default=None, help="RECIPE checkpoint dir (default: the packaged one)")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--run-dir", default="runs/chaos", help="where the private Redis and the Arrow logs go")
    ch.add_argument("--out", default="bench/results", help="directory for chaos-<method>.json")
    ch.set_defaults(func=_bench_chaos)


def _bench_chaos(args: argparse.Namespace) -> int:
    import ray

    from editstream.bench.provenance import provenance
    from services.bench_chaos import run_chaos, write

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    run_dir = Path(args.run_dir) / f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    doc = run_chaos(args.method, args.minutes, run_dir, args.rate, args.kill_every, args.checkpoint, args.seed)
    path = write({**doc, **provenance()}, Path(args.out))
    ok = doc["lost"] == 0 and not any(doc["applied_twice"].values()) and doc["converged"]
    ok = ok and not doc["bad_kinds_without_dlq"]
    print(json.dumps({k: doc[k] for k in ("sent", "journaled", "lost", "applied_twice", "converged")}, indent=1))
    print(f"{'PASS' if ok else 'FAIL'}: wrote {path}")
    return 0 if ok else 1


def _demo(args: argparse.Namespace) -> int:
    from services.demo import DemoOptions, print_summary, run_demo

    summary = run_demo(
        DemoOptions(
            facts=args.facts,
            replicas=args.replicas,
            rate=args.rate,
            run_dir=args.run_dir,
            method=args.method,
            model=args.model,
            redis_url=args.redis_url,
            checkpoint=args.checkpoint,
        )
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    return 0 if summary["lost"] == 0 and summary["converged"] else 1


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: stream demo facts into 2 replicas and show what changed",
        description="Starts Redis (if none is reachable), local Ray, 2 replicas, an editor and an "
        "evaluator; feeds the demo facts; prints before/after answers, throughput and latency.",
    )
    p.add_argument("--facts", type=int, default=200, help="how many demo facts to feed (default 200)")
    p.add_argument("--replicas", type=int, default=2, help="model replicas (default 2)")
    p.add_argument("--rate", type=float, default=50.0, help="facts per second to feed (0: as fast as possible)")
    p.add_argument("--run-dir", default=None, help="where logs go (default runs/demo-<time>)")
    _method_args(p)
    p.add_argument("--redis-url", default=None, help="Redis URL (default $REDIS_URL or redis://127.0.0.1:6379/0)")
    p.add_argument("--json", action="store_true", help="print one JSON summary to stdout")
    p.set_defaults(func=_demo)


def _system(args: argparse.Namespace) -> int:
    from services import commands
    from services.demo import DEFAULT_REDIS_URL
    from services.store import RedisStore, connect

    url = args.redis_url or os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    if args.command == "serve":
        from services.demo import method_options
        from services.placement import Resources
        from services.system import SystemConfig

        config = SystemConfig(
            redis_url=url,
            run_dir=args.run_dir,
            method=args.method,
            model=args.model,
            namespace=args.namespace,
            replicas=args.replicas,
            editors=args.editors,
            evaluators=args.evaluators,
            method_options=method_options(args.method, args.checkpoint),
            resources=Resources(args.replica_cpus, args.replica_gpus, args.editor_cpus, args.editor_gpus),
        )
        token = os.environ.get("EDITSTREAM_HTTP_TOKEN") or None
        write_token = os.environ.get("EDITSTREAM_HTTP_WRITE_TOKEN") or None
        http = commands.HttpOptions(args.http_host, args.http_port, token, write_token) if args.http else None
        return commands.serve(config, args.address, http)
    if args.command == "scale":
        counts = {"replica": args.replicas, "editor": args.editors, "evaluator": args.evaluators}
        counts = {k: v for k, v in counts.items() if v is not None}
        if not counts:
            print("give at least one of --replicas, --editors, --evaluators", file=sys.stderr)
            return 2
        return commands.scale(url, args.namespace, counts, args.wait)
    if args.command == "feed":
        return commands.feed_file(url, args.namespace, args.source, args.rate, args.limit)
    if args.command == "rollback":
        return commands.rollback(url, args.namespace, args.to_version, args.wait)
    if args.command == "retract":
        return commands.retract(url, args.namespace, args.edit_id)
    if args.command == "ask":
        return commands.ask(
            args.namespace, args.prompt, args.replica, args.min_version, args.max_new_tokens, args.address
        )
    s = commands.status(RedisStore(connect(url), args.namespace))
    print(json.dumps(s, indent=2) if args.json else commands.status_line(s))
    return 0


def _cluster_up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.cluster import LocalCluster, load_spec

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalCluster(load_spec(args.file)) as cluster:
        env = " ".join(f"{k}={v}" for k, v in cluster.client_env.items())
        print(f"Ray cluster up at {cluster.address}: " + ", ".join(s.name for s in cluster.specs))
        print(f"join it with:\n  {env} editstream serve --address {cluster.address}")
        print("Ctrl-C stops every node", flush=True)
        stop.wait()
    return 0


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="a local multi-node Ray cluster on this machine (development, tests)")
    up = p.add_subparsers(dest="cluster_command", required=True).add_parser(
        "up", help="start the nodes of a cluster file, print its address and token, stop them on Ctrl-C"
    )
    up.add_argument("file", nargs="?", default="cluster/local.yaml", help="cluster file (default cluster/local.yaml)")
    up.set_defaults(func=_cluster_up)


def _add_system(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--redis-url",
            default=None,
            help="Redis URL, redis:// or rediss:// (TLS), password "
            "allowed (default $REDIS_URL or redis://127.0.0.1:6379/0)",
        )
        p.add_argument("--namespace", default="editstream", help="key prefix in Redis and Ray (default editstream)")
        p.set_defaults(func=_system)

    p = sub.add_parser("serve", help="run the pipeline (local Ray, or a cluster via --address / RAY_ADDRESS)")
    common(p)
    p.add_argument("--replicas", type=int, default=2, help="model replicas (default 2)")
    _method_args(p)
    p.add_argument("--run-dir", default="runs/serve", help="where the Arrow logs go")
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or a local Ray)")
    p.add_argument("--editors", type=int, default=1, help="editor workers (default 1)")
    p.add_argument("--evaluators", type=int, default=1, help="evaluators (default 1; 0 for none)")
    p.add_argument("--replica-cpus", type=float, default=0.0, help="CPUs each replica reserves (default 0)")
    p.add_argument(
        "--replica-gpus", type=float, default=None, help="GPUs per replica (default: 1 if the cluster has GPUs, else 0)"
    )
    p.add_argument("--editor-cpus", type=float, default=0.0, help="CPUs each editor reserves (default 0)")
    p.add_argument("--editor-gpus", type=float, default=0.0, help="GPUs per editor (default 0)")
    p.add_argument(
        "--http",
        action="store_true",
        help="serve HTTP (Ray Serve): OpenAI /v1/completions, POST /facts, GET /status; "
        "bearer token from $EDITSTREAM_HTTP_TOKEN (required beyond 127.0.0.1), a separate one for POST /facts "
        "from $EDITSTREAM_HTTP_WRITE_TOKEN",
    )
    p.add_argument("--http-host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p = sub.add_parser("scale", help="change the number of replicas/editors/evaluators of a running `serve`")
    common(p)
    p.add_argument("--replicas", type=int, default=None, help="wanted replicas (new ones replay the journal first)")
    p.add_argument("--editors", type=int, default=None, help="wanted editor workers")
    p.add_argument("--evaluators", type=int, default=None, help="wanted evaluators")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the replicas to be ready (0: return)")
    p = sub.add_parser("feed", help="send facts from a file (JSON, JSONL, benchmark file) or '-' (stdin JSONL)")
    common(p)
    p.add_argument("source", help="file path, dataset alias (counterfact, zsre), or - for JSON lines on stdin")
    p.add_argument("--rate", type=float, default=50.0, help="facts per second (0: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="send only the first N")
    p = sub.add_parser("ask", help="ask a replica: the answer, the edit that fired, the replica's version")
    common(p)
    p.add_argument("prompt")
    p.add_argument("--replica", default="replica-0", help="which replica (default replica-0)")
    p.add_argument("--min-version", type=int, default=0, help="wait until the replica applied this seq")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS or auto)")
    p = sub.add_parser("rollback", help="remove every edit after version K on every replica (retracts, newest first)")
    common(p)
    p.add_argument("--to-version", type=int, required=True, help="the journal seq to return to (0: no edits)")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait until replicas applied it (0: return)")
    p = sub.add_parser("retract", help="queue the removal of an edit by its edit_id")
    common(p)
    p.add_argument("edit_id")
    p = sub.add_parser("status", help="journal length, ingest lag, DLQ size, edits/s, replica versions")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _monitor(args: argparse.Namespace) -> int:
    from editstream.monitoring import AlarmThresholds
    from services.monitor import monitor
    from services.redis_server import reachable
    from services.store import RedisStore, connect

    url = args.redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    store = RedisStore(connect(url), args.namespace) if args.namespace and reachable(url) else None
    thresholds = AlarmThresholds(retention=args.retention_alarm, locality=args.locality_alarm)
    return monitor(store, Path(args.run_dir), args.interval, args.once, thresholds)


def _report(args: argparse.Namespace) -> int:
    from editstream.report import write_report

    print(write_report(Path(args.run_dir), Path(args.out) if args.out else None))
    return 0


def _add_observe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="live dashboard: edits/s, lag, DLQ, versions, retention, locality, alarms")
    p.add_argument("run_dir", help="the run directory holding eval/ and edits/ Arrow logs")
    p.add_argument("--namespace", default=None, help="Redis key prefix of the running system (for live state)")
    p.add_argument("--redis-url", default=None)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print once and exit (status 1 if an alarm fires)")
    p.add_argument("--retention-alarm", type=float, default=0.7, help="alarm below this retention of old edits")
    p.add_argument("--locality-alarm", type=float, default=0.9, help="alarm below this locality")
    p.set_defaults(func=_monitor)
    p = sub.add_parser("report", help="PNG plots (forgetting, locality, throughput) and an HTML summary of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    p.set_defaults(func=_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="editstream",
        description="Streaming knowledge editing for LLMs: facts from Redis become live edits on Ray replicas.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_bench(sub)
    _add_demo(sub)
    _add_system(sub)
    _add_cluster(sub)
    _add_observe(sub)
    return parser


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures end in one line that names the cause and the fix (exit 2)."""
    import redis

    from editstream.errors import EditstreamError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    url = _redacted(getattr(args, "redis_url", None) or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        return int(args.func(args) or 0)
    except redis.AuthenticationError as exc:
        print(
            f"editstream: Redis at {url} refused the credentials ({exc}); fix the password in --redis-url "
            "or $REDIS_URL (redis://:PASSWORD@host:port/db)",
            file=sys.stderr,
        )
    except redis.ConnectionError as exc:
        print(
            f"editstream: cannot reach Redis at {url} ({exc}); start redis-server there or point --redis-url "
            "or $REDIS_URL at a running one",
            file=sys.stderr,
        )
    except redis.ResponseError as exc:
        if "NOAUTH" not in str(exc) and "WRONGPASS" not in str(exc):
            raise
        print(
            f"editstream: Redis at {url} needs a password ({exc}); give it in --redis-url or $REDIS_URL "
            "(redis://:PASSWORD@host:port/db)",
            file=sys.stderr,
        )
    except EditstreamError as exc:
        print(f"editstream: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
