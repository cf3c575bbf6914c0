"""benchmarks/run_tabletop.sh's control flow, with stand-ins for `conceptstream` and `python` that only
log what they were asked to do: with SHARDS=2 each worker goes on to its shard of the next v2 stage
without waiting for the other shards of a stage, a stage is merged once, after all its shards, and a
stage that is not a v2 bench runs after everything before it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import BENCHMARKS

# `conceptstream bench ...`: logs "start NAME K" / "end NAME K" (K = 0 without --shard) or "merge NAME".
# Shard 2 of tabletop-6 finishes only once shard 1 of tabletop-6b has started: a script that waited for
# every shard of a stage before the next would never get there, and the stand-in fails after 20 s.
FAKE_CS = r"""#!/usr/bin/env bash
if [ "$2" = "--merge" ]; then echo "merge $(basename "${@: -1}")" >> "$EVENTS"; exit 0; fi
shard=0/0
while [ $# -gt 0 ]; do case $1 in --out) out=$2; shift;; --shard) shard=$2; shift;; esac; shift; done
k=${shard%/*}
if [ "$k" = 0 ]; then name=$(basename "$out"); else name=$(basename "$(dirname "$out")"); name=${name%.shards}; fi
echo "start $name $k" >> "$EVENTS"
if [ "$name/$k" = v2-tabletop-6-lora/2 ]; then
  for i in $(seq 200); do grep -q "start v2-tabletop-6b 1" "$EVENTS" && break; sleep 0.1; done
  grep -q "start v2-tabletop-6b 1" "$EVENTS" || { echo timeout >> "$EVENTS"; exit 1; }
fi
echo "end $name $k" >> "$EVENTS"
"""
FAKE_PY = """#!/usr/bin/env bash
echo "py $(basename "$1") $2" >> "$EVENTS"
"""


def run_script(tmp_path: Path, stages: str, shards: int) -> list[str]:
    for name, text in (("cs", FAKE_CS), ("py", FAKE_PY)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    events = tmp_path / "events"
    env = {**os.environ, "CS": str(tmp_path / "cs"), "PY": str(tmp_path / "py"), "OUT": str(tmp_path / "bench"),
           "SHARDS": str(shards), "STAGES": stages, "EVENTS": str(events)}
    env.pop("CARRY", None)
    done = subprocess.run(["bash", str(BENCHMARKS / "run_tabletop.sh")], cwd=BENCHMARKS.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return events.read_text().splitlines()


def test_workers_go_on_to_the_next_stage_and_a_stage_is_merged_after_its_last_shard(tmp_path):
    ev = run_script(tmp_path, "t6-v2 t6b-v2 tune dc-term-val", shards=2)
    assert "timeout" not in ev
    assert ev.index("start v2-tabletop-6b 1") < ev.index("end v2-tabletop-6-lora 2")
    for name in ("v2-tabletop-6-lora", "v2-tabletop-6b", "dc-term-val"):
        assert ev.count(f"merge {name}") == 1, ev
        assert ev.index(f"merge {name}") > max(ev.index(f"end {name} 1"), ev.index(f"end {name} 2"))
    first_tune = ev.index("py tuning.py run")
    assert first_tune > max(ev.index("merge v2-tabletop-6-lora"), ev.index("merge v2-tabletop-6b"))
    assert ev.index("start dc-term-val 1") > max(i for i, e in enumerate(ev) if e.startswith("py tuning.py"))
    assert (tmp_path / "bench" / "v2-tabletop-6b.shard-2.log").is_file()


def test_one_shard_runs_each_stage_in_one_process(tmp_path):
    assert run_script(tmp_path, "t6-v2 dc-term-val", shards=1) == [
        "start v2-tabletop-6-lora 0", "end v2-tabletop-6-lora 0", "start dc-term-val 0", "end dc-term-val 0"]
