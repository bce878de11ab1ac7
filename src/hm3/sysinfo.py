"""Facts about this machine and environment: what a measurement ran on (for the reports of ``make bench``
and ``make results``) and where hm3 keeps its caches."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def cache_home() -> Path:
    """hm3's cache directory: ``$HM3_CACHE``, else ``~/.cache/hm3`` (downloaded data, statistics)."""
    return Path(os.environ.get("HM3_CACHE") or Path.home() / ".cache" / "hm3").expanduser()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _memory() -> str:
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError, IndexError):
        return ""


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU, cores, memory, library versions, torch threads, load average, date and git commit."""
    import torch

    from hm3.fastpaths import bf16_is_fast, has_amx

    isa = torch.backends.cpu.get_cpu_capability()  # the vector ISA torch's kernels use: AVX2, AVX512, ...
    bf16 = "none" if not bf16_is_fast() else "AMX" if has_amx() else "AVX512-BF16 only, no AMX"
    return {
        "cpu": f"{_cpu_model()} ({isa}; bf16 matrix instructions: {bf16})",
        "cores": os.cpu_count(),
        "memory": _memory(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": _commit(),
    }
