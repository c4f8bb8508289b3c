"""`editstream bench gpu`: the GPU numbers (`editstream.bench.gpu`), also runnable as
`python -m services.cli.bench_gpu` where neither Ray nor Redis is installed (the GPU machine)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected counts separated by commas, e.g. 100000,1000000") from exc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true", help="a 64-dim model on the CPU, small counts: proves the run")
    p.add_argument("--shape", default=None, help="model shape: llama3-8b (default) or tiny")
    p.add_argument("--device", default=None, help="cuda (default), cuda:N or cpu")
    p.add_argument("--stored", type=_ints, default=None, help="RECIPE edits stored, comma-separated (100000,1000000)")
    p.add_argument("--scen-stored", type=int, default=None, help="SCEN experts stored (1000)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds after which parts are skipped (480)")
    p.add_argument("--assets", type=Path, default=None, help="tokenizers saved by --save-assets (default: embedded)")
    p.add_argument("--save-assets", type=Path, default=None, help="write both tokenizers to this directory and stop")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu/gpu.json"), help="JSON file to write")


def bench_gpu(args: argparse.Namespace) -> int:
    from editstream.bench.gpu import GpuBenchConfig, run, save_assets
    from editstream.bench.provenance import provenance

    if args.save_assets is not None:
        save_assets(args.save_assets)
        print(f"tokenizers written under {args.save_assets}")
        return 0
    config = GpuBenchConfig.smoke() if args.smoke else GpuBenchConfig()
    for name in ("shape", "device", "stored", "scen_stored", "budget_s"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    doc = {**run(config, args.assets), **provenance()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))
    failed = [k for k, v in {**doc, **doc.get("edit_costs", {})}.items() if isinstance(v, dict) and "error" in v]
    if failed:
        log.error("parts that failed (see their 'error' in %s): %s", args.out, ", ".join(failed))
        return 1
    return 0


def add_parser(bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser(
        "gpu",
        help="GPU numbers on a random model of Llama-3-8B's shape (latency with 100k/1M edits, edit and apply times)",
        description="Query latency unedited vs RECIPE (100k, 1M stored) and SCEN, edit compute and apply time "
        "per method, chat batch tokens/s, on a randomly initialised model of a real shape: nothing downloaded.",
    )
    add_arguments(p)
    p.set_defaults(func=bench_gpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.cli.bench_gpu", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return bench_gpu(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
