"""Measurement 4, state size: bytes of the committed state after N tasks, per method (and relative to lora).

Short tasks (size does not depend on the number of steps); the timed states are reused where they reach N.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conceptstream.evaluation.speed.settings import NOUNS, SpeedSettings
from conceptstream.evaluation.speed.timing import adapter_spec, hparams_for, synthetic_images, token
from conceptstream.evaluation.variants import parse_variant, slug


def bench_state_size(s: SpeedSettings, workdir: Path, training: dict[str, Any], log: Callable[[str], None]):
    """Bytes of the committed state after N tasks; reuses the timed states where they reach N."""
    from conceptstream.engine import ConceptStream, StreamSettings
    from conceptstream.methods.registry import adapter_kind_for
    from conceptstream.state import StateStore

    out: dict[str, Any] = {}
    need = max(s.size_tasks)
    for label in s.methods:
        method, extra = parse_variant(label)
        sizes: dict[str, int] = {}
        timed = training.get(label, {}).get("tasks", [])
        if need <= len(timed):
            sizes = {str(r["task"]): r["state_bytes"] for r in timed}
        else:
            log(f"state size: {label}, {need} short tasks")
            spec = adapter_spec(adapter_kind_for(method, s.adapter))
            hp = {**hparams_for(method, {**s.method_hparams, **s.size_hparams}), **extra}
            stream = ConceptStream.new(s.model, StreamSettings(method=method, adapter=spec, hparams=hp),
                                       device=s.device)
            store = StateStore(workdir / f"size-{slug(label)}")
            for task in range(need):
                stream.learn(synthetic_images(2, seed=1000 + task), token(task), NOUNS[task % len(NOUNS)],
                             steps=1, seed=task, progress=False)
                with store.lock():
                    store.commit(stream.manifest, stream.state_tensors())
                sizes[str(task + 1)] = StateStore(store.path).size_bytes()
            del stream
            gc.collect()
        out[label] = {str(n): sizes.get(str(n)) for n in s.size_tasks}
    ref = out.get("lora")
    if ref:
        for entry in out.values():
            entry["ratio_vs_lora"] = {n: (entry[str(n)] / ref[str(n)] if entry.get(str(n)) and ref.get(str(n))
                                          else None) for n in map(str, s.size_tasks)}
    return out
