#!/usr/bin/env bash
# The benchmark commands whose JSON output is committed under bench/results/ (each JSON also records
# its own command, commit, machine and date). Run from the repo root after `make test` or `make demo`
# created .venv. On 2 CPU cores the whole set takes about 4 hours (SCEN's T = 1000 runs are most of
# it); run timing benchmarks on an otherwise idle machine.
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
if [[ $what == all || $what == wild ]]; then
  # WILD (free generation, as a user reads it) beside teacher-forced, the shipped RECIPE checkpoint,
  # served as users get it (edit scope "answer", relation gate on). CounterFact T = 1000 takes about
  # 50 min here (every probe is a 50-token greedy generation); QAEdit T = 500 about 40 min. Then, on
  # the first 100 CounterFact edits, the served form and each mechanism switched off in turn: the
  # edit held for the whole text, and no relation gate (bench/results/wild/ablations/).
  $es bench quality --method recipe --data counterfact --T 1000 --limit 1000 --seed 0 --out bench/results/wild
  $es bench quality --method recipe --data qaedit --T 500 --limit 500 --seed 0 --out bench/results/wild
  $es bench quality --method recipe --data zsre --T 200 --limit 200 --seed 0 --out bench/results/wild
  abl=bench/results/wild/ablations
  $es bench quality --method recipe --data counterfact --T 100 --limit 100 --seed 0 --out $abl
  $es bench quality --method recipe --data counterfact --T 100 --limit 100 --seed 0 --out $abl \
    --edit-scope text --tag scope-text
  $es bench quality --method recipe --data counterfact --T 100 --limit 100 --seed 0 --out $abl \
    --option relation_gate=false --tag no-gate
  # SCEN served as users get it (answer scope, relation gate): about 2 hours for T = 1000 here
  $es bench quality --method scen --data counterfact --T 1000 --limit 1000 --seed 0 --out bench/results/wild
  if [[ ${WILD_FULL:-0} == 1 ]]; then
    $es bench quality --method recipe --data zsre --T 1000 --limit 1000 --seed 0 --out bench/results/wild
    for data in counterfact zsre qaedit; do
      $es bench quality --method text-rag,none --data $data --T 200 --limit 200 --seed 0 --out bench/results/wild
      $es bench quality --method recipe --checkpoint checkpoints/recipe-v1 --tag v1 --data $data --T 200 \
        --limit 200 --seed 0 --out bench/results/wild
    done
  fi
fi
if [[ $what == all || $what == snapshot ]]; then
  # Redis bytes per live edit before/after compaction, snapshot size, restart time from a snapshot
  $es bench snapshot --method recipe --facts 10000 --tail 500 --out bench/results/scale
fi
if [[ $what == all || $what == soak ]]; then
  # a long stream with snapshots and compaction on: memory, stream lengths, latency over the run
  $es bench soak --method recipe --facts ${SOAK_FACTS:-100000} --rate 150 --out bench/results/scale
fi
if [[ $what == all || $what == cost ]]; then
  $es bench cost --stored 10000 --large 100000 --probes 20 --rounds 3
fi
if [[ $what == all || $what == pipeline ]]; then
  $es bench pipeline --method recipe --rate 50 --latency-facts 1000 --sustained 10000
fi
if [[ $what == all || $what == scen ]]; then
  # SCEN trains an expert per fact (~2 s on 2 cores): T = 100 on the first 100 edits and T = 1000 on
  # the first 1000 of each set (~45 min each), the published form (a full FFN copy per expert,
  # neurons trained against every earlier fact) on the same 100 CounterFact facts, costs with 1,000
  # experts in the bank, and 1 vs 2 editor workers.
  for data in counterfact zsre; do
    $es bench quality --method scen --data $data --T 100 --limit 100 --seed 0 --out bench/results/scen
    $es bench quality --method scen --data $data --T 1000 --limit 1000 --seed 0 --out bench/results/scen
  done
  $es bench quality --method scen --data counterfact --T 100 --limit 100 --seed 0 --out bench/results/scen \
    --option expert=full --option max_negatives=0 --tag published
  $es bench cost --method scen --real 50 --stored 1000 --probes 20 --rounds 3
  $es bench pipeline --method scen --runs editors --editor-facts 40
fi
