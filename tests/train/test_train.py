"""The trainer: target features, resume, two processes, and a real training run on SmolLM2
whose drafter decodes losslessly."""

import argparse
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dflash import DFlashDraftModel
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

    runtime, _ = load_target(str(tiny_target_dir), device="cpu")
    ids = torch.randint(5, 1000, (30,))
    for layers in ([0, 2], [1, 3], [3]):
        runtime.bind(layers)
        want = runtime.prefill(runtime.new_cache(), ids)[1].features  # what decoding's prefill feeds
        got = TargetFeatures(runtime, layers)(ids)
        assert torch.allclose(got, want, atol=1e-5), layers


def test_batched_features_equal_one_at_a_time(tiny_target_dir, tmp_path):
    """Several conversations share one right-padded target forward: each must get exactly the
    features of its own forward (causal attention never looks at the padding), cached or not."""
    from dflash import load_target

    model, _ = load_target(str(tiny_target_dir), device="cpu")
    seqs = [torch.randint(5, 1000, (n,)) for n in (30, 7, 19)]
    single = TargetFeatures(model, [0, 2])
    alone = [single(ids) for ids in seqs]
    cached = TargetFeatures(model, [0, 2], cache_dir=tmp_path)
    for tol in (1e-5, 1e-2):  # computed (and stored), then the keyed ones read back in bf16
        together = cached.many(seqs, ["a", "b", None])
        for ids, want, got in zip(seqs, alone, together):
            assert got.shape == (1, len(ids), want.shape[-1])
            assert torch.allclose(got, want, atol=tol, rtol=tol)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a-30-L0_2.pt", "b-7-L0_2.pt"]


def test_fit_minutes_sizes_the_schedule_to_the_budget(tiny_target_dir, regen_file, tmp_path):
    """--fit-minutes replaces the placeholder schedule with what fits after the rate probe, ends
    there with the cosine run out, and a resumed run keeps that length."""
    args = tiny_args(tiny_target_dir, regen_file, tmp_path / "run", "--max-steps", "100000",
                     "--fit-minutes", "0.03", "--eval-every", "100000", "--warmup", "0.1")
    T.train(args)
    state = torch.load(tmp_path / "run" / T.STATE_FILE, weights_only=False)
    assert state["fitted"] and T.FIT_PROBE_STEPS + 2 < state["max_steps"] < 100000
    assert state["step"] == state["max_steps"]
    assert state["scheduler"]["_last_lr"][0] < 1e-3 * args.lr  # the cosine ran to its end
    resumed = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "run", "--max-steps", "100000",
                                  "--fit-minutes", "0.03", "--resume"))
    assert resumed.max_steps == state["max_steps"] and resumed.fitted


def test_schedule_warms_up_then_decays_to_the_floor():
    """Linear warm-up over the --warmup share to --lr, cosine down to --min-lr-ratio of it at the
    last step; refitting the length mid-run (--fit-minutes) continues at the same step."""
    def lrs(schedule, n):
        out = []
        for _ in range(n):
            out.append(schedule.get_last_lr()[0])
            schedule.optimizer.step()
            schedule.step()
        return out

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)

    schedule = T.cosine_schedule(optimizer(), 100, 0.1, 0.2)
    seen = lrs(schedule, 100)
    assert seen[0] == 0 and seen[5] == pytest.approx(1.0) and seen[10] == pytest.approx(2.0)
    assert all(a < b for a, b in zip(seen[:10], seen[1:11]))
    assert all(a > b for a, b in zip(seen[10:], seen[11:]))
    assert schedule.get_last_lr()[0] == pytest.approx(0.4)  # the floor, at the last step
    refitted = T.cosine_schedule(optimizer(), 100, 0.1, 0.2)
    lrs(refitted, 30)
    refitted = T.cosine_schedule(refitted.optimizer, 50, 0.1, 0.2, last_step=refitted.last_epoch - 1)
    fresh = T.cosine_schedule(optimizer(), 50, 0.1, 0.2)
    lrs(fresh, 30)
    assert refitted.last_epoch == 30 and refitted.get_last_lr() == pytest.approx(fresh.get_last_lr())
    assert refitted.optimizer.param_groups[0]["lr"] == pytest.approx(fresh.get_last_lr()[0])
    assert lrs(refitted, 20) == pytest.approx(lrs(fresh, 20))


def test_training_blocks_see_what_decoding_shows_the_drafter(tiny_target_dir):
    """The trainer's one masked forward over many blocks and the engine's incremental drafting
    (context fed in uneven chunks to a draft cache, a throwaway block after each) must give the
    same draft logits for the same anchor: otherwise training teaches a task decoding never asks."""
    from dflash import load_target

    adapter, _ = load_target(str(tiny_target_dir), device="cpu")
    model = adapter.model
    torch.manual_seed(0)
    block = 4
    drafter = DFlashDraftModel.from_target(model, num_layers=2, block_size=block, target_layer_ids=[0, 2]).eval()
    ids = torch.randint(5, 1000, (40,))
    loss_mask = torch.arange(40) >= 10
    anchors = torch.tensor([10, 13, 21, 30, 36])
    features = TargetFeatures(model, drafter.target_layer_ids)(ids)
    batch = T.make_batch([(features, ids, loss_mask)], [anchors], block, drafter.mask_token_id)
    with torch.no_grad():
        trained = adapter.lm_head(T.block_hidden(drafter, adapter, batch, block)[0])  # [n_a, B-1, V]

    mask = drafter.mask_token_id
    for i, a in enumerate(anchors.tolist()):
        cache = drafter.new_cache(capacity=8)  # small: growing it mid-way is part of the path
        fed = 0
        for step in [10, 3, 1, 4, 2] * 10:   # context arrives as decoding commits it
            chunk = min(step, a - fed)
            if chunk == 0:
                break
            throwaway = torch.tensor([[int(ids[fed + chunk])] + [mask] * (block - 1)])
            drafter.propose(adapter, throwaway, features[:, fed: fed + chunk], cache)
            fed += chunk
        assert fed == a
        real = torch.tensor([[int(ids[a])] + [mask] * (block - 1)])
        decoded = drafter.propose(adapter, real, features[:, a:a], cache)[0]            # [B-1, V]
        assert torch.allclose(decoded, trained[i], atol=1e-4), f"anchor {a}"
        assert torch.equal(decoded.argmax(-1), trained[i].argmax(-1))


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


@pytest.mark.slow
@pytest.mark.real_model
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


def test_loss_vocab_subset_matches_full_softmax_when_it_covers_everything(tiny_target_dir, regen_file, tmp_path):
    """--loss-vocab: over every id the subset loss is the full loss; over fewer ids it is
    smaller (a smaller partition function) but still finite and labelled right."""
    trainer = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "run", "--loss-vocab", "50"))
    assert trainer.loss_vocab is not None and len(trainer.loss_vocab) == 50
    assert torch.equal(trainer.loss_vocab, trainer.loss_vocab.sort().values)
    items, anchors = trainer.load_items(trainer.train_set, [0, 1], 0, 6)
    batch = T.make_batch(items, anchors, trainer.block_size, trainer.config.mask_token_id)
    everything = torch.arange(trainer.runtime.info.vocab_size)
    full, n = T.forward_loss(trainer.drafter, trainer.runtime, trainer.head, batch, trainer.weights)
    same, m = T.forward_loss(trainer.drafter, trainer.runtime, trainer.head, batch, trainer.weights, vocab=everything)
    part, _ = T.forward_loss(trainer.drafter, trainer.runtime, trainer.head, batch, trainer.weights, vocab=trainer.loss_vocab)
    assert n == m > 0
    assert torch.allclose(full.detach(), same.detach(), atol=1e-5)
    assert 0 < part.item() < full.item()
    trainer.save()  # the subset is part of the state: a resumed run uses the same one
    resumed = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "run", "--resume"))
    assert torch.equal(resumed.loss_vocab, trainer.loss_vocab)
    # continuing a drafter keeps the vocabulary it drafts from, whatever K is asked
    continued = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "next", "--loss-vocab", "30",
                                    "--init-from", str(tmp_path / "run" / "drafter")))
    assert torch.equal(continued.loss_vocab, trainer.loss_vocab)


def test_soft_targets_are_the_targets_own_next_token_distribution(tiny_target_dir, regen_file, tmp_path):
    """--soft-weight: the target's last layer rides along with the features, and the soft loss of
    block position k of anchor a is taken against the target's own logits at position a+k-1
    (recomputed here from a plain forward); the mix is (1 - W) * hard + W * soft."""
    from dflash.train.blocks import soft_block_loss

    trainer = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "run", "--soft-weight", "0.25"))
    hidden = trainer.runtime.info.hidden_size
    items, anchors = trainer.load_items(trainer.train_set, [0], 0, 6)
    assert items[0][0].shape[-1] == 3 * hidden  # target layers 0 and 2, then the last layer
    block = trainer.block_size
    batch = T.make_batch(items, anchors, block, trainer.config.mask_token_id, trainer.feature_width)
    assert batch.hidden.shape[-1] == 2 * hidden and batch.soft_hidden.shape[-1] == hidden
    ids = items[0][1]
    with torch.no_grad():
        full = trainer.runtime.model(ids[None]).logits[0]                                   # [n, V]
        drafted = T.block_hidden(trainer.drafter, trainer.runtime, batch, block)[0] @ trainer.head.T
        args = (trainer.drafter, trainer.runtime, trainer.head, batch, trainer.weights)
        hard, n = T.forward_loss(*args)
        soft, m = T.forward_loss(*args, soft_weight=1.0)
        mixed, _ = T.forward_loss(*args, soft_weight=0.25)
    labels = batch.labels[0]
    valid = labels != T.IGNORE
    before = anchors[0][:, None] + torch.arange(block - 1)                                  # a + k - 1
    w = trainer.weights.expand_as(labels)[valid]
    want = soft_block_loss(drafted[valid], full[before[valid]], w)
    assert n == m == int(valid.sum()) > 0
    assert soft.item() == pytest.approx(want.item(), rel=1e-4)
    assert mixed.item() == pytest.approx(0.75 * hard.item() + 0.25 * soft.item(), rel=1e-5)
    loss, _ = trainer.train_step()
    assert loss == loss  # finite, and training runs with soft targets


@pytest.mark.real_model
@pytest.mark.native
def test_training_reads_the_native_runtime_by_default(regen_file, tmp_path):
    """A GGUF target on a CPU: training features come from the native runtime (what decoding
    feeds the drafter by default), bit for bit, and the shipped drafter trains and evaluates on them."""
    from dflash import default_drafter_path
    from dflash.runtime.gguf import GGUFRuntime

    trainer = T.Trainer(parse("--data", str(regen_file), "--out", str(tmp_path / "run"), "--device", "cpu",
                              "--init-from", str(default_drafter_path()), "--max-len", "128", "--anchors-per-seq", "16",
                              "--grad-accum", "1", "--max-steps", "2", "--eval-fraction", "0.2", "--eval-max-seqs", "4",
                              "--soft-weight", "0.5", "--no-progress"))
    assert isinstance(trainer.runtime, GGUFRuntime)
    ids = trainer.train_set[0][0]
    got = trainer.features(ids)
    runtime = trainer.runtime
    runtime.bind(trainer.config.target_layer_ids)
    want = runtime.prefill(runtime.new_cache(), ids)[1].features
    assert torch.equal(got[..., : trainer.feature_width], want)
    # the last layer's part is the final-normed state: the head over it gives the runtime's logits
    # (within the 8-bit rounding of the activations the native head applies)
    logits = runtime.prefill(runtime.new_cache(), ids, logits=True)[1].logits[0, -1]
    ours = got[0, -1, trainer.feature_width:] @ trainer.head.T
    assert torch.equal(ours.argmax(), logits.argmax()) and (ours - logits).abs().max() < 0.5
    assert trainer.evaluate()["eval_tau"] > 1.5  # the shipped drafter on the features decoding gives it
    loss, _ = trainer.train_step()
    assert 0 < loss < 10


def test_init_from_keeps_weights_and_takes_the_new_block_size(tiny_target_dir, regen_file, tmp_path):
    first = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "a"))
    first.train_step()
    first.save()
    second = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "b", "--init-from",
                                 str(tmp_path / "a" / "drafter"), "--block-size", "3"))
    assert second.block_size == 3 and second.weights.shape == (2,)
    assert second.step == 0
    for name, t in first.drafter.state_dict().items():
        # saved in bf16 (the released format): equal to bf16 precision
        assert torch.allclose(second.drafter.state_dict()[name], t, atol=1e-2, rtol=1e-2), name


def test_init_from_with_more_layers_starts_from_the_same_drafts(tiny_target_dir, regen_file, tmp_path):
    """Deepening a trained drafter: the appended layer starts as an identity (same loss as the
    source), then trains (its output projections leave zero) and saves as a 2-layer drafter."""
    first = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "a"))
    first.train_step()
    first.save()
    source = DFlashDraftModel.from_pretrained(str(tmp_path / "a" / "drafter"), dtype="float32", device="cpu")
    deeper = T.Trainer(tiny_args(tiny_target_dir, regen_file, tmp_path / "b", "--init-from",
                                 str(tmp_path / "a" / "drafter"), "--num-layers", "2"))
    assert len(deeper.drafter.layers) == 2 and deeper.config.num_hidden_layers == 2
    items, anchors = deeper.load_items(deeper.train_set, [0, 1], 0, 6)
    batch = T.make_batch(items, anchors, deeper.block_size, deeper.config.mask_token_id)
    with torch.no_grad():
        want, _ = T.forward_loss(source, deeper.runtime, deeper.head, batch, deeper.weights)
        got, _ = T.forward_loss(deeper.drafter, deeper.runtime, deeper.head, batch, deeper.weights)
    assert torch.allclose(got, want, atol=1e-5)
    deeper.train_step()
    assert deeper.drafter.layers[1].mlp.down_proj.weight.abs().sum() > 0
    deeper.save()
    saved = DFlashDraftModel.from_pretrained(str(tmp_path / "b" / "drafter"), dtype="float32", device="cpu")
    assert saved.config.num_hidden_layers == 2


def test_eval_only_reports_a_drafter_on_held_out_rows(tiny_target_dir, regen_file, tmp_path, capsys):
    """--eval-only evaluates an existing drafter and trains nothing; --eval-fraction 1 holds out
    every row (data no drafter has seen), and the drafter's own block size applies by default."""
    import json

    run = tiny_args(tiny_target_dir, regen_file, tmp_path / "run", "--max-steps", "2")
    T.train(run)
    drafter = tmp_path / "run" / "drafter"
    argv = ["--data", str(regen_file), "--target", str(tiny_target_dir), "--device", "cpu", "--max-len", "96",
            "--anchors-per-seq", "6", "--init-from", str(drafter), "--eval-only", "--eval-fraction", "1",
            "--eval-max-seqs", "5", "--no-progress"]
    capsys.readouterr()
    assert T.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["held_out"] == 5 and report["step"] == 0
    assert len(report["eval_acc_per_position"]) == 3  # block 4, the drafter's own
    assert 1.0 <= report["eval_tau"] <= 4.0 and report["eval_loss"] > 0
    assert not (tmp_path / "other").exists()
    assert T.main(argv[:-3]) == 0  # the default 64 rows: all 40 here
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["held_out"] == 40
    assert T.main(["--data", str(regen_file), "--eval-only"]) == 2  # no drafter to evaluate
    assert "--init-from" in capsys.readouterr().err
    assert T.main(["--data", str(regen_file), "--target", str(tiny_target_dir)]) == 2  # training needs --out
    assert "--out is required" in capsys.readouterr().err
