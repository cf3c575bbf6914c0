"""The Markdown tables of a bench-speed result."""

from __future__ import annotations

from typing import Any


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _kib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown tables of a bench-speed result."""
    s, m = results["settings"], results["machine"]
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    lines = [f"## bench-speed on {m.get('name', '?')}",
             "",
             f"{m['cpu_model']} ({m['cpu_usable']} usable cores, torch threads {m['torch_threads']}{gpu}); "
             f"device {s['device']}; model {s['model']}; adapter {s['adapter']}; {s['steps']} steps per task; "
             f"torch {results['versions'].get('torch')}, diffusers {results['versions'].get('diffusers')}, "
             f"peft {results['versions'].get('peft')}",
             ""]
    tr, size = results["training"], results["state_size"]
    t = s["timed_tasks"]
    gpu_col = any("peak_gpu_ratio" in e for e in tr.values())
    head = (["method"] + [f"task {i + 1} s" for i in range(t)] + [f"time x lora (task {t})", "peak RSS MB",
                                                                     "RSS x lora"]
            + (["peak GPU MB", "GPU x lora"] if gpu_col else []) + [f"state KiB @{n}" for n in s["size_tasks"]])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, e in tr.items():
        last = e["tasks"][-1] if e["tasks"] else {}
        row = [method] + [_f(r["wall_s"], "{:.1f}") for r in e["tasks"]]
        row += [_f(e.get("wall_ratio")), _f(last.get("peak_rss_mb"), "{:.0f}"), _f(e.get("peak_rss_ratio"))]
        if gpu_col:
            row += [_f(last.get("peak_gpu_mb"), "{:.0f}"), _f(e.get("peak_gpu_ratio"))]
        row += [_kib(size.get(method, {}).get(str(n))) for n in s["size_tasks"]]
        lines.append("| " + " | ".join(row) + " |")
    dc = results.get("dc")
    if dc is not None:
        lines += ["", f"DC scoring ({dc['images']} images x {dc['candidates']} candidates x {dc['timesteps']} "
                  f"timesteps, UNet batch {dc['unet_batch']}): raw UNet {dc['evals_per_s']['raw']:.1f} evals/s; "
                  f"DiffusionClassifier.errors {dc['errors_ratio']:.3f}x, eval_errors {dc['eval_errors_ratio']:.3f}x "
                  f"of raw (target >= {dc['target']})"]
    g = results.get("generate")
    if g is not None:
        parts = [f"{k}: fused {g[k]['fused_ratio']:.3f}x, unfused {g[k]['unfused_ratio']:.3f}x"
                 for k in g if isinstance(g[k], dict)]
        lines += ["", f"generate ({g['images']} images, {g['steps']} steps; base pipeline {g['base_s']:.2f}s): "
                  + "; ".join(parts) + f" (target fused <= {g['target']}x)"]
    if results.get("caveats"):
        lines += [""] + [f"> caveat: {c}" for c in results["caveats"]]
    return "\n".join(lines)
