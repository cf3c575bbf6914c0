"""Data-parallel training under a real two-process launch (torchrun, gloo on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import SRC

from conceptstream.state import StateStore

RANK_SCRIPT = r'''
import hashlib, json, os, sys
import torch
from conceptstream import api
from conceptstream.concepts.images import load_images
from conceptstream.engine import ConceptStream, StreamSettings
from conceptstream.concepts.folder import read_concept

state, concept_dir, model, out = sys.argv[1:5]
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
concept = read_concept(concept_dir)
stream = ConceptStream.new(model, StreamSettings(method="lora"), device="cpu")
report = stream.learn(load_images(concept.train_images(), stream.resolution), concept.token, concept.noun,
                      steps=3, seed=0, progress=False)
adapter = stream.state_tensors()["adapter"]
digest = hashlib.sha256(b"".join(adapter[k].numpy().tobytes() for k in sorted(adapter))).hexdigest()
# the same launch through the API: only the main process may lock, checkpoint and commit the state
api.learn(state, concept_dir, model=model, method="lora", steps=3, progress=False, checkpoint_every=2)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"digest": digest, "first_loss": report.logs[0]["loss"]}, f)
'''


def test_two_process_launch_averages_gradients_and_only_main_commits(tmp_path, random_model_path, concept_dirs):
    pytest.importorskip("torch.distributed.run")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    state, out = tmp_path / "state", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(state), str(concept_dirs[0]), str(random_model_path), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # each process drew its own batches (different first losses) ...
    assert ranks[0]["first_loss"] != ranks[1]["first_loss"]
    # ... and after averaged updates both hold the same weights
    assert ranks[0]["digest"] == ranks[1]["digest"]
    store = StateStore(state)
    token = json.loads((concept_dirs[0] / "concept.json").read_text())["token"]
    assert [c["token"] for c in store.read_manifest()["concepts"]] == [token]
    assert store.load_checkpoint() is None
