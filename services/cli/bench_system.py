"""Benchmarks of the running system: `editstream bench pipeline|snapshot|soak|cluster|chaos|chat`.

Each starts what it measures (a private redis-server, Ray, the actors, the HTTP gateway) and
writes its JSON with the command, commit, machine and date.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from editstream.models import EMBEDDED_LLM
from services.cli.common import method_args, option_arg, parse_options

log = logging.getLogger("editstream")


def _bench_pipeline(args: argparse.Namespace) -> int:
    import ray

    from editstream.bench.provenance import provenance
    from services.bench import pipeline as bp
    from services.transport.redis_server import RedisServer
    from services.wiring.demo import method_options

    server = None
    url = args.redis_url
    if not url:  # a private server (AOF on, as deployed): no leftovers or snapshot policy of a shared one
        server = RedisServer().start()
        url = server.url
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    options = method_options(args.method, args.checkpoint, parse_options(args.option))
    common = (url, args.run_dir, args.method, args.model, options)
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
    doc.update({"method": args.method, "model": args.model, "options": options})  # replicas and editors: per run
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
    from services.transport.redis_server import RedisServer
    from services.wiring.cluster import LocalCluster, load_spec

    cluster, server = None, None
    address = args.address
    if not address:
        cluster = LocalCluster(load_spec(args.cluster)).start()
        os.environ.update(cluster.client_env)  # before Ray is imported: it reads its auth mode then
        address = cluster.address
    import ray

    from editstream.bench.provenance import provenance
    from services.bench import cluster as bc
    from services.wiring.demo import method_options
    from services.wiring.system import System, SystemConfig

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


def _bench_chaos(args: argparse.Namespace) -> int:
    import ray

    from editstream.bench.provenance import provenance
    from services.bench.chaos import run_chaos, write

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


def _bench_chat(args: argparse.Namespace) -> int:
    import ray

    from editstream.bench.provenance import provenance
    from services.bench.chat import run_chat_bench

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        run_dir = Path(args.run_dir) / f"{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        doc = {
            **run_chat_bench(args.method, args.data, args.n, args.max_tokens, run_dir, args.checkpoint),
            **provenance(),
        }
    finally:
        ray.shutdown()
    text = json.dumps(doc, indent=2)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"chat-{args.method}.json").write_text(text)
    print(text)
    return 0


def _bench_snapshot(args: argparse.Namespace) -> int:
    from editstream.bench.provenance import provenance
    from services.bench import snapshots

    if args.facts < 1 or args.tail < 0 or args.probes < 0:
        print(
            f"--facts {args.facts} / --tail {args.tail} / --probes {args.probes}: need facts >= 1, tail >= 0 "
            "and probes >= 0",
            file=sys.stderr,
        )
        return 2
    if args.method not in ("recipe", "text-rag", "scen"):
        print(f"--method {args.method}: compaction is for recipe, text-rag and scen", file=sys.stderr)
        return 2
    doc = {**snapshots.run(args.facts, args.tail, args.method, args.model, args.probes), **provenance()}
    text = json.dumps(doc, indent=2)
    if args.out:
        out = Path(args.out) / f"snapshot-{args.method}-n{args.facts}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        log.info("wrote %s", out)
    print(text)
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    import ray

    from editstream.bench.provenance import provenance
    from services.bench import soak
    from services.transport.redis_server import RedisServer

    if args.facts < 1 or args.rate < 0 or args.every <= 0 or args.snapshot_every < 1:
        print(
            f"--facts {args.facts} / --rate {args.rate} / --every {args.every} / --snapshot-every "
            f"{args.snapshot_every}: need facts >= 1, rate >= 0, every > 0, snapshot-every >= 1",
            file=sys.stderr,
        )
        return 2
    if args.method not in ("recipe", "text-rag", "scen"):
        print(f"--method {args.method}: the soak compacts, which is for recipe, text-rag and scen", file=sys.stderr)
        return 2
    options = soak.SoakOptions(
        facts=args.facts, rate=args.rate, method=args.method, model=args.model, replicas=args.replicas,
        every_s=args.every, snapshot_every=args.snapshot_every, seed=args.seed, options=parse_options(args.option),
    )  # fmt: skip
    run_dir = Path(args.run_dir)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with RedisServer(directory=run_dir / "redis") as server:
            doc = {**soak.run_soak(server.url, run_dir, options), **provenance()}
    finally:
        ray.shutdown()
    text = json.dumps(doc, indent=2)
    if args.out:
        out = Path(args.out) / f"soak-{args.method}-n{args.facts}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        soak.plot(run_dir / "run", out.with_suffix(".png"), f"soak: {args.facts:,} facts, {args.method}")
        log.info("wrote %s and its plot", out)
    print(text)
    return 0


def add_parsers(bench: argparse._SubParsersAction) -> None:
    """Register the running-system benchmarks under `editstream bench`."""
    pl = bench.add_parser("pipeline", help="edit latency at a rate, sustained ingest, query latency under load")
    method_args(pl)
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
    option_arg(pl)
    pl.add_argument("--run-dir", default="runs/bench-pipeline")
    pl.add_argument("--out", default="bench/results")
    pl.set_defaults(func=_bench_pipeline)

    sn = bench.add_parser(
        "snapshot",
        help="Redis bytes per live edit before and after compaction, snapshot size, restart time from a snapshot",
    )
    sn.add_argument("--method", default="recipe", help="recipe, text-rag or scen (default recipe)")
    sn.add_argument("--model", default=EMBEDDED_LLM, help="causal LM: embedded name, HF id or local path")
    sn.add_argument("--facts", type=int, default=10000, help="synthetic facts journaled before the snapshot")
    sn.add_argument("--tail", type=int, default=100, help="facts journaled after it, replayed by the restarted replica")
    sn.add_argument(
        "--probes",
        type=int,
        default=500,
        help="facts then sent one by one through ingest, editor and both replicas: XADD -> applied latency",
    )
    sn.add_argument("--out", default="bench/results", help="directory for the JSON ('' for none)")
    sn.set_defaults(func=_bench_snapshot)

    so = bench.add_parser(
        "soak",
        help="a long stream through the pipeline with snapshots and compaction on: Redis memory, replica RSS "
        "and stream lengths sampled into the run's Arrow log, latency per tenth, lost/digest checks",
    )
    so.add_argument("--method", default="recipe", help="recipe, text-rag or scen (default recipe)")
    so.add_argument("--model", default=EMBEDDED_LLM, help="causal LM: embedded name, HF id or local path")
    so.add_argument("--facts", type=int, default=100_000, help="synthetic facts (plus ~5%% supersedes, ~2%% retracts)")
    so.add_argument("--rate", type=float, default=150.0, help="events per second (0: as fast as possible)")
    so.add_argument("--replicas", type=int, default=2, help="model replicas (default 2)")
    so.add_argument("--every", type=float, default=10.0, help="seconds between samples (default 10)")
    so.add_argument("--snapshot-every", type=int, default=10_000, help="journal entries between snapshots")
    so.add_argument("--seed", type=int, default=0)
    option_arg(so)
    so.add_argument("--run-dir", default="runs/soak", help="the private Redis, snapshots and Arrow logs go here")
    so.add_argument("--out", default="bench/results", help="directory for soak-<method>-n<facts>.json and .png")
    so.set_defaults(func=_bench_soak)

    cl = bench.add_parser(
        "cluster", help="on a multi-node Ray cluster: query throughput vs replicas, edit throughput vs editors"
    )
    cl.add_argument("--cluster", default="cluster/local.yaml", help="local cluster file to start (see cluster/)")
    cl.add_argument("--address", default=None, help="an existing Ray cluster instead of starting --cluster")
    method_args(cl)
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

    ct = bench.add_parser(
        "chat",
        help="streamed chat over HTTP: time to the first token, unedited vs with each question's edit live",
    )
    ct.add_argument("--method", default="recipe", help="editing method (default recipe)")
    ct.add_argument("--checkpoint", default=None, help="RECIPE checkpoint dir (default: the packaged one)")
    ct.add_argument("--data", default="qaedit", help="edit records with question prompts (default qaedit)")
    ct.add_argument("--n", type=int, default=50, help="questions (default 50)")
    ct.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (default 32)")
    ct.add_argument("--run-dir", default="runs/bench-chat", help="where the private Redis and the Arrow logs go")
    ct.add_argument("--out", default="bench/results", help="directory for chat-<method>.json ('' for none)")
    ct.set_defaults(func=_bench_chat)
