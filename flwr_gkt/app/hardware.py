"""What this machine gives a run: ``python -m simulation --cpu``.

The run's speed depends most on whether the CPU runs bfloat16 natively
(AVX512-BF16 or AMX): ``precision: auto`` then trains in bf16 and the edges'
features travel as float16, else it trains in float32 and the features travel
as float32, twice the bytes. This prints the same decision the run makes
(:func:`flwr_gkt.core.training.resolve_precision`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), or what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def hardware_report() -> str:
    """Lines describing the CPU, the GPU and what ``precision: auto`` resolves to."""
    import torch

    from flwr_gkt.core.training import bf16_supported, get_device, resolve_precision

    cpu = torch.device("cpu")
    cpu_bf16 = bf16_supported(cpu)
    lines = [
        f"cpu: {cpu_model()}, {usable_cores()} usable cores",
        f"cpu bf16: {'yes' if cpu_bf16 else 'no'} (oneDNN: AVX512-BF16 or AMX)",
        f"cpu precision auto: {resolve_precision(cpu, 'auto')}",
    ]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}")
    else:
        lines.append("gpu: none")
    device = get_device("auto")
    lines.append(
        f"server device auto: {device.type}, precision auto: {resolve_precision(device, 'auto')}"
    )
    return "\n".join(lines)


def main() -> int:
    """Print :func:`hardware_report`."""
    print(hardware_report(), flush=True)
    return 0
