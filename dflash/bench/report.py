"""Turning benchmark records into figures: per-dataset summaries, a rich table, JSON, Markdown
and PNG plots. Every figure is computed here, once, from the raw records that the JSON keeps.

tau is tokens committed per target forward while decoding (accepted drafts + the bonus token),
averaged over verify steps; the prefill's first token is not counted. speedup is end-to-end
tokens/s (prefill included) of DFlash over the baseline on the same prompts.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from dflash.bench.http import RequestRecord
from dflash.bench.local import PromptRecord


def _rate(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def acceptance_summary(lengths: list[int], block_size: int, drafted: list[int] | None = None) -> dict[str, Any]:
    """tau, the histogram of acceptance lengths and the per-position acceptance rate: of the
    steps that verified a draft k and accepted drafts 1..k-1, the share that accepted draft k too.

    `drafted` (drafts verified per step) matters under a draft threshold, which sends short
    blocks or none: a draft never sent is not a rejected one. Without it every step is taken
    to have verified a full block.
    """
    histogram = dict(sorted(Counter(lengths).items()))
    drafted = drafted or [block_size - 1] * len(lengths)
    per_position = []
    for k in range(1, block_size):
        reached = sum(1 for n, d in zip(lengths, drafted, strict=True) if n - 1 >= k - 1 and d >= k)
        accepted = sum(1 for n, d in zip(lengths, drafted, strict=True) if n - 1 >= k and d >= k)
        per_position.append(round(accepted / reached, 4) if reached else None)
    return {"tau": sum(lengths) / len(lengths) if lengths else 0.0, "verify_forwards": len(lengths),
            "verify_tokens": sum(lengths), "acceptance_histogram": {str(k): v for k, v in histogram.items()},
            "drafts_verified": sum(drafted), "per_position_acceptance": per_position}


def summarize_local(records: list[PromptRecord], block_size: int) -> dict[str, Any]:
    """Per dataset and overall: tau, speedup, tokens/s of both, TTFT, identical outputs, peers."""
    groups: dict[str, list[PromptRecord]] = {}
    for r in records:
        groups.setdefault(r.dataset, []).append(r)
    out = {name: _summary(rs, block_size) for name, rs in groups.items()}
    if len(groups) > 1:
        out["overall"] = _summary(records, block_size)
    return out


def _summary(rs: list[PromptRecord], block_size: int) -> dict[str, Any]:
    lengths = [n for r in rs for n in r.dflash["acceptance_lengths"]]
    drafted = [n for r in rs for n in r.dflash.get("draft_lengths", [])]  # older records lack it
    tokens = sum(r.dflash["new_tokens"] for r in rs)
    seconds = sum(r.dflash["time_s"] for r in rs)
    s: dict[str, Any] = {"num_prompts": len(rs), "new_tokens": tokens, "time_s": round(seconds, 6),
                         **acceptance_summary(lengths, block_size, drafted),
                         "tokens_per_s": _rate(tokens, seconds),
                         "ttft_ms": 1000 * sum(r.dflash["ttft_s"] for r in rs) / len(rs)}
    if all(r.baseline is not None for r in rs):
        base_tokens = sum(r.baseline["new_tokens"] for r in rs)
        base_seconds = sum(r.baseline["time_s"] for r in rs)
        s.update(baseline_new_tokens=base_tokens, baseline_time_s=round(base_seconds, 6),
                 baseline_tokens_per_s=_rate(base_tokens, base_seconds),
                 baseline_ttft_ms=1000 * sum(r.baseline["ttft_s"] for r in rs) / len(rs),
                 identical_outputs=sum(bool(r.identical) for r in rs))
        s["speedup"] = s["tokens_per_s"] / s["baseline_tokens_per_s"] if s["baseline_tokens_per_s"] else 0.0
    peers = sorted({name for r in rs for name in r.peers})
    if peers:
        s["peers"] = {}
        for name in peers:
            t = sum(r.peers[name]["new_tokens"] for r in rs)
            sec = sum(r.peers[name]["time_s"] for r in rs)
            s["peers"][name] = {"tokens_per_s": _rate(t, sec), "new_tokens": t, "time_s": round(sec, 6),
                                "dflash_speedup_over": s["tokens_per_s"] / _rate(t, sec) if sec and t else 0.0}
    return s


def summarize_http(level: dict[str, Any]) -> dict[str, Any]:
    """Throughput and latency percentiles of one concurrency level."""
    records: list[RequestRecord] = level["records"]
    tokens = sum(r.completion_tokens for r in records)
    ttft = [1000 * r.ttft_s for r in records]
    itl = [1000 * x for r in records for x in r.itl_s]
    latency = [r.latency_s for r in records]
    usage_tau = [x for r in records for x in r.acceptance_lengths]
    tau, source = _http_tau(records, usage_tau, level.get("metrics_tau"))
    drafted, accepted = sum(r.draft_tokens for r in records), sum(r.draft_accepted for r in records)
    return {
        "concurrency": level["concurrency"], "num_requests": len(records), "completion_tokens": tokens,
        "wall_s": round(level["wall_s"], 3), "tokens_per_s": _rate(tokens, level["wall_s"]),
        "per_request_tokens_per_s": sum(_rate(r.completion_tokens, r.latency_s) for r in records) / len(records),
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p90": percentile(ttft, 90), "ttft_ms_p99": percentile(ttft, 99),
        "itl_ms_p50": percentile(itl, 50), "itl_ms_p90": percentile(itl, 90), "itl_ms_p99": percentile(itl, 99),
        "latency_s_p50": percentile(latency, 50), "latency_s_p99": percentile(latency, 99),
        "tau": tau, "tau_source": source,
        "draft_tokens": drafted or None, "draft_accepted": accepted if drafted else None,
        "draft_acceptance_rate": accepted / drafted if drafted else None,
    }


def _http_tau(records: list[RequestRecord], usage_tau: list[float],
              metrics_tau: float | None) -> tuple[float | None, str | None]:
    """The server's acceptance length and where it came from, the most exact source first:
    per-response usage, the server's counters, then llama-server's per-response timings (tokens
    decoded per target forward; a forward that had nothing to verify, near max_tokens, counts too,
    so it can read slightly below llama.cpp's own mean over verify steps)."""
    if usage_tau:
        return sum(usage_tau) / len(usage_tau), "usage"
    if metrics_tau is not None:
        return metrics_tau, "metrics"
    decoded = sum(r.timed_tokens for r in records)
    accepted = sum(r.draft_accepted for r in records)
    if decoded > accepted and any(r.draft_tokens for r in records):
        return decoded / (decoded - accepted), "timings"
    return None, None


# --- output --------------------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


LOCAL_COLUMNS = [("dataset", None), ("prompts", "num_prompts"), ("tau", "tau"), ("dflash tok/s", "tokens_per_s"),
                 ("plain tok/s", "baseline_tokens_per_s"), ("speedup", "speedup"), ("TTFT ms", "ttft_ms"),
                 ("identical", "identical_outputs")]
HTTP_COLUMNS = [("concurrency", "concurrency"), ("requests", "num_requests"), ("tok/s", "tokens_per_s"),
                ("speedup", "speedup"), ("TTFT p50 ms", "ttft_ms_p50"), ("TTFT p99 ms", "ttft_ms_p99"),
                ("ITL p50 ms", "itl_ms_p50"), ("ITL p99 ms", "itl_ms_p99"), ("tau", "tau"),
                ("accepted", "draft_acceptance_rate")]


def local_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, s in summary.items():
        row = [name] + [_fmt(s.get(key)) for _, key in LOCAL_COLUMNS[1:]]
        if "identical_outputs" in s:
            row[-1] = f"{s['identical_outputs']}/{s['num_prompts']}"
        rows.append(row)
    return rows


def http_rows(levels: list[dict[str, Any]]) -> list[list[str]]:
    return [[_fmt(s.get(key)) for _, key in HTTP_COLUMNS] for s in levels]


def print_table(title: str, columns: list[str], rows: Iterable[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("dataset",) else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def markdown_table(columns: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=_jsonable))
    tmp.replace(path)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "__dataclass_fields__"):
        from dataclasses import asdict
        return asdict(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def plot_histograms(summary: dict[str, Any], path: str | Path) -> Path:
    """One bar chart of the acceptance-length distribution per dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary if n != "overall"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        hist = {int(k): v for k, v in summary[name]["acceptance_histogram"].items()}
        total = sum(hist.values()) or 1
        ax.bar(list(hist), [v / total for v in hist.values()], color="#3b7dd8")
        ax.set_title(f"{name} (tau {summary[name]['tau']:.2f})", fontsize=9)
        ax.set_xlabel("tokens per verify step")
    axes[0][0].set_ylabel("share of steps")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_concurrency(levels: list[dict[str, Any]], path: str | Path) -> Path:
    """Throughput (and speedup over the baseline server, when measured) versus concurrency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["concurrency"] for s in levels]
    with_speedup = all(s.get("speedup") is not None for s in levels)
    fig, axes = plt.subplots(1, 2 if with_speedup else 1, figsize=(9 if with_speedup else 4.5, 3.2), squeeze=False)
    ax = axes[0][0]
    ax.plot(xs, [s["tokens_per_s"] for s in levels], marker="o", label="dflash")
    if all(s.get("baseline_tokens_per_s") for s in levels):
        ax.plot(xs, [s["baseline_tokens_per_s"] for s in levels], marker="s", label="baseline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.legend()
    if with_speedup:
        ax = axes[0][1]
        ax.plot(xs, [s["speedup"] for s in levels], marker="o", color="#d8563b")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("speedup")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
