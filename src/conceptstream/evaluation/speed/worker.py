"""The training measurement's worker process: learn the listed (method, task) jobs, timing each.

Run as ``python -m conceptstream.evaluation.speed.worker --worker CONFIG`` by
:func:`conceptstream.evaluation.speed.training.run_worker`; not a user command.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from conceptstream.evaluation.speed.settings import NOUNS
from conceptstream.evaluation.speed.timing import hparams_for, sync, synthetic_images, token
from conceptstream.evaluation.variants import parse_variant
from conceptstream.system import peak_rss_mib, reset_peak_rss, rss_mib


def preimport() -> None:
    """Import what `learn` imports lazily, so no task pays for (or measures) library imports."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from peft.tuners.vera import VeraModel  # noqa: F401
    from tqdm.auto import tqdm  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from conceptstream import api  # noqa: F401
    from conceptstream.methods.registry import method_names

    method_names()


def timed_task(state: str, method: str, task: int, s: dict[str, Any]) -> dict[str, Any]:
    """Learn task ``task`` (0-based) of ``method`` into ``state`` through the api; time + memory."""
    import torch

    from conceptstream import api
    from conceptstream.methods.registry import adapter_kind_for
    from conceptstream.state import StateStore

    images = synthetic_images(s["images"], seed=1000 + task)
    cuda = str(s["device"]).startswith("cuda") and torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    method, extra = parse_variant(method)  # before the clock: its lazy imports are not the task's cost
    hparams = {**hparams_for(method, s["method_hparams"]), **extra}
    rss_before = rss_mib()
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    report = api.learn(state, images, token=token(task), noun=NOUNS[task % len(NOUNS)], method=method,
                       model=s["model"], steps=s["steps"], seed=task, adapter=adapter_kind_for(method, s["adapter"]),
                       hparams=(hparams or None) if task == 0 else None,
                       device=s["device"], progress=False, checkpoint_every=0)
    sync(s["device"])
    wall = time.perf_counter() - t0
    store = StateStore(state)
    out = {"task": task + 1, "wall_s": wall, "train_s": report.seconds, "rss_before_mb": rss_before,
           "peak_rss_mb": peak_rss_mib(), "peak_rss_is_task_only": reset_ok, "state_bytes": store.size_bytes(),
           "hyperparameters": store.read_manifest()["method"]["hyperparameters"]}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(config_path: str) -> int:
    """Run the (method, task) jobs listed in the config; write their results."""
    cfg = json.loads(Path(config_path).read_text())
    import torch

    if cfg["settings"].get("threads"):
        torch.set_num_threads(int(cfg["settings"]["threads"]))
    preimport()
    results = []
    for job in cfg["jobs"]:
        r = timed_task(job["state"], job["method"], job["task"], cfg["settings"])
        results.append({"method": job["method"], **r, "torch_threads": torch.get_num_threads()})
    Path(cfg["out"]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(main(sys.argv[2]))
    sys.exit("usage: conceptstream bench-speed ... (this module's --worker entry is internal)")
