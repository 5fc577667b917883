"""Health: process memory, GPU memory and residency through NVML, and the /health snapshot.

Readings are refreshed by a background task and cached, so ``GET /health`` only renders
numbers it already has and answers in microseconds while a model is generating. On CPU the
GPU fields are the contract's honest values (``device: cpu``, ``resident: false``,
``vram_bytes_used: 0``): nothing is made up.
"""

from __future__ import annotations

import logging
import os
import time
from types import ModuleType
from typing import Any

import attrs

from . import logs

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident memory of this process, from /proc (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


@attrs.frozen
class GpuReading:
    vram_bytes_used: int
    resident: bool
    error: str | None = None


def _pid_visible(pid: int) -> bool:
    """Whether ``pid`` exists in this process's PID namespace."""
    return os.path.exists(f"/proc/{pid}")


class Nvml:
    """GPU memory of this process on one device, read through pynvml (``nvidia-ml-py``).

    ``module`` is the ``pynvml`` module, or a test double with the same functions.
    """

    def __init__(self, device: int, module: ModuleType | Any | None = None) -> None:
        if module is None:
            import pynvml

            module = pynvml
        self._nvml: Any = module
        self._nvml.nvmlInit()
        self._handle = self._nvml.nvmlDeviceGetHandleByIndex(device)
        self.device = device

    def read(self, model_bytes: int) -> GpuReading:
        """VRAM this process uses, and whether the model's weights are resident on the GPU.

        Resident means NVML lists this process on the device holding at least the
        model's size. Where NVML gives no per-process figure, or lists only PIDs of another
        PID namespace (a container: NVML reports host PIDs), the device total is used.
        """
        nv = self._nvml
        try:
            used: int | None = None
            listed = False
            procs = list(nv.nvmlDeviceGetComputeRunningProcesses(self._handle))
            for proc in procs:
                if proc.pid == os.getpid():
                    listed = True
                    if proc.usedGpuMemory is not None:
                        used = int(proc.usedGpuMemory)
            foreign_pids = bool(procs) and not any(_pid_visible(p.pid) for p in procs)
            if not listed and not foreign_pids:
                return GpuReading(0, False, "this process is not on the GPU according to NVML")
            if used is None:  # NVML_VALUE_NOT_AVAILABLE: no per-process figure
                used = int(nv.nvmlDeviceGetMemoryInfo(self._handle).used)
            resident = used >= model_bytes
            return GpuReading(used, resident,
                              None if resident else f"only {used} bytes on the GPU, "
                              f"the model needs {model_bytes}")
        except nv.NVMLError as exc:
            return GpuReading(0, False, f"NVML failed: {exc}")

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a library that may be half gone
            pass


@attrs.define(eq=False)
class HealthState:
    """What /health shows; refreshed in the background, rendered from memory."""

    started_mono: float = attrs.field(factory=time.monotonic)
    ram_bytes_used: int = 0
    vram_bytes_used: int = 0
    resident: bool = False
    unhealthy_reason: str | None = None
    last_residency_check: float = 0.0

    def refresh_memory(self) -> None:
        self.ram_bytes_used = rss_bytes()

    def check_gpu(self, nvml: Nvml, model_bytes: int) -> None:
        reading = nvml.read(model_bytes)
        self.vram_bytes_used = reading.vram_bytes_used
        self.resident = reading.resident
        self.last_residency_check = time.monotonic()
        if reading.error is not None:
            if self.unhealthy_reason != reading.error:
                logs.log("error", f"GPU residency check failed: {reading.error}",
                         level=logging.ERROR, device=nvml.device)
            self.unhealthy_reason = reading.error
        elif self.unhealthy_reason is not None:
            logs.log("residency_ok", "GPU residency restored", device=nvml.device)
            self.unhealthy_reason = None
