"""The instruction sets llama.cpp was built with, and the warning when this CPU has more.

pip keeps a built llama-cpp-python wheel in its cache, so a `.venv` made before the justfile
named AVX-512 (or copied from another machine) silently runs AVX2 kernels: a 4-sequence step
about 20 % slower on this project's VM. The worker says so at startup.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import pytest

from orcd.engine import model as engine_model
from orcd.engine.model import built_cpu_features, cpu_build, unused_cpu_sets

from .conftest import LogCapture
from .harness import running_worker

AVX2_BUILD = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
              "BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
SAPPHIRE_RAPIDS = ("processor\t: 0\nflags\t\t: fpu sse2 avx f16c avx2 fma bmi2 avx512f "
                   "avx512dq avx512cd avx512bw avx512vl avx_vnni avx512_vnni amx_tile "
                   "amx_int8\nbogomips\t: 4800.00\n")


def test_the_built_features_are_read_from_llamas_system_info() -> None:
    assert built_cpu_features(AVX2_BUILD) == (
        "SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "LLAMAFILE", "OPENMP", "REPACK")
    assert built_cpu_features("CUDA : ARCHS = 900 | USE_GRAPHS = 1 |\nCPU : AVX2 = 1 | "
                              "AVX512 = 0 | ") == ("AVX2",)
    assert built_cpu_features("no CPU backend here") == ()


def test_sets_the_cpu_has_and_the_build_lacks_are_named() -> None:
    built = built_cpu_features(AVX2_BUILD)
    assert unused_cpu_sets(built, SAPPHIRE_RAPIDS) == ("AVX_VNNI", "AVX512", "AVX512_VNNI")
    full = built + ("AVX_VNNI", "AVX512", "AVX512_VNNI")
    assert unused_cpu_sets(full, SAPPHIRE_RAPIDS) == ()
    # AVX-512 needs all five of ggml's sub-sets: a CPU with only some of them gets none
    partial = SAPPHIRE_RAPIDS.replace(" avx512bw", "")
    assert "AVX512" not in unused_cpu_sets(built, partial)
    assert unused_cpu_sets(built, "no flags line") == ()


def test_the_installed_build_is_compared_with_this_machine(tmp_path: Path) -> None:
    built, _ = cpu_build(llama_cpp)
    assert built == built_cpu_features(llama_cpp.llama_print_system_info().decode())
    assert built, "llama.cpp reported no CPU feature at all"
    missing = tmp_path / "absent"
    assert cpu_build(llama_cpp, missing) == (built, ())


async def test_ready_names_the_build_and_a_slower_build_is_a_warning(
        tiny_model: Path, log_capture: LogCapture, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_worker(tiny_model):
        pass
    ready = [x for x in log_capture.lines() if x["action"] == "ready"]
    assert len(ready) == 1
    assert ready[0]["cpu_features"] == list(cpu_build(llama_cpp)[0])

    slower = (("AVX", "AVX2"), ("AVX512", "AVX512_VNNI"))
    monkeypatch.setattr(engine_model, "cpu_build", lambda _llama: slower)
    before = len(log_capture.lines())
    async with running_worker(tiny_model):
        pass
    lines = log_capture.lines()[before:]
    warned = [x for x in lines if x["level"] == "warning" and "cpu_sets_unused" in x]
    assert len(warned) == 1, warned
    assert warned[0]["cpu_sets_unused"] == ["AVX512", "AVX512_VNNI"]
    assert "just rebuild-llama" in warned[0]["human"]
    assert [x["cpu_features"] for x in lines if x["action"] == "ready"] == [["AVX", "AVX2"]]
