"""Facts about the running process and machine: time, library versions, memory, CPU/GPU, load.

Nothing here imports torch at module level; the probes that need it import it when called.

Memory, in MiB (2^20 bytes):

- :func:`peak_rss_mib`: the process's resident-set high-water mark, ``VmHWM`` in
  ``/proc/self/status`` (``getrusage``'s ``ru_maxrss`` where /proc is missing, e.g. macOS). It
  covers the whole life of the process unless :func:`reset_peak_rss` was called; the reset works
  on Linux >= 4.0 only (``ru_maxrss`` cannot be reset).
- :func:`rss_mib`: the current resident set (``VmRSS``; psutil where /proc is missing).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path
from typing import Any

# Distributions recorded beside the core libraries (when installed).
EXTRA_DISTRIBUTIONS = ("numpy", "pillow", "torchmetrics", "matplotlib", "safetensors", "efficientnet-lite-pytorch")


def utc_now() -> str:
    """The current UTC time as ISO 8601 with seconds, e.g. ``2026-01-02T03:04:05+00:00``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions(extended: bool = True) -> dict[str, str]:
    """Versions of conceptstream, torch, diffusers, transformers and peft; ``extended`` adds the
    Python version, the platform and :data:`EXTRA_DISTRIBUTIONS` that are installed."""
    import diffusers
    import peft
    import torch
    import transformers

    import conceptstream

    out = {"conceptstream": conceptstream.__version__, "torch": torch.__version__,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    if not extended:
        return out
    from importlib import metadata

    for name in EXTRA_DISTRIBUTIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    return out


# -- memory -------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the peak resident set (``VmHWM``) to the current RSS; False where the kernel cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    """Peak resident set of this process in MiB since it started or since :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    try:
        import resource

        raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return raw / (1 << 20) if sys.platform == "darwin" else raw / 1024  # bytes on macOS, KiB on Linux


def rss_mib() -> float | None:
    """Current resident set of this process in MiB."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1 << 20)
    except Exception:  # psutil is optional
        return None


def memory_usage() -> dict[str, float | None]:
    """``peak_rss_mib`` and ``rss_mib`` (rounded to 0.1 MiB), plus ``cuda_peak_mib`` when CUDA is in use."""
    out: dict[str, float | None] = {"peak_rss_mib": _round(peak_rss_mib()), "rss_mib": _round(rss_mib())}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda_peak_mib"] = _round(torch.cuda.max_memory_allocated() / (1 << 20))
    except Exception:
        pass
    return out


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


# -- machine ------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_gb() -> float | None:
    """Physical memory in GiB (``MemTotal``), None where /proc is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_clock() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its waited-for
    children); their difference over a run is the CPU time *other* processes took."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    t = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system


def machine_info(device: str) -> dict[str, Any]:
    """Host, CPU model and cores (all / usable by this process), torch threads, memory, load; the GPU on CUDA."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cpu_usable": usable,
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "memory_gb": total_memory_gb(), "device": device, "loadavg_start": loadavg(),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def machine_name(info: dict[str, Any]) -> str:
    """A lower-case file-name label from :func:`machine_info`: the GPU, or the CPU model and usable cores."""
    import re

    base = f"gpu-{info['gpu']}" if info.get("gpu") else f"cpu-{info['cpu_model']}-{info['cpu_usable']}c"
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")[:80]
