"""The trainer: target features, resume, two processes, and a real training run on SmolLM2
whose drafter decodes losslessly."""

import argparse
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dflash.train import trainer as T
from dflash.train.features import TargetFeatures


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    return p.parse_args(list(argv))


def tiny_args(tiny_target_dir, regen_file, out, *extra: str) -> argparse.Namespace:
    return parse("--data", str(regen_file), "--target", str(tiny_target_dir), "--out", str(out),
                 "--device", "cpu", "--intermediate-size", "96", "--target-layers", "0", "2", "--block-size", "4",
                 "--max-len", "96", "--anchors-per-seq", "6", "--grad-accum", "2", "--batch-size", "2",
                 "--max-steps", "6", "--eval-fraction", "0.1", "--eval-max-seqs", "3", "--no-progress", *extra)


def test_features_equal_what_decoding_feeds(tiny_target_dir):
    from dflash import load_target
    from dflash.target.adapter import TargetAdapter

    model, _ = load_target(str(tiny_target_dir), device="cpu")
    ids = torch.randint(5, 1000, (30,))
    for layers in ([0, 2], [1, 3], [3]):
        want = TargetAdapter(model, layers).forward(ids[None], model.get_decoder() and None, features=True).features
        got = TargetFeatures(model, layers)(ids)
        assert torch.allclose(got, want, atol=1e-5), layers


def test_resume_continues_identically(tiny_target_dir, regen_file, tmp_path):
    args = tiny_args(tiny_target_dir, regen_file, tmp_path / "run")
    a = T.Trainer(args)
    a.train_step()
    a.train_step()
    a.save()
    loss_a, _ = a.train_step()

    b = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "run", "--resume"))
    assert (b.step, b.epoch, b.cursor) == (2, 0, 8)
    assert b.scheduler.state_dict()["last_epoch"] == 2
    sa = T.Trainer.state_dict(a)  # a has moved on one step: compare with what was saved
    saved = torch.load(tmp_path / "run" / T.STATE_FILE, weights_only=False)
    for k, v in saved["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(b.optimizer.state_dict()["state"][k][name], t), name
    for name, t in saved["model"].items():
        assert torch.equal(b.drafter.state_dict()[name], t)
    loss_b, _ = b.train_step()
    assert loss_b == loss_a
    assert sa["step"] == b.step == 3
    # a compact state (bf16 moments) also resumes
    b.save(tmp_path / "compact", compact=True)
    c = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "other", "--resume", str(tmp_path / "compact")))
    assert c.step == 3


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert T.main(argv) == 0


def test_two_process_gloo_run_completes_and_saves(tiny_target_dir, regen_file, tmp_path):
    from dflash import DFlashDraftModel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = tiny_args(tiny_target_dir, regen_file, tmp_path / "ddp", "--max-steps", "3", "--eval-every", "3")
    argv = [x for k, v in vars(args).items() if v not in (None, False) for x in _flag(k, v)]
    mp.spawn(_worker, args=(2, port, argv), nprocs=2, join=True)
    state = torch.load(tmp_path / "ddp" / T.STATE_FILE, weights_only=False)
    assert state["step"] == 3 and state["cursor"] == 3 * 2 * 2 * 2
    drafter = DFlashDraftModel.from_pretrained(str(tmp_path / "ddp" / "drafter"))
    assert drafter.config.block_size == 4 and drafter.config.target_layer_ids == [0, 2]


def _flag(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    return [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]


def test_bad_flags_are_refused(tiny_target_dir, regen_file, tmp_path):
    from dflash.errors import DFlashError

    with pytest.raises(DFlashError, match="--block-size"):
        T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path, "--block-size", "1"))
    with pytest.raises(DFlashError, match="no training file"):
        T.Trainer(parse("--data", str(tmp_path / "none*.jsonl"), "--out", str(tmp_path)))
    with pytest.raises(DFlashError, match="no training state"):
        T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path, "--resume", str(tmp_path / "missing.pt")))


def test_real_target_loss_falls_and_drafter_is_lossless(smollm, regen_file, tmp_path):
    """A few steps on SmolLM2 (features cached after the first pass): the loss falls, and the
    saved drafter decodes exactly what the target generates greedily."""
    from dflash import DFlashDraftModel, chat_input_ids
    from helpers import greedy_reference

    model, tokenizer = smollm
    args = parse("--data", str(regen_file), "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--intermediate-size", "256", "--target-layers", "1", "14", "27", "--block-size", "8",
                 "--max-len", "160", "--anchors-per-seq", "8", "--grad-accum", "1", "--batch-size", "2",
                 "--max-steps", "24", "--lr", "2e-3", "--warmup", "0.1", "--eval-fraction", "0",
                 "--feature-cache", str(tmp_path / "features"), "--no-progress")
    trainer = T.Trainer(args)
    trainer.train_set.rows = trainer.train_set.rows[:4]  # overfit four conversations
    trainer.file_sizes = [4]
    losses = [trainer.train_step()[0] for _ in range(24)]
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses
    trainer.save()

    drafter = DFlashDraftModel.from_pretrained(str(tmp_path / "run" / "drafter"), dtype="float32", device="cpu")
    ids = torch.tensor([chat_input_ids(tokenizer, "What is 17 times 23?")])
    want = greedy_reference(model, ids, 40)
    got = drafter.spec_generate(ids, max_new_tokens=40, target=model)
    assert torch.equal(got[:, : want.shape[1]], want)
