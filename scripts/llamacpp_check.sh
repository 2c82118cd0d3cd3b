#!/usr/bin/env bash
# Hand-over check: llama.cpp's llama-server serves the embedded SmolLM2-135M-Instruct GGUF with the
# drafter this package ships, exported by `dflash export --for llama.cpp`, and
#   1. greedy answers through llama.cpp with and without the drafter are identical;
#   2. llama.cpp's mean acceptance length (its /metrics counters) is within 10 % of this package's
#      own tau on the same prompts (`dflash bench` on the same Q4_1 GGUF through dflash's native
#      runtime, the same block size, every block verified whole as llama.cpp does).
# It prints tokens/s of llama.cpp plain and with DFlash, the acceptance figures, and llama-bench's
# cost of a forward of 1, 2, 4 and 8 tokens (why DFlash in llama.cpp is slower than plain on a CPU);
# writes every figure to $OUT_DIR, stops each server by PID and exits non-zero if a check fails.
#
# Needs: this package installed (README), cmake and a C++ compiler, network access to PyPI for the
# first run (the llama-cpp-python sdist, built once by scripts/llamacpp_build.sh, ~10 minutes on 2
# cores); then ~3 minutes. Not run in CI; run it after changing the drafter or the GGUF export:
#     bash scripts/llamacpp_check.sh        # PROMPTS=8 MAX_TOKENS=128 PORT=8012 THREADS=1 by default
# One llama.cpp thread by default: ggml's results depend on its thread count and batch shape, so at a
# near-tie llama.cpp's batched verify can part from its own plain decoding (1 of 8 answers with
# THREADS=2 on the 2-core machine, none with 1; docs/scaling.md). THREADS=2 measures speed instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PROMPTS="${PROMPTS:-8}"
MAX_TOKENS="${MAX_TOKENS:-128}"
PORT="${PORT:-8012}"
THREADS="${THREADS:-1}"
OUT_DIR="${OUT_DIR:-runs/llamacpp_check}"
export DFLASH_DATA_DIR="${DFLASH_DATA_DIR:-$(cd .. && pwd)/shared/datasets}"
mkdir -p "$OUT_DIR"

# --- llama.cpp, built once from the llama-cpp-python sdist (cached) --------------------------------
LLAMACPP="$(bash scripts/llamacpp_build.sh)"
BIN="$LLAMACPP/build/bin"
echo "== llama.cpp from llama-cpp-python $(basename "$LLAMACPP"): $BIN"
"$BIN/llama-server" --version 2>&1 | grep -i "version" || true
echo "== machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(grep -q avx512f /proc/cpuinfo && echo AVX-512 || echo 'no AVX-512'); $(uptime | sed 's/.*load/load/')"

# --- what to serve: the embedded target GGUF and the exported drafter -------------------------------
TARGET="$(python -c 'from dflash.runtime.loader import embedded_gguf_path; print(embedded_gguf_path())')"
DRAFTER="$OUT_DIR/drafter.gguf"
dflash export --for llama.cpp "$DRAFTER" | tee "$OUT_DIR/export.txt"
BLOCK="$(python -c "import gguf, sys; print(gguf.GGUFReader(sys.argv[1]).fields['dflash.block_size'].contents())" "$DRAFTER")"
# the same weights as a folder proposing from the whole vocabulary, as llama.cpp does, for our own tau
dflash export --for vllm "$OUT_DIR/drafter-folder" >/dev/null
BASE="http://127.0.0.1:$PORT"

SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap stop_server EXIT

serve() {  # serve NAME [extra llama-server flags...]: start, wait for /health
    local name="$1"; shift
    echo "== llama-server $name on $BASE"
    "$BIN/llama-server" -m "$TARGET" --alias smollm2 --host 127.0.0.1 --port "$PORT" -t "$THREADS" \
        -c 2048 -np 1 --metrics "$@" >"$OUT_DIR/llama-$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 300); do
        if curl -sf "$BASE/health" >/dev/null; then return 0; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "llama-server $name exited; last lines of $OUT_DIR/llama-$name.log:"; tail -20 "$OUT_DIR/llama-$name.log"
            exit 1
        fi
        sleep 1
    done
    echo "llama-server $name did not become healthy in 300 s"; exit 1
}

bench_http() {  # bench_http NAME
    dflash bench --backend llamacpp --base-url "$BASE" --model smollm2 --dataset gsm8k --max-samples "$PROMPTS" \
        --max-new-tokens "$MAX_TOKENS" --concurrency 1 --output "$OUT_DIR/llama-$1.json" --no-progress
}

serve plain
bench_http plain
stop_server

serve dflash -md "$DRAFTER" --spec-type draft-dflash --spec-draft-n-max "$((BLOCK - 1))"
bench_http dflash
stop_server

echo "== this package, same prompts, the same drafter (whole vocabulary, block $BLOCK, whole blocks, the native runtime on the same GGUF)"
dflash bench --dataset gsm8k --max-samples "$PROMPTS" --max-new-tokens "$MAX_TOKENS" --cpu-weights gguf --draft-threshold 0 \
    --draft-model "$OUT_DIR/drafter-folder" --block-size "$BLOCK" --no-baseline --output "$OUT_DIR/dflash.json" --no-progress

echo "== llama-bench: one forward of 1, 2, 4, 8 tokens on the target (prompt processing, tok/s)"
"$BIN/llama-bench" -m "$TARGET" -t "$THREADS" -p 1,2,4,8 -n 0 -r 10 -o json >"$OUT_DIR/llama-bench.json" 2>"$OUT_DIR/llama-bench.log"
echo "== $(uptime | sed 's/.*load/load/') (other work on these cores slows every figure above)"

python - "$OUT_DIR" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
plain, spec, local = (json.loads((out / f).read_text()) for f in ("llama-plain.json", "llama-dflash.json", "dflash.json"))


def level(result):
    return result["levels"][0]


def texts(result):
    return {(r["dataset"], r["index"]): r["texts"] for r in result["requests"][0]["records"]}


a, b = texts(plain), texts(spec)
same = sum(a[k] == b[k] for k in a)
p, s = level(plain), level(spec)
tau, ours = s["tau"], local["datasets"]["gsm8k"]["tau"]
print(f"llama.cpp plain  : {p['tokens_per_s']:.2f} tok/s")
print(f"llama.cpp DFlash : {s['tokens_per_s']:.2f} tok/s ({s['tokens_per_s'] / p['tokens_per_s']:.2f}x plain), "
      f"mean acceptance length {tau:.2f} (from {s['tau_source']}), drafts accepted "
      f"{s['draft_accepted']}/{s['draft_tokens']}")
print(f"dflash (local)   : tau {ours:.2f} (native runtime on the same GGUF, block {local['config']['block_size']})")
rows = sorted(json.loads((out / "llama-bench.json").read_text()), key=lambda r: r["n_prompt"])
rate = {r["n_prompt"]: statistics.median(r["samples_ts"]) for r in rows}  # the median resists a busy neighbour
print("llama-bench      : " + ", ".join(
    f"pp{n} {ts:.1f} tok/s (a forward costs {n * rate[1] / ts:.2f}x one token)" for n, ts in rate.items()))
print(f"identical greedy answers, llama.cpp plain vs llama.cpp + DFlash: {same}/{len(a)}")
for k in a:  # where an answer parts: a near-tie that llama.cpp's batched verify breaks the other way?
    if a[k] != b[k]:
        x, y = "\x00".join(a[k]), "\x00".join(b[k])
        i = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        print(f"  prompt {k[1]} parts at character {i} after {x[max(0, i - 40):i]!r}: plain {x[i:i + 20]!r}, "
              f"DFlash {y[i:i + 20]!r}")
close = tau is not None and abs(tau - ours) <= 0.10 * ours
print(f"acceptance within 10 % of this package's tau: {close}")
ok = same == len(a) and close
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
