"""benchmarks/gpu_check.py --cpu-small, the CPU run of the GPU check: learn 2 tasks, generate, export in
both formats and reload in stock diffusers, per method, recorded in one JSON."""

from __future__ import annotations

import json

import pytest
from conftest import benchmark_script


@pytest.mark.slow
def test_the_gpu_check_runs_small_on_the_cpu_and_records_every_step(tmp_path):
    gpu_check = benchmark_script("gpu_check")
    out = tmp_path / "gpu.json"
    rc = gpu_check.main(["--cpu-small", "--families", "sd15,sdxl", "--methods", "lora,ewc-dc,c-lora", "--steps", "2",
                         "--gen-steps", "2", "--dsc-iters", "1", "--model-dir", str(tmp_path / "models"),
                         "--out", str(out)])
    doc = json.loads(out.read_text())
    failed = {(r["family"], r["method"]): {k: s for k, s in r["steps"].items() if not s["ok"]} for r in doc["rows"]
              if not r["ok"]}
    assert rc == 0 and doc["all_ok"], failed
    assert [(r["family"], r["method"]) for r in doc["rows"]] == [(f, m) for f in ("sd15", "sdxl")
                                                                 for m in ("lora", "ewc-dc", "c-lora")]
    steps = {"learn_task1", "learn_task2", "generate", "export_diffusers", "reload_diffusers", "export_kohya",
             "reload_kohya"}
    for r in doc["rows"]:
        assert set(r["steps"]) == steps
        assert r["task2"]["step_s_median"] > 0
        assert r["steps"]["reload_kohya"]["mean_abs_diff"] <= doc["settings"]["max_pixel_diff"]
    assert doc["targets"]["sd15_ewc_dc_step_ratio"]["target"] == "<= 1.6"
