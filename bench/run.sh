#!/usr/bin/env bash
# The benchmark commands whose JSON output is committed under bench/results/ (each JSON also records
# its own command, commit, machine and date). Run from the repo root after `make test` or `make demo`
# created .venv. On 2 CPU cores the whole set takes about 45 minutes; run timing benchmarks on an
# otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
es=.venv/bin/editstream
what=${1:-all}

if [[ $what == all || $what == quality ]]; then
  for data in counterfact zsre; do
    # T = 1000 on the first 1000 edits after the seeded shuffle, for all three methods side by side;
    # T = 1, 10, 100 on the first 200 (each score is a full LLM pass per probe: ~3 s per 100 probes here)
    $es bench quality --method recipe,text-rag,none --data $data --T 1000 --limit 1000 --seed 0
    $es bench quality --method recipe --data $data --T 1,10,100 --limit 200 --seed 0 --out bench/results/small
  done
fi
if [[ $what == all || $what == cost ]]; then
  $es bench cost --stored 10000 --large 100000 --probes 20 --rounds 3
fi
if [[ $what == all || $what == pipeline ]]; then
  $es bench pipeline --method recipe --rate 50 --latency-facts 1000 --sustained 10000
fi
