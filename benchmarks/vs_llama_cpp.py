"""dflash's native GGUF runtime against llama.cpp's own server on the same GGUF, prompt by prompt.

Four methods decode every prompt (GSM8K test questions in the chat template), greedy, the same
number of new tokens with no stop token, in an order that rotates from prompt to prompt so that
the machine's drift cancels out:
  - llama.cpp plain: `llama-server` built natively (scripts/llamacpp_build.sh);
  - llama.cpp + DFlash: the same server with the shipped drafter, exported by
    `dflash export --for llama.cpp`, `--spec-type draft-dflash --spec-draft-n-max BLOCK-1`;
  - dflash plain and dflash DFlash: the default CPU path for a GGUF target (the native runtime),
    the shipped drafter, block 4, the default draft threshold for the kernels in use.
Decode tokens/s is new tokens over the time after the prompt (llama-server's `predicted_ms`;
dflash's decode time), prefill tokens/s the prompt's tokens over its time. Then, the same runtime
alternating block sizes round by round: the cost of verifying B tokens against one, and of a draft
pass. Every DFlash output is checked against the same runtime's plain output.

    bash scripts/llamacpp_build.sh                       # once, ~10 minutes on 2 cores
    python benchmarks/vs_llama_cpp.py --prompts 8 --new-tokens 128
    DFLASH_ISA=avx2 python benchmarks/vs_llama_cpp.py    # dflash's AVX2 kernels on an AVX-512 CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from dflash import DFlashDraftModel, generate, load_target
from dflash.datasets import eval_prompts
from dflash.drafters import default_drafter_path
from dflash.cli.common import draft_threshold, prepare_drafter
from dflash.decode.step import Speculator
from dflash.runtime.loader import chat_input_ids, embedded_gguf_path

REPO = Path(__file__).resolve().parent.parent


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    isa = "AVX-512 VNNI" if "avx512_vnni" in info else "AVX-512" if "avx512f" in info else "AVX2" if "avx2" in info else "?"
    return f"{model}, {os.cpu_count()} cores, {isa}"


class LlamaServer:
    """A llama-server on 127.0.0.1 decoding token ids greedily (started, awaited, stopped by PID)."""

    def __init__(self, binary: Path, model: Path, port: int, threads: int, extra: list[str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        self.process = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                                         "-t", str(threads), "-tb", str(threads), "-c", "4096", "-np", "1", *extra],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(600):
            if self.process.poll() is not None:
                raise SystemExit(f"llama-server exited; see {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise SystemExit(f"llama-server did not start; see {log}")

    def complete(self, ids: list[int], n: int) -> dict:
        body = json.dumps({"prompt": ids, "n_predict": n, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                           "cache_prompt": False, "return_tokens": True}).encode()
        request = urllib.request.Request(self.url + "/completion", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as reply:
            return json.loads(reply.read())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def step_costs(runtime, drafter, prompt: torch.Tensor, blocks: tuple[int, ...], rounds: int = 7) -> dict[str, float]:
    """Median ms of a step verifying B tokens (each B once per round, rounds alternating), and of
    a draft pass after the prompt given the features of two new positions (a typical step)."""
    cache = runtime.new_cache()
    runtime.bind(drafter.config.target_layer_ids)
    row, out = runtime.prefill(cache, prompt)
    times: dict[int, list[float]] = {b: [] for b in blocks}
    for _ in range(rounds):
        for b in blocks:
            ids = prompt[:b].view(1, -1)
            for _ in range(3):
                start = time.perf_counter()
                runtime.step(cache, [row], ids)
                times[b].append(time.perf_counter() - start)
                runtime.commit(cache, [row], [0])
    draft: list[float] = []  # as decoding drafts (the runtime's own pass where it has one), two new positions a step
    speculator = Speculator(runtime, drafter, block_size=drafter.config.block_size)
    rec = speculator.start(prompt, max_new_tokens=runtime.info.max_positions)
    block = torch.full((1, drafter.config.block_size), drafter.config.mask_token_id)
    block[0, 0] = rec.anchor
    two = rec.context[-2:]
    speculator.drafts.draft([rec], block)  # (the prompt's features)
    for _ in range(rounds * 3):
        rec.context = two
        start = time.perf_counter()
        speculator.drafts.draft([rec], block)
        draft.append(time.perf_counter() - start)
    costs = {f"verify {b}": 1000 * statistics.median(times[b]) for b in blocks}
    costs["draft pass"] = 1000 * statistics.median(draft)
    return costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8, help="first N GSM8K test prompts (default 8)")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    p.add_argument("--block-size", type=int, default=4, help="DFlash block size (default 4)")
    p.add_argument("--draft-threshold", type=float, default=None,
                   help="dflash's draft threshold (default: the product's for the kernels in use)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    p.add_argument("--port", type=int, default=8093, help="first of two local ports for llama-server")
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $DFLASH_DATA_DIR)")
    p.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # (the native runtime takes this many, then leaves torch one)
    n = args.new_tokens

    built = Path(subprocess.run(["bash", str(REPO / "scripts" / "llamacpp_build.sh")], check=True,
                                capture_output=True, text=True).stdout.strip())
    gguf = embedded_gguf_path()
    runtime, tokenizer = load_target(device="cpu")
    drafter = prepare_drafter(DFlashDraftModel.from_pretrained(str(default_drafter_path()), device="cpu"), runtime)
    print(f"cpu: {cpu_description()}; dflash runtime: {type(runtime).__name__} "
          f"{getattr(runtime, 'isa', '')}; llama.cpp: {built}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="vs-llama-cpp-"))
    exported = work / "drafter.gguf"
    subprocess.run([sys.executable, "-m", "dflash.cli.main", "export", "--for", "llama.cpp", str(exported)],
                   check=True, capture_output=True)
    plain_server = LlamaServer(built / "build/bin/llama-server", gguf, args.port, args.threads, [], work / "plain.log")
    spec_server = LlamaServer(built / "build/bin/llama-server", gguf, args.port + 1, args.threads,
                              ["-md", str(exported), "--spec-type", "draft-dflash",
                               "--spec-draft-n-max", str(args.block_size - 1)], work / "dflash.log")
    try:
        methods = ["llama.cpp plain", "llama.cpp DFlash", "dflash plain", "dflash DFlash"]
        decode = {m: [0.0, 0] for m in methods}   # seconds, tokens
        prefill = {m: [0.0, 0] for m in methods}
        outputs: dict[str, list[list[int]]] = {m: [] for m in methods}
        taus: dict[str, list[float]] = {"llama.cpp DFlash": [], "dflash DFlash": []}
        questions = [turns[0] for turns in eval_prompts("gsm8k", args.data_dir, limit=args.prompts)]
        threshold = draft_threshold(args, runtime)
        for i, question in enumerate(questions):
            ids = chat_input_ids(tokenizer, question)
            order = methods[i % 4:] + methods[: i % 4]
            for method in order:
                if method.startswith("llama.cpp"):
                    server = plain_server if method.endswith("plain") else spec_server
                    reply = server.complete(ids, n)
                    t = reply["timings"]
                    decode[method][0] += t["predicted_ms"] / 1000
                    decode[method][1] += t["predicted_n"]
                    prefill[method][0] += t["prompt_ms"] / 1000
                    prefill[method][1] += t["prompt_n"]
                    outputs[method].append(reply.get("tokens", []))
                    if "draft_n" in t:  # acceptance length: tokens per target forward
                        steps = t["predicted_n"] - t["draft_n_accepted"]
                        taus[method].append(t["predicted_n"] / max(steps, 1))
                else:
                    spec = method.endswith("DFlash")
                    stats = generate(runtime, drafter if spec else None, torch.tensor([ids]), max_new_tokens=n,
                                     block_size=args.block_size if spec else 1,
                                     draft_threshold=threshold if spec else 0.0)
                    decode[method][0] += stats.decode_time
                    decode[method][1] += stats.num_new_tokens
                    prefill[method][0] += stats.prefill_time
                    prefill[method][1] += stats.prompt_tokens
                    outputs[method].append(stats.new_tokens)
                    if spec:
                        taus[method].append(stats.tau)
            print(f"prompt {i + 1}/{len(questions)} done", flush=True)
        costs = step_costs(runtime, drafter, torch.tensor(chat_input_ids(tokenizer, questions[0])), (1, 2, 4, 8, 16))
    finally:
        plain_server.stop()
        spec_server.stop()

    rate = {m: decode[m][1] / decode[m][0] for m in methods}
    pre = {m: prefill[m][1] / prefill[m][0] for m in methods}
    base, base_pre = rate["llama.cpp plain"], pre["llama.cpp plain"]
    same_llama = sum(a == b for a, b in zip(outputs["llama.cpp plain"], outputs["llama.cpp DFlash"]))
    same_ours = sum(a == b for a, b in zip(outputs["dflash plain"], outputs["dflash DFlash"]))
    print(f"\n{len(questions)} GSM8K prompts x {n} new tokens, greedy, {args.threads} threads, interleaved, "
          f"dflash's draft threshold {threshold:g}; "
          f"{cpu_description()}\n")
    print("| method | decode tok/s | vs llama.cpp plain | prefill tok/s | vs llama.cpp | tau |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        tau = f"{statistics.mean(taus[m]):.2f}" if taus.get(m) else ""
        print(f"| {m} | {rate[m]:.1f} | {rate[m] / base:.2f}x | {pre[m]:.0f} | {pre[m] / base_pre:.2f}x | {tau} |")
    print(f"\nidentical to the same runtime's plain decoding: llama.cpp {same_llama}/{len(questions)}, "
          f"dflash {same_ours}/{len(questions)}")
    one = costs["verify 1"]
    print("dflash step costs (median ms): " + ", ".join(
        f"{k} {v:.2f}" + (f" ({v / one:.2f}x)" if k.startswith("verify") else "") for k, v in costs.items()))
    if args.output:
        Path(args.output).write_text(json.dumps({"cpu": cpu_description(), "decode": rate, "prefill": pre,
                                                 "tau": {m: statistics.mean(v) for m, v in taus.items() if v},
                                                 "identical": {"llama.cpp": same_llama, "dflash": same_ours},
                                                 "prompts": len(questions), "new_tokens": n,
                                                 "step_costs_ms": costs}, indent=2))


if __name__ == "__main__":
    main()
