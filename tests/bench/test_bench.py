"""The benchmark: JSON figures consistent with each other, the multi-turn path, the error for a
missing dataset, and two torchrun-style processes gathering one report."""

import json
import os
import socket

import pytest
import torch.multiprocessing as mp

from dflash.bench.cli import main
from dflash.bench.report import acceptance_summary
from helpers import DATA_DIR


def bench_argv(target, drafter, out_dir, *extra):
    return ["--model", str(target), "--draft-model", str(drafter), "--device", "cpu", "--data-dir", str(DATA_DIR),
            "--max-new-tokens", "10", "--no-progress", "--output", str(out_dir / "results.json"), *extra]


def test_local_results_are_consistent(tiny_target_dir, tiny_drafter_dir, tmp_path, capsys):
    argv = bench_argv(tiny_target_dir, tiny_drafter_dir, tmp_path, "--dataset", "gsm8k", "mt-bench",
                      "--max-samples", "2", "--markdown", str(tmp_path / "table.md"), "--plots", str(tmp_path / "plots"),
                      "--peers", "hf")
    assert main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["config"]["block_size"] == 4 and result["config"]["max_new_tokens"] == 10
    for name, turns in (("gsm8k", 1), ("mt-bench", 2)):
        s = result["datasets"][name]
        assert s["num_prompts"] == 2
        assert s["identical_outputs"] == 2                       # greedy: DFlash == plain decoding
        assert s["tau"] == pytest.approx(s["verify_tokens"] / s["verify_forwards"])
        assert 1 <= s["tau"] <= 4
        # every turn's prefill commits one token; every other token came from a verify forward
        assert s["verify_tokens"] == s["new_tokens"] - 2 * turns
        assert sum(s["acceptance_histogram"].values()) == s["verify_forwards"]
        assert s["speedup"] == pytest.approx(s["tokens_per_s"] / s["baseline_tokens_per_s"])
        assert s["tokens_per_s"] == pytest.approx(s["new_tokens"] / s["time_s"], rel=1e-3)
        assert len(s["per_position_acceptance"]) == 3
        # accepted drafts <= verified drafts <= full blocks (the budget shortens the last ones)
        assert s["verify_tokens"] - s["verify_forwards"] <= s["drafts_verified"] <= 3 * s["verify_forwards"]
        assert s["peers"]["hf"]["new_tokens"] == s["new_tokens"]  # transformers generate agrees on length
    records = [r for r in result["prompts"] if r["dataset"] == "mt-bench"]
    assert [r["turns"] for r in records] == [2, 2]
    for r in records:  # two answers each, both turns decoded identically by both methods
        assert len(r["dflash"]["output_ids"]) == 2 and r["dflash"]["output_ids"] == r["baseline"]["output_ids"]
        assert r["peers"]["hf"]["output_ids"] == r["dflash"]["output_ids"]
    assert result["datasets"]["overall"]["num_prompts"] == 4
    table = (tmp_path / "table.md").read_text()
    assert "| gsm8k |" in table and "| mt-bench |" in table and "2/2" in table
    assert (tmp_path / "plots" / "acceptance_histogram.png").stat().st_size > 1000
    assert "mt-bench" in capsys.readouterr().out


def test_mt_bench_second_turn_sees_the_first_answer(tiny_target_dir, tokenizer):
    """The second turn's prompt is the chat template over [user, own answer, user]."""
    import torch

    from dflash.bench.local import converse
    from dflash.decode.engine import GenerationStats

    seen = []

    def decode(ids):
        seen.append(ids[0].tolist())
        stats = GenerationStats()
        stats.new_tokens = tokenizer("Paris is nice.", add_special_tokens=False)["input_ids"]
        return stats

    run, _ = converse(decode, tokenizer, ["first question", "second question"], False)
    second = tokenizer.decode(seen[1])
    assert "first question" in second and "Paris is nice." in second and second.rstrip().endswith("assistant")
    assert len(run.output_ids) == 2


def test_missing_dataset_names_all_three_places(tmp_path, capsys):
    assert main(["--dataset", "no-such-set", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no-such-set" in err and "no file" in err and str(tmp_path) in err and "Hub" in err


def test_bad_flags_are_refused(capsys):
    assert main(["--concurrency", "two"]) == 2
    assert "--concurrency" in capsys.readouterr().err
    assert main(["--backend", "vllm"]) == 2
    assert "--base-url" in capsys.readouterr().err


def _worker(rank, world, port, argv):
    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert main(argv) == 0


def test_two_processes_shard_prompts_and_gather_one_report(tiny_target_dir, tiny_drafter_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = bench_argv(tiny_target_dir, tiny_drafter_dir, tmp_path, "--dataset", "gsm8k", "--max-samples", "3")
    mp.spawn(_worker, args=(2, port, argv), nprocs=2, join=True)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["config"]["world_size"] == 2
    assert sorted(r["index"] for r in result["prompts"]) == [0, 1, 2]
    assert result["datasets"]["gsm8k"]["num_prompts"] == 3
    assert result["datasets"]["gsm8k"]["identical_outputs"] == 3


def test_per_position_acceptance_counts_only_drafts_that_were_verified():
    # block 4; steps committed 1, 2, 4, 1 tokens after verifying 3, 3, 3 and 0 drafts (a
    # threshold sent none in the last step: that is not a rejection of draft 1)
    s = acceptance_summary([1, 2, 4, 1], 4, drafted=[3, 3, 3, 0])
    assert s["per_position_acceptance"] == [0.6667, 0.5, 1.0]  # rounded to 4 places
    assert s["drafts_verified"] == 9 and s["tau"] == 2.0
    # without the drafted counts every step is read as a full block
    assert acceptance_summary([1, 2, 4, 1], 4)["per_position_acceptance"][0] == 0.5
    # a short block: draft 2 was never sent in the second step, so it does not count there
    s = acceptance_summary([2, 3], 4, drafted=[1, 3])
    assert s["per_position_acceptance"] == [1.0, 1.0, 0.0]
