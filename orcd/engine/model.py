"""Loading a GGUF model through llama-cpp-python, shared by every engine.

Everything here runs once per process or once per model: the GGUF check, llama.cpp's log
callback, the C abort callback, loading the weights (with a progress callback that can
cancel the load), reading the model's metadata into :class:`ModelInfo`, and comparing the
instruction sets llama.cpp was built with against the ones this CPU has.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .types import ModelInfo

GGUF_MAGIC = b"GGUF"

# general.file_type -> name (llama.cpp's enum llama_ftype)
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 32: "BF16",
}


def check_gguf(path: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is a readable GGUF file."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model {str(path)!r}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"model {str(path)!r} is not a GGUF file (magic {magic!r})")


# llama.cpp logs through one process-wide callback; orcd forwards warnings and errors to its
# own log (and never redirects file descriptors, which would swallow other threads' lines).
GGML_LOG_WARN = 3  # enum ggml_log_level in ggml.h: NONE, DEBUG, INFO, WARN, ERROR, CONT
GGML_LOG_ERROR = 4
# Messages that are part of normal operation, so neither warnings nor errors:
_EXPECTED_MARKERS = (
    # an aborted decode (GGML_STATUS_ABORTED is 1, llama_decode returns 2): a cancel at work
    "failed with error 1",
    "compute status: 1",
    "failed to decode, ret = 2",
    "removing memory module entries",
    # the batch engine's one context holds every slot's sequence (kv_unified), so its total
    # size exceeds the training context; each sequence's positions stay below n_ctx
    "possible training context overflow",
    # the batch engine asks for a full-size SWA cache on purpose (prefix reuse needs it)
    "using full-size SWA cache",
)
_log_sink: list[Callable[[int, str], None]] = []  # (logging level, message)


def install_llama_log(on_llama_log: Callable[[int, str], None] | None) -> None:
    """Send llama.cpp's warnings and errors to ``on_llama_log(level, message)``."""
    import llama_cpp

    _log_sink[:] = [on_llama_log] if on_llama_log else []
    if "_llama_log_cb" in globals():
        return

    @llama_cpp.llama_log_callback
    def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level in (GGML_LOG_WARN, GGML_LOG_ERROR) and _log_sink:
            message = text.decode("utf-8", "replace").strip()
            if any(marker in message for marker in _EXPECTED_MARKERS):
                py_level = logging.DEBUG
            elif level == GGML_LOG_ERROR:
                py_level = logging.ERROR
            else:
                py_level = logging.WARNING
            _log_sink[0](py_level, message)

    globals()["_llama_log_cb"] = _on_log  # keep the C callback alive
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))


_C_LIBS: list[ctypes.CDLL] = []


def c_abort_callback() -> Any:
    """orcd's C abort callback (orcd/_abortflag.c), or None if it was not built.

    It reads one byte (its ``data`` pointer) without taking the GIL, so llama.cpp can poll
    it after every graph node for free.
    """
    import llama_cpp

    try:
        from .. import _abortflag  # type: ignore[attr-defined]
    except ImportError:
        return None
    lib = ctypes.CDLL(_abortflag.__file__)
    _C_LIBS.append(lib)  # keep the library loaded as long as the pointer lives
    address = ctypes.cast(lib.orcd_abort_requested, ctypes.c_void_p).value
    return llama_cpp.ggml_abort_callback(address) if address else None


def load_model(
    path: Path,
    *,
    gpu_device: int | None,
    on_progress: Callable[[float], bool | None] | None,
) -> Any:
    """Load ``path`` as an ``_internals.LlamaModel``.

    ``on_progress(fraction)`` returning False stops the load, which then raises
    ``ModelLoadError("model load was cancelled")``; any other failure raises
    :class:`ModelLoadError` naming the file.
    """
    check_gguf(path)
    import llama_cpp
    from llama_cpp import _internals

    mparams = llama_cpp.llama_model_default_params()
    if gpu_device is None:
        mparams.n_gpu_layers = 0
    else:
        mparams.n_gpu_layers = -1
        mparams.main_gpu = gpu_device
        mparams.split_mode = llama_cpp.LLAMA_SPLIT_MODE_NONE
    cancelled = False
    if on_progress is not None:

        def _progress(fraction: float, _user: ctypes.c_void_p) -> bool:
            nonlocal cancelled
            try:
                go_on = on_progress(float(fraction)) is not False
            except BaseException:  # never let an exception unwind through llama.cpp
                go_on = False
            cancelled = cancelled or not go_on
            return go_on

        progress_cb = llama_cpp.llama_progress_callback(_progress)
        mparams.progress_callback = progress_cb
    try:
        return _internals.LlamaModel(path_model=str(path), params=mparams, verbose=True)
    except ValueError as exc:
        if cancelled:
            raise ModelLoadError("model load was cancelled") from None
        raise ModelLoadError(f"llama.cpp could not load {str(path)!r}: {exc}") from None


def token_text(model: Any, token: int) -> str:
    """The text of a special token (``<bos>``), or '' when the model has none."""
    if token < 0:
        return ""
    import llama_cpp

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, True)
    # (llama-cpp-python's LlamaModel.token_to_piece returns its whole buffer, NULs and all)
    return buf.raw[: max(n, 0)].decode("utf-8", "replace")


# x86 instruction sets whose kernels make llama.cpp's CPU steps faster: the name
# llama_print_system_info() gives each, and the /proc/cpuinfo flags a CPU needs for it
X86_SETS = {
    "AVX2": ("avx2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VNNI": ("avx512f", "avx512_vnni"),
}


def built_cpu_features(system_info: str) -> tuple[str, ...]:
    """The CPU features in llama.cpp's ``llama_print_system_info()`` text that are on
    ("CPU : SSE3 = 1 | AVX2 = 1 | ..."; other backends' parts are ignored)."""
    part = system_info.split("CPU :", 1)[1] if "CPU :" in system_info else ""
    part = part.split("\n", 1)[0]
    on = []
    for item in part.split("|"):
        name, _, value = item.partition("=")
        if value.strip() == "1":
            on.append(name.strip())
    return tuple(on)


def unused_cpu_sets(built: tuple[str, ...], cpuinfo: str) -> tuple[str, ...]:
    """The instruction sets of :data:`X86_SETS` that the CPU (``/proc/cpuinfo`` text) has
    and llama.cpp was not built with: a rebuild for this machine would use them."""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return tuple(name for name, needs in X86_SETS.items()
                 if name not in built and flags.issuperset(needs))


def cpu_build(llama_cpp: Any, cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[
        tuple[str, ...], tuple[str, ...]]:
    """(the CPU features llama.cpp was built with, the sets this CPU has that it lacks)."""
    built = built_cpu_features(llama_cpp.llama_print_system_info().decode(errors="replace"))
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:  # not Linux: nothing to compare with
        return built, ()
    return built, unused_cpu_sets(built, text)


def model_info(model: Any, path: Path, *, n_ctx: int, gpu_device: int | None) -> ModelInfo:
    """What /health, the logs and the chat templates need to know about a loaded model."""
    import llama_cpp

    meta = model.metadata()
    built, unused = cpu_build(llama_cpp)
    return ModelInfo(
        name=meta.get("general.name") or path.name,
        path=str(path),
        quant_kind=FILE_TYPES.get(int(meta.get("general.file_type", -1)), "unknown"),
        tokenizer_kind=meta.get("tokenizer.ggml.model", "unknown"),
        vocab_size=model.n_vocab(),
        context_length=n_ctx,
        n_ctx_train=model.n_ctx_train(),
        device="cpu" if gpu_device is None else f"cuda:{gpu_device}",
        size_bytes=model.size(),
        chat_template=meta.get("tokenizer.chat_template"),
        bos_text=token_text(model, model.token_bos()),
        eos_text=token_text(model, model.token_eos()),
        cpu_features=built,
        cpu_sets_unused=unused,
    )


def effective_n_ctx(model: Any, n_ctx: int) -> int:
    """``n_ctx``, or the model's training context when that is smaller."""
    n_ctx_train = int(model.n_ctx_train())
    return min(n_ctx, n_ctx_train) if n_ctx_train > 0 else n_ctx
