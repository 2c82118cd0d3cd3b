"""`dflash data` (regeneration, resume) and the tokenisation of training conversations."""

import gzip
import json

import pytest
import torch
from helpers import tiny_gguf

from dflash.cli.main import main
from dflash.decode.engine import generate
from dflash.errors import DFlashError
from dflash.train.data import append_rows, decode_rows, done_ids, find_pool, regenerate, select
from dflash.datasets import read_jsonl
from dflash.runtime.loader import load_target
from dflash.train.dataset import is_held_out, load_conversations, split_rows, tokenize_conversation


def test_loss_mask_covers_replies_and_their_end_of_turn(tokenizer):
    msgs = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, mask = tokenize_conversation(tokenizer, msgs)
    rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    supervised = ids[mask].tolist()
    assert tokenizer.decode(supervised) == "Hello! How can I help?<|im_end|>4<|im_end|>"
    # a reply cut by the token cap gets no end-of-turn label
    ids, mask = tokenize_conversation(tokenizer, msgs, finish="length")
    assert tokenizer.decode(ids[mask].tolist()) == "Hello! How can I help?<|im_end|>4"
    ids, mask = tokenize_conversation(tokenizer, msgs, max_len=10)
    assert len(ids) == len(mask) == 10


def test_held_out_split_is_deterministic():
    rows = [{"file": "a.jsonl.gz", "source": "s", "id": i} for i in range(5000)]
    held = [is_held_out(r, 0.01) for r in rows]
    assert held == [is_held_out(r, 0.01) for r in rows]
    assert 25 < sum(held) < 80
    assert not any(is_held_out(r, 0.0) for r in rows)


def test_repeat_weights_a_file_up_without_leaking_held_out_rows(tmp_path):
    for name, n in (("even.jsonl", 3000), ("odd.jsonl", 2000)):
        (tmp_path / name).write_text("".join(json.dumps({"id": i, "source": "s", "messages": []}) + "\n"
                                             for i in range(n)))
    rows = load_conversations([str(tmp_path / "*.jsonl")])
    plain_train, plain_held = split_rows(rows, 0.01)
    train, held = split_rows(rows, 0.01, [(str(tmp_path / "odd.jsonl"), "3")])
    assert held == plain_held and len(held) > 0
    odd = [r for r in plain_train if r["file"] == "odd.jsonl"]
    assert len(train) == len(plain_train) + 2 * len(odd)
    assert all(r not in held for r in train)  # every copy of a held-out row is held out too
    assert [r["id"] for r in train if r["file"] == "odd.jsonl"][:6] == [odd[0]["id"]] * 3 + [odd[1]["id"]] * 3
    for bad in ((str(tmp_path / "odd.jsonl"), "0"), (str(tmp_path / "odd.jsonl"), "two")):
        with pytest.raises(DFlashError, match="whole number"):
            split_rows(rows, 0.01, [bad])
    (tmp_path / "other.jsonl").write_text("")
    with pytest.raises(DFlashError, match="not among the --data files"):
        split_rows(rows, 0.01, [(str(tmp_path / "other.jsonl"), "2")])


def test_append_resume_and_cut_tail(tmp_path):
    out = tmp_path / "x.jsonl.gz"
    append_rows(out, [{"id": 0}, {"id": 1}])
    append_rows(out, [{"id": 5}])
    assert done_ids(out) == {0, 1, 5}
    with open(out, "ab") as f:  # an interrupted write: half a gzip member
        f.write(gzip.compress(b'{"id": 7}\n')[:12])
    assert done_ids(out) == {0, 1, 5}  # the cut member is dropped ...
    append_rows(out, [{"id": 9}])
    assert [r["id"] for r in read_jsonl(out)] == [0, 1, 5, 9]  # ... and appends stay readable


def test_pool_lookup_and_selection(tmp_path, monkeypatch):
    pool = tmp_path / "train" / "mine.jsonl"
    pool.parent.mkdir()
    pool.write_text("".join(json.dumps({"turns": [f"q{i}"]}) + "\n" for i in range(10)))
    assert len(find_pool(str(pool))) == 10
    assert len(find_pool("mine", str(tmp_path))) == 10
    monkeypatch.setenv("DFLASH_DATA_DIR", str(tmp_path))
    assert len(find_pool("mine.jsonl")) == 10
    with pytest.raises(DFlashError, match="file.*data directory.*Hub") as e:
        find_pool("nothing-here", str(tmp_path))
    assert "nothing-here" in str(e.value)
    rows = find_pool("mine", str(tmp_path))
    assert [i for i, _ in select(rows, 1, 2, None, set())] == [1, 3, 5, 7, 9]
    assert [i for i, _ in select(rows, 1, 2, 3, {3})] == [1, 5]


def test_data_command_appends_and_resumes(tmp_path, tiny_target_dir, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"turns": ["Who are you?", "And then?"], "source": "t"}) + "\n"
                    + "".join(json.dumps({"turns": [f"Say {i}"], "source": "t"}) + "\n" for i in range(5)))
    out = tmp_path / "out.jsonl.gz"
    args = ["data", str(pool), "--target", str(tiny_target_dir), "--out", str(out), "--max-new-tokens", "6",
            "--batch-size", "2", "--no-progress"]
    assert main(args + ["--num-prompts", "3"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == [0, 1, 2]
    assert main(args) == 0  # resumes: only ids 3..5 are new
    rows = list(read_jsonl(out))
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, 5]
    first = rows[0]
    assert set(first) == {"id", "source", "messages", "finish", "new_tokens"}
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant"]
    assert first["finish"] in ("stop", "length") and 1 <= first["new_tokens"] <= 12
    assert main(["data", "nope", "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_data_command_on_fp16_cpu_weights(tmp_path, tiny_target_dir):
    """`--cpu-weights fp16` answers with the fp16 lean runtime: the same rows as loading that
    target and regenerating directly."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"turns": [f"Count to {i}"], "source": "t"}) + "\n" for i in range(4)))
    out = tmp_path / "fp16.jsonl"
    assert main(["data", str(pool), "--target", str(tiny_target_dir), "--out", str(out), "--max-new-tokens", "8",
                 "--batch-size", "4", "--no-progress", "--device", "cpu", "--cpu-weights", "fp16"]) == 0
    runtime, tokenizer = load_target(str(tiny_target_dir), device="cpu", cpu_weights="fp16")
    direct = tmp_path / "direct.jsonl"
    regenerate(list(enumerate(find_pool(str(pool), None))), runtime, tokenizer, direct, batch_size=4,
               max_new_tokens=8, progress=False)
    assert [r["id"] for r in read_jsonl(out)] == [0, 1, 2, 3]
    assert list(read_jsonl(out)) == list(read_jsonl(direct))


@pytest.mark.native
def test_batched_rows_are_plain_decoding_through_the_native_runtime(tmp_path):
    """Conversations decoded together as rows of one native cache get exactly the tokens plain
    one-row decoding gives each, in batches of 1 and 3: one row stopped early by a stop token,
    one cut by the token cap, one by the 256-token context. Sampling repeats with its seed."""
    from dflash.runtime.gguf import GGUFRuntime

    runtime = GGUFRuntime(tiny_gguf(tmp_path / "t.gguf", kind="Q4_0", layers=2))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (3, 11, 1, 7, 250)]
    stop = generate(runtime, None, prompts[0], max_new_tokens=12).new_tokens[5]  # ends the first row early
    plain = [generate(runtime, None, p, max_new_tokens=12, stop_token_ids=[stop]).new_tokens for p in prompts]
    for size in (1, 3):
        got = [r for i in range(0, len(prompts), size) for r in decode_rows(runtime, prompts[i: i + size], [stop], 12)]
        assert [tokens + [stop] * stopped for tokens, stopped in got] == plain
    assert got[0][1] and len(got[0][0]) < 11
    assert any(not stopped and len(tokens) == 12 for tokens, stopped in got)
    assert got[4][1] or len(got[4][0]) == 256 - 250
    sampled = [decode_rows(runtime, prompts[:3], [stop], 12, 1.0, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_data_command_sampling_is_reproducible(tmp_path, tiny_target_dir):
    """--temperature > 0 samples (other seeds, other answers) and a seed repeats a run."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"turns": [f"Tell me about {i}"], "source": "t"}) + "\n" for i in range(3)))
    texts = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / f"{name}.jsonl"
        assert main(["data", str(pool), "--target", str(tiny_target_dir), "--out", str(out), "--max-new-tokens", "8",
                     "--batch-size", "2", "--no-progress", "--temperature", "1.0", "--seed", seed]) == 0
        texts.append([r["messages"][-1]["content"] for r in read_jsonl(out)])
    assert texts[0] == texts[1] != texts[2]
