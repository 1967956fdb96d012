"""Where a result came from: the hardware it ran on and the code version that produced it,
written into every record so a number can be traced back to a machine and a commit."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    if "CUDA_VISIBLE_DEVICES" in os.environ:  # the GPUs a pool or scheduler gave this run
        info["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return info


def code_version(root: Path = Path(__file__).resolve().parent.parent) -> dict[str, Any]:
    """The checkout's commit and whether its code differs from it (results/ aside)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    import numpy
    import torchvision
    return {"git_sha": git("rev-parse", "HEAD") or "unknown",
            # the code's state: runs written into results/ do not make the code dirty
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)results")),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "os": platform.platform()}
