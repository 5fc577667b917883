"""How raw llama.cpp's decode step scales with the number of sequences in it.

One context (``kv_unified``, like orcd's), each sequence holding a 32-token prompt; then
rounds of 16 steps at 1, 2, 4 and 8 sequences (one token each), the levels alternating
within every round so that a drift of the machine touches them all alike. It measures the
ceiling of batching on this machine and build, with no server in the way: the README's
"Building for this CPU" table compares an AVX2 and an AVX-512 build of llama-cpp-python
with it (run it once from each environment, alternating).

    .venv/bin/python bench/decode_scaling.py [--model PATH] [--rounds 6] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import llama_cpp

from orcd.engine.model import cpu_build

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (1, 2, 4, 8)
PROMPT_TOKENS = 32
STEPS = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(args.model).encode(),
                                                 llama_cpp.llama_model_default_params())
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 4096, 512, 512, max(LEVELS)
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.kv_unified = True
    ctx = llama_cpp.llama_init_from_model(model, cp)
    batch = llama_cpp.llama_batch_init(512, 0, max(LEVELS))

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, position, sequence, wants logits) items."""
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    for seq in range(max(LEVELS)):  # a distinct short prompt in every sequence
        decode([(100 + seq * 7 + i, i, seq, i == PROMPT_TOKENS - 1)
                for i in range(PROMPT_TOKENS)])
    pos = [PROMPT_TOKENS] * max(LEVELS)
    steps: dict[int, list[float]] = {n: [] for n in LEVELS}
    for _ in range(args.rounds):
        for n in LEVELS:
            t0 = time.perf_counter()
            for _ in range(STEPS):
                decode([(200, pos[seq], seq, True) for seq in range(n)])
                for seq in range(n):
                    pos[seq] += 1
            steps[n].append((time.perf_counter() - t0) / STEPS)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)

    print("llama.cpp built with:", " ".join(cpu_build(llama_cpp)[0]))
    one = statistics.median(steps[1])
    for n in LEVELS:
        step = statistics.median(steps[n])
        print(f"{n} sequences: step {step * 1e3:.1f} ms (range {min(steps[n]) * 1e3:.1f}-"
              f"{max(steps[n]) * 1e3:.1f}), {n / step:.1f} tok/s, x{one * n / step:.2f}")


if __name__ == "__main__":
    main()
