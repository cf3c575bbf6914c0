"""benchmarks/adapter_drift.py: how far a shared adapter moved, read from a bench's kept states."""

import json
from pathlib import Path

import pytest
import torch
from conftest import benchmark_script
from safetensors.torch import save_file

LAYER = "down.attn2.to_k"


@pytest.fixture(scope="module")
def drift():
    return benchmark_script("adapter_drift")


def lora(a: torch.Tensor, b: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{LAYER}.lora_A.default.weight": a, f"{prefix}{LAYER}.lora_B.default.weight": b}


def state(run: Path, method: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> None:
    version = run / "state" / "v0003"
    version.mkdir(parents=True)
    (run / "state" / "CURRENT").write_text("v0003\n")
    save_file({k: v.clone() for k, v in method.items()}, str(version / "method.safetensors"))
    save_file({k: v.clone() for k, v in adapter.items()}, str(version / "adapter.safetensors"))


def test_drift_is_measured_on_b_times_a_between_the_pools_adapters(tmp_path, drift):
    a = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    b1 = torch.ones(3, 2)
    # a DSC pool: task 2 doubles B (dW doubles: change 1.0 vs task 1), task 3 keeps it; A is scaled by 1.01
    # in task 3, which moves the raw A tensor a little and dW by 0.01
    pool = {}
    for i, (aa, bb) in enumerate([(a, b1), (a, 2 * b1), (1.01 * a, 2 * b1)]):
        pool.update({f"pool.{i}.{k}": v for k, v in lora(aa, bb).items()})
    state(tmp_path / "runs" / "dsc-ewc-lora" / "seed0", pool, lora(1.01 * a, 2 * b1))
    # an EWC state: its anchor equals the final adapter (re-set after every task), so no numbers
    state(tmp_path / "runs" / "ewc-dc-lora" / "seed1", lora(a, b1, "anchor.") | {"fisher.x": torch.ones(1)},
          lora(a, b1))
    state(tmp_path / "runs" / "lora-lora" / "seed0", {}, lora(a, b1))
    out = tmp_path / "drift.json"
    assert drift.main([str(tmp_path), "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    pool_drift = runs["dsc-ewc-lora"]["0"]
    assert pool_drift["vs_previous"][0] is None
    assert pool_drift["vs_previous"][1] == pytest.approx(1.0) and pool_drift["vs_previous"][2] == pytest.approx(0.01)
    assert pool_drift["vs_first"][2] == pytest.approx(1.02)  # 2.02 dW against 1 dW
    assert runs["ewc-dc-lora"]["1"]["kind"].startswith("no per-task adapter snapshots")
    assert runs["lora-lora"]["0"]["kind"].startswith("no per-task adapter snapshots")


def test_a_folder_without_runs_is_one_line_and_a_nonzero_exit(tmp_path, drift, capsys):
    assert drift.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("pass bench --out folders")
