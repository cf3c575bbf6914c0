#!/usr/bin/env bash
# The tabletop benchmark campaigns behind benchmarks/results/. Every stage is resumable: rerun the
# script and finished runs are skipped. Hours on 2 CPU cores; run it alone (two torch jobs of 2 threads
# each at once slow each other several-fold; SHARDS=2 below runs two of 1 thread each, by design):
#   OMP_NUM_THREADS=2 nohup bash benchmarks/run_tabletop.sh > bench.log 2>&1 &
#   SHARDS=2 nohup bash benchmarks/run_tabletop.sh > bench.log 2>&1 &     # the v2 stages as 2 local shards
# Pick stages with STAGES="tune t6-v2" etc.; MODEL=path runs on another base model than the bundled one.
# Sessions whose work dirs are lost: CARRY=benchmarks/carried restores the runs committed there before the
# stages and saves every finished run there after each stage, and a snapshot of each unfinished one (its
# progress and state: a long run resumes where it was; benchmarks/carry.py --partial; commit the folder; keep
# SHARDS the same across sessions, a shard's runs live in its own folder). The tuning grids and token rounds
# complete in the committed benchmarks/results/tuning/tuning.json are not rerun.
#
# v2 (benchmark v2: tuning on val views only, tables on test views, 5 seeds, bounds), in order:
#   tune     every method's equal grid (3 learning rates x 3 values of its own knob) on tabletop-6 val,
#            2 seeds (benchmarks/tuning.py; its table goes to benchmarks/results/tuning/)
#   t6-v2    tabletop-6 test, LoRA, all methods + single-task + joint, 5 seeds
#   t6-vera-v2, t6b-v2, t10-v2, t50-v2   VeRA (3 seeds), tabletop-6b (independent; never tuned on;
#            3 seeds), tabletop-10 (3 seeds), tabletop-50 (c-lora, ewc-dc; 2 seeds), each with the
#            single-task and joint bounds
#   t50-elim the final DC evaluation of a t50-v2 state, full and by successive elimination, side by side
#            (the schedule chosen on val views, by simulation from one full pass's per-draw errors, then timed
#            and reported on test)
#   vera-lr-val  VeRA's shared learning rate on val (its v1 default 1e-2 was chosen on v1's report views):
#            lora and ewc-dc on VeRA at 3e-3 / 1e-2 / 3e-2, tabletop-6 val, 2 seeds; the rate with the lowest
#            mean val A_MMD over both methods and seeds becomes VeRA's default. Run it before t6-vera-v2.
#   ewc-lambda-val  does EWC let the shared adapter move at all? (the grids' lambda 10-1000 all tie, and the DSC
#            pools of t6-v2 show the adapter frozen after task 1-2): lora-ewc and ewc-dc at their tuned rates with
#            ewc_lambda 0.01 / 0.1 / 1, tabletop-6 val, 2 seeds; a diagnosis beside tuning.json's grid points
#   dc-term-val  why the EWC-DC methods trail on val: ewc-dc without its DC term (dc_delta 0) at the
#            grid's smallest and largest rate, ewc_lambda 10, token_lr 5e-3 (tabletop-6 val, seeds 0-1): each
#            run differs from an ewc-dc grid run only in the DC term, and from a lora-ewc grid run only in
#            the Fisher's source (tuning.json has both)
#   lr-edge-val  the grids' edge: `lora` and `ewc-dc` won at the smallest rate of their grids (3e-4; so did
#            `dsc-ewc-dc`, within 1 of ewc-dc everywhere); one step below (1e-4) at their other tuned settings,
#            tabletop-6 val, 2 seeds. A diagnosis beside tuning.json (the defaults stay the grids' winners:
#            every grid had 3 rates); it says whether the paper's methods trail because the grid stopped.
# v1 (the committed v1 results; tuned on the views they report, see the README): the other stages.
#
# SHARDS=N runs the v2 bench stages as N local workers at once (one thread each, OMP_NUM_THREADS=1): worker K
# runs `bench --shard K/N` of each stage in turn (folders OUT/NAME.shards/K, log OUT/NAME.shard-K.log) and
# goes on to its shard of the next stage without waiting for the others; the worker that finishes a stage's
# last shard `bench --merge`s it into OUT/NAME. So no core idles at a stage's end (the shards of a stage
# take unequal times: Textual Inversion's and the joint bound's runs are long). On the 2-core
# CPU, SHARDS=2 finished about 1.2-1.5x more runs per hour than one 2-thread process (measured on the tuning
# runs); the per-run train/eval seconds in such a report are then contended times, not speed numbers
# (bench-speed measures speed, alone).
set -euo pipefail
CS=${CS:-.venv/bin/conceptstream}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench}
MODEL=${MODEL:-tiny}
# the checkout the tuning table, docs/DEFAULTS.md and the t50-elim JSON are written into (a campaign run from
# a second worktree, so that commits do not change the code under it, points this at the one you commit from)
REPO=${REPO:-.}
SHARDS=${SHARDS:-1}
STAGES=${STAGES:-"tune vera-lr-val t6-v2 t6-vera-v2 t6b-v2 t10-v2 t50-v2 t50-elim dc-term-val ewc-lambda-val lr-edge-val"}
FIVE="lora,lora-ewc,c-lora,ewc-dc,dsc-ewc-dc"
CARRY=${CARRY:-}
carry_save() { [ -z "$CARRY" ] || $PY benchmarks/carry.py save "$OUT" "$CARRY" --images --partial; }
[ -z "$CARRY" ] || $PY benchmarks/carry.py restore "$CARRY" "$OUT"
trap carry_save EXIT  # also when a stage fails: what finished is kept

# in_shards LOG CMD...: CMD --shard K/SHARDS for K = 1..SHARDS at once, one thread each, CMD's output in
# LOG-K.log ("{K}" in CMD's arguments becomes K); fails when any shard fails
in_shards() {
  local log=$1; shift
  local pids=() k failed=0
  mkdir -p "$(dirname "$log")"
  for k in $(seq 1 "$SHARDS"); do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "${@//\{K\}/$k}" --shard "$k/$SHARDS" > "$log-$k.log" 2>&1 &
    pids+=($!)
  done
  for k in "${pids[@]}"; do wait "$k" || failed=1; done
  if [ "$failed" -ne 0 ]; then
    echo "a shard failed; see $log-*.log (rerun the stage to resume)" >&2
    return 1
  fi
}

# first_of PATH...: the first of the paths that exists (globs that matched nothing stay as they are), or nothing
first_of() {
  local p
  for p in "$@"; do [ -e "$p" ] && { echo "$p"; return 0; }; done
  return 0
}

# v2_bench STAGE: sets NAME (its folder under OUT) and ARGS (its bench arguments) for a v2 bench stage;
# fails for any other stage
v2_bench() {
  case $1 in
    t6-v2) NAME=v2-tabletop-6-lora; ARGS=(--sequence tabletop-6 --split test --adapter lora --seeds 5
      --methods lora,lora-ewc,c-lora,ewc-dc,dsc,dsc-ewc,dsc-ewc-dc,custom-diffusion,textual-inversion,single-task,joint) ;;
    t6-vera-v2) NAME=v2-tabletop-6-vera; ARGS=(--sequence tabletop-6 --split test --adapter vera --seeds 3
      --methods lora,lora-ewc,ewc-dc,dsc,dsc-ewc-dc,single-task,joint) ;;
    t6b-v2) NAME=v2-tabletop-6b; ARGS=(--sequence tabletop-6b --split test --adapter lora --seeds 3
      --methods "$FIVE,single-task,joint") ;;
    t10-v2) NAME=v2-tabletop-10; ARGS=(--sequence tabletop-10 --split test --adapter lora --seeds 3
      --methods "$FIVE,single-task,joint") ;;
    t50-v2) NAME=v2-tabletop-50; ARGS=(--sequence tabletop-50 --split test --adapter lora --seeds 2 --eval-every 10
      --dc-elimination "${DC_ELIMINATION:-none}" --methods c-lora,ewc-dc,single-task,joint) ;;
    vera-lr-val) NAME=vera-lr-val; ARGS=(--sequence tabletop-6 --split val --adapter vera --seeds 2 --eval-every 6
      --methods lora,ewc-dc --sweep lr=0.003,0.01,0.03) ;;
    ewc-lambda-val) NAME=ewc-lambda-val; ARGS=(--sequence tabletop-6 --split val --adapter lora --seeds 2 --eval-every 6
      --methods lora-ewc,ewc-dc --sweep ewc_lambda=0.01,0.1,1) ;;
    lr-edge-val) NAME=lr-edge-val; ARGS=(--sequence tabletop-6 --split val --adapter lora --seeds 2 --eval-every 6
      --methods lora,ewc-dc --set lr=0.0001) ;;
    dc-term-val) NAME=dc-term-val; ARGS=(--sequence tabletop-6 --split val --adapter lora --seeds 2 --methods ewc-dc
      --sweep lr=0.0003,0.003 --sweep dc_delta=0 --set ewc_lambda=10 --set token_lr=0.005) ;;
    *) return 1 ;;
  esac
  ARGS=(--model "$MODEL" "${ARGS[@]}")
}

# worker K STAGE...: with SHARDS > 1, shard K of each v2 bench stage in turn (one thread), without waiting
# for the other shards of a stage: a stage is merged by whichever worker finishes its last shard, so no core
# idles at a stage's end while a slower shard finishes. Merges and carry saves take turns (flock).
worker() {
  local k=$1 stage j ready; shift
  for stage in "$@"; do
    v2_bench "$stage"  # its shard markers were cleared when the segment started (flush_segment)
    mkdir -p "$OUT/$NAME.shards"
    if ! OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $CS bench "${ARGS[@]}" --out "$OUT/$NAME.shards/$k" \
        --shard "$k/$SHARDS" > "$OUT/$NAME.shard-$k.log" 2>&1; then
      echo "shard $k/$SHARDS of $stage failed; see $OUT/$NAME.shard-$k.log (rerun the stage to resume)" >&2
      return 1
    fi
    (
      flock 9
      touch "$OUT/$NAME.shards/$k.finished"  # under the lock: exactly one worker finds every shard finished
      ready=1
      for j in $(seq 1 "$SHARDS"); do [ -e "$OUT/$NAME.shards/$j.finished" ] || ready=0; done
      if [ "$ready" -eq 1 ]; then  # a failed merge is reported; this worker goes on to its next stage
        $CS bench --merge $(for j in $(seq 1 "$SHARDS"); do echo "$OUT/$NAME.shards/$j"; done) --out "$OUT/$NAME" ||
          echo "merging $stage failed (see above); rerun the stage to merge it" >&2
      fi
      carry_save
    ) 9> "$OUT/.campaign.lock"
  done
}

# run_stage STAGE: one stage, in this process
run_stage() {
  local stage=$1
  case $stage in
    sweep)  # every sweep below, in order
      STAGES="sweep-ewc-dc sweep-c-lora sweep-lora-ewc sweep-dsc" OUT="$OUT" CS="$CS" bash "$0" ;;
    sweep-ewc-dc)  # one seed each, coordinate-wise: lambda first, then the rest at the chosen lambda; the DC
                   # settings pinned to the defaults of the time (dc_k=5, dc_batch=2) so the committed runs reproduce
            # (the default point of each later sweep is the dc_delta=0.1 run, so it is not repeated)
      $CS bench --sequence tabletop-6 --methods ewc-dc --seeds 1 --set dc_k=5 --set dc_batch=2 --sweep ewc_lambda=0.1,1,10,100,1000 --out "$OUT/sweep-ewc-dc-lambda"
      $CS bench --sequence tabletop-6 --methods ewc-dc --seeds 1 --set dc_k=5 --set dc_batch=2 --set ewc_lambda=100 --sweep dc_delta=0,0.1,1 --out "$OUT/sweep-ewc-dc-delta"
      $CS bench --sequence tabletop-6 --methods ewc-dc --seeds 1 --set dc_k=5 --set dc_batch=2 --set ewc_lambda=100 --sweep dc_temperature=0.002,0.02 --out "$OUT/sweep-ewc-dc-tau"
      $CS bench --sequence tabletop-6 --methods ewc-dc --seeds 1 --set dc_k=5 --set dc_batch=2 --set ewc_lambda=100 --sweep dc_k=2 --out "$OUT/sweep-ewc-dc-k" ;;
    sweep-c-lora)  # at lr 1e-3, c-lora's rate when this ran (its default is 3e-3 since sweep-c-lora-lr)
      $CS bench --sequence tabletop-6 --methods c-lora --seeds 1 --set lr=0.001 --sweep clora_lambda=100,1000,10000,100000 --out "$OUT/sweep-c-lora-lambda" ;;
    sweep-lora-ewc)
      $CS bench --sequence tabletop-6 --methods lora-ewc --seeds 1 --sweep ewc_lambda=1,10,100,1000 --out "$OUT/sweep-lora-ewc-lambda" ;;
    sweep-dsc)
      $CS bench --sequence tabletop-6 --methods dsc-ewc-dc --seeds 1 --set dc_k=5 --set dc_batch=2 --set ewc_lambda=100 --sweep dsc_iters=25,100 --out "$OUT/sweep-dsc-iters" ;;
    sweep-dsc-alone)  # dsc without EWC was erratic in t6 (seed 1 forgot); dsc_iters=25 was chosen on dsc-ewc-dc only
      $CS bench --sequence tabletop-6 --methods dsc --seeds 3 --sweep dsc_iters=100 --out "$OUT/sweep-dsc-alone" ;;
    levers)  # quality of ewc-dc's speed levers (issue 6) and the Fisher decay gamma, from the paper's
             # dc_k=5, dc_batch=2 (the defaults when these ran); dc_k=2 alone is sweep-ewc-dc-k
      $CS bench --sequence tabletop-6 --methods ewc-dc --seeds 1 --set dc_k=5 --sweep dc_batch=1 --out "$OUT/sweep-ewc-dc-batch"
      $CS bench --sequence tabletop-6 --methods ewc-dc --seeds 1 --set dc_k=5 --set dc_batch=2 --sweep fisher_passes=1 --out "$OUT/sweep-ewc-dc-fisher"
      $CS bench --sequence tabletop-6 --methods ewc-dc --seeds 1 --set dc_k=2 --sweep dc_batch=1 --out "$OUT/sweep-ewc-dc-k2-batch1"
      $CS bench --sequence tabletop-6 --methods ewc-dc --seeds 1 --set dc_k=5 --set dc_batch=2 --sweep ewc_gamma=0.5 --out "$OUT/sweep-ewc-dc-gamma" ;;
    speed-levers)  # time of the same levers vs lora (defaults dc_k=2, dc_batch=1; the paper's k=5, batch 2 and
                   # the old dsc_iters=100 as variants), 6 timed tasks so a k=5 candidate set fills up
      $CS bench-speed --parts training --timed-tasks 6 --label levers --out "${SPEED_OUT:-$REPO/benchmarks/results}" \
        --methods "lora,ewc-dc,ewc-dc[dc_k=5,dc_batch=2],ewc-dc[dc_k=5],ewc-dc[dc_batch=2],dsc-ewc-dc,dsc-ewc-dc[dc_k=5,dc_batch=2,dsc_iters=100]" ;;
    t6-v2|t6-vera-v2|t6b-v2|t10-v2|t50-v2|vera-lr-val|ewc-lambda-val|dc-term-val|lr-edge-val)  # one process (SHARDS=1)
      v2_bench "$stage"
      $CS bench "${ARGS[@]}" --out "$OUT/$NAME" ;;
    tune)  # the grids, their table (the winners), then the token-rate round at those winners, and the final table
      for round in grid token; do
        if [ "$SHARDS" -le 1 ]; then
          $PY benchmarks/tuning.py run --round $round --root "$OUT/tuning" --model "$MODEL"
        else
          in_shards "$OUT/tuning.shard" $PY benchmarks/tuning.py run --round $round --root "$OUT/tuning" --model "$MODEL"
        fi
        $PY benchmarks/tuning.py table --root "$OUT/tuning" --out "$REPO/benchmarks/results/tuning" --docs "$REPO/docs/DEFAULTS.md"
      done ;;
    t50-elim)  # issue 18 item 7: full vs successive-elimination DC classification, side by side, on the same
               # t50-v2 state (its seed-0 ewc-dc run; the bench keeps each run's final state, in its shard's
               # folder when the stage ran in shards: a merge copies run folders without their state). One full
               # pass on val keeps every draw's errors, from which dc_draws.py simulates every schedule exactly;
               # the schedule is chosen there (dc_elimination.py --choose-from), then timed against full on test.
               # dc_draws.py on test records every schedule's test accuracy beside it (not used to choose).
      state=$(first_of "$OUT"/v2-tabletop-50/runs/ewc-dc-lora/seed0/state "$OUT"/v2-tabletop-50.shards/*/runs/ewc-dc-lora/seed0/state)
      data=$(first_of "$OUT"/v2-tabletop-50/data/tabletop-50-* "$OUT"/v2-tabletop-50.shards/*/data/tabletop-50-*)
      [ -n "$state" ] && [ -n "$data" ] || { echo "t50-elim needs t50-v2's seed-0 ewc-dc state and data folder in $OUT: run STAGES=t50-v2 first (with CARRY, it restores them)" >&2; return 1; }
      for split in val test; do
        $PY benchmarks/dc_draws.py --state "$state" --data "$data" --split $split \
          --errors "$OUT/dc-draws-$split.safetensors" --out "$REPO/benchmarks/results/dc-draws-tabletop-50-$split.json"
      done
      $PY benchmarks/dc_elimination.py --state "$state" --data "$data" \
        --choose-from "$REPO/benchmarks/results/dc-draws-tabletop-50-val.json" --out "$REPO/benchmarks/results/dc-elimination-tabletop-50.json" ;;
    t6)
      $CS bench --sequence tabletop-6 --adapter lora --seeds 3 --out "$OUT/tabletop-6-lora" \
        --methods lora,lora-ewc,c-lora,ewc-dc,dsc,dsc-ewc,dsc-ewc-dc,custom-diffusion,textual-inversion ;;
    t6-vera)  # VeRA at its own default lr (1e-2)
      $CS bench --sequence tabletop-6 --adapter vera --seeds 3 --out "$OUT/tabletop-6-vera" \
        --methods lora,lora-ewc,ewc-dc,dsc,dsc-ewc-dc ;;
    t6-vera-lr1e-3)  # the same at LoRA's lr, VeRA's default before the sweep below (made then without --set)
      $CS bench --sequence tabletop-6 --adapter vera --seeds 3 --set lr=0.001 --out "$OUT/tabletop-6-vera-lr1e-3" \
        --methods lora,lora-ewc,ewc-dc,dsc,dsc-ewc-dc ;;
    sweep-lora-lr)  # is LoRA's 1e-3 too small a step? (one seed)
      $CS bench --sequence tabletop-6 --adapter lora --methods lora,ewc-dc,c-lora --seeds 1 --sweep lr=0.003 --out "$OUT/sweep-lora-lr" ;;
    sweep-vera-lr)  # VeRA's poor plasticity at LoRA's lr: a matter of step size? (one seed; chose VeRA's 1e-2)
      $CS bench --sequence tabletop-6 --adapter vera --methods lora,ewc-dc --seeds 1 --sweep lr=0.003,0.01 --out "$OUT/sweep-vera-lr" ;;
    sweep-c-lora-lr)  # C-LoRA at lr 3e-3 on 3 seeds: was it under-tuned at the shared 1e-3? (seed 0 is also in sweep-lora-lr;
                      # chose c-lora's own default 3e-3, so t6's c-lora row reproduces these runs)
      $CS bench --sequence tabletop-6 --adapter lora --methods c-lora --seeds 3 --sweep lr=0.003 --out "$OUT/sweep-c-lora-lr" ;;
    t10)
      $CS bench --sequence tabletop-10 --adapter lora --seeds 3 --out "$OUT/tabletop-10" \
        --methods lora,lora-ewc,c-lora,ewc-dc,dsc-ewc-dc ;;
    t50)
      # full rows every 10th task: the full 50x50 matrix would cost 1275 concept evaluations per run
      $CS bench --sequence tabletop-50 --adapter lora --seeds 1 --eval-every 10 --out "$OUT/tabletop-50" --methods c-lora,ewc-dc ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
  carry_save
}

# The stages in order. With SHARDS > 1, each run of consecutive v2 bench stages goes to SHARDS workers at once
# (worker above); every other stage runs alone, after the stages before it have finished.
segment=()
flush_segment() {
  [ ${#segment[@]} -gt 0 ] || return 0
  local pids=() k failed=0 stage
  for stage in "${segment[@]}"; do  # markers of an earlier invocation (maybe under other settings) do not count
    v2_bench "$stage"
    rm -f "$OUT/$NAME.shards/"*.finished
  done
  for k in $(seq 1 "$SHARDS"); do
    worker "$k" "${segment[@]}" &
    pids+=($!)
  done
  for k in "${pids[@]}"; do wait "$k" || failed=1; done
  segment=()
  [ "$failed" -eq 0 ] || { echo "a worker failed (see above); rerun the script to resume" >&2; return 1; }
}
for stage in $STAGES; do
  if [ "$SHARDS" -gt 1 ] && v2_bench "$stage"; then
    segment+=("$stage")
  else
    flush_segment
    run_stage "$stage"
  fi
done
flush_segment
