r"""Train a DFlash drafter for a target from regenerated conversations.

The same file runs in one process (CPU or one GPU) or in several under torchrun (DDP: gloo on
CPU, nccl on GPU); rank 0 logs and saves. The target is frozen: its features are computed on the
fly (no grad, only the layers the drafter reads), its embedding and LM head are shared.

Launch commands:

    # a SmolLM2-135M-Instruct drafter from scratch on a CPU, resumable (rerun with --resume to
    # continue); the shipped drafter's full recipe: docs/drafter-smollm2.md
    dflash train --data ../shared/datasets/regen/pools-even.jsonl.gz '../shared/datasets/regen/general-*.jsonl.gz' \
        --in-order --out runs/smollm2 --num-layers 1 --target-layers 1 14 27 --block-size 16 --max-len 768 \
        --anchors-per-seq 32 --max-steps 2400 --loss-vocab 8192 --max-minutes 140 --resume

    # continue the shipped drafter with a fresh schedule (keeps its draft vocabulary and block size)
    dflash train --data ../shared/datasets/regen/pools-even.jsonl.gz --init-from dflash/drafters/smollm2-135m-instruct \
        --anchors-per-seq 128 --max-steps 1000 --lr 2e-4 --loss-vocab 8192 \
        --feature-cache runs/feature-cache --out runs/next --max-minutes 150 --resume

    # continue it on one GPU for a fixed time: the warm-up and cosine are sized to 8 minutes; the
    # in-domain file counts twice (float32 target features, as CPU decoding sees)
    R=../shared/datasets/regen
    dflash train --data "$R/*.jsonl.gz" --repeat $R/pools-even.jsonl.gz 2 \
        --init-from dflash/drafters/smollm2-135m-instruct --anchors-per-seq 128 --batch-size 16 --grad-accum 1 \
        --lr 3e-4 --warmup 0.05 --loss-vocab 8192 --target-dtype float32 --fit-minutes 8 --max-minutes 8.4 --out runs/gpu

    # evaluate a drafter on conversations no drafter has trained on (all of them held out)
    dflash train --data runs/regen/new.jsonl.gz --eval-only --eval-fraction 1 \
        --init-from dflash/drafters/smollm2-135m-instruct --anchors-per-seq 128

    # two CPU processes (gloo)
    torchrun --standalone --nproc_per_node 2 -m dflash.train.trainer --data DATA.jsonl.gz --out runs/x

    # an 8B target on 8 GPUs (nccl, bf16 autocast), 5 draft layers as released drafters use
    torchrun --standalone --nproc_per_node 8 -m dflash.train.trainer --target Qwen/Qwen3-8B \
        --data 'data/qwen3-8b/*.jsonl.gz' --out runs/qwen3-8b --num-layers 5 --block-size 16 \
        --max-len 3072 --anchors-per-seq 512 --batch-size 4 --lr 6e-4 --epochs 6 --resume

`dflash data` writes the conversations (the target's own answers); `dflash train --help` lists
every flag.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dflash.distributed import Dist, close_distributed, init_distributed
from dflash.errors import DFlashError
from dflash.train.blocks import (IGNORE, BlockStats, block_attention_mask, block_loss, build_blocks,
                                 default_gamma, loss_weights, sample_anchors, soft_block_loss)
from dflash.train.dataset import ConversationDataset, epoch_order, load_conversations, split_rows

STATE_FILE = "training_state.pt"
FIT_PROBE_STEPS = 20  # --fit-minutes measures the step rate over these steps (after 2 warm-up steps)
SMOLLM2_MASK_TOKEN = 16  # <empty_output>: never appears in chat


# --- flags ---------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every `dflash train` flag (shared by the CLI and `python -m dflash.train.trainer`)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, metavar="FILE_OR_GLOB",
                   help="conversation files from `dflash data` (.jsonl or .jsonl.gz; globs allowed)")
    g.add_argument("--repeat", nargs=2, action="append", metavar=("FILE_OR_GLOB", "N"),
                   help="visit the training conversations of these --data files N times an epoch, to weight "
                        "in-domain data up (repeatable). Held-out rows stay held out; cached features serve "
                        "every visit")
    g.add_argument("--in-order", action="store_true",
                   help="visit the files in the order given (each shuffled) instead of one global shuffle: "
                        "puts the data you care most about first")
    g.add_argument("--eval-fraction", type=float, default=0.01, help="held-out share of conversations (default 0.01)")
    g.add_argument("--eval-max-seqs", type=int, default=64, help="held-out conversations evaluated (default 64)")
    g.add_argument("--max-len", type=int, default=768, help="truncate conversations to this many tokens (default 768)")
    g.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="cache target features on disk (bf16) for repeated epochs (default: recompute)")

    g = p.add_argument_group("models")
    g.add_argument("--target", default=None, metavar="NAME_OR_PATH",
                   help="target model (default: the embedded smollm2-135m-instruct)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available; LOCAL_RANK under torchrun)")
    g.add_argument("--cpu-weights", default="auto", choices=["auto", "gguf", "float32"],
                   help="how a CPU target computes the features: gguf, a GGUF target's own quantised weights through "
                        "the native runtime (what CPU decoding feeds the drafter by default, ~3x faster); float32, "
                        "the dequantised model (the reference). auto (default): gguf for a GGUF target on a CPU")
    g.add_argument("--target-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the frozen target's dtype for features (default: float32 on CPU, bfloat16 on GPU). "
                        "float32 on a GPU (TF32 matrix products) gives features closer to what CPU decoding "
                        "feeds the drafter, at a small target's modest cost")
    g.add_argument("--num-layers", type=int, default=1, help="draft layers (default 1)")
    g.add_argument("--intermediate-size", type=int, default=None, help="draft MLP width (default: the target's)")
    g.add_argument("--target-layers", type=int, nargs="+", default=None, metavar="ID",
                   help="0-based target layers read (default: spread evenly, see dflash.config)")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per training block (default: the --init-from drafter's, else 16)")
    g.add_argument("--mask-token-id", type=int, default=None,
                   help="mask token (default: 16 <empty_output> for SmolLM2, else the last vocabulary id)")
    g.add_argument("--init-from", default=None, metavar="DRAFTER",
                   help="start from this drafter's weights (a folder or Hub id; its layers, target layers and "
                        "mask token are kept, and its block size unless --block-size is given): continue a "
                        "released or earlier drafter. A --num-layers above its depth appends layers that start "
                        "as identities")

    g = p.add_argument_group("optimisation")
    g.add_argument("--anchors-per-seq", type=int, default=32, help="random blocks per conversation (default 32)")
    g.add_argument("--gamma", type=float, default=None, help="loss decay over block positions (default 7 * B / 16)")
    g.add_argument("--soft-weight", type=float, default=0.0, metavar="W",
                   help="share of the loss taken against the target's own next-token distribution at each drafted "
                        "position (soft targets, over the loss vocabulary) instead of the reply's token alone: "
                        "(1 - W) * hard + W * soft. The distribution comes from the same target forward as the "
                        "features (one more layer bound). Default 0 = hard labels only")
    g.add_argument("--loss-vocab", type=int, default=0, metavar="K",
                   help="compute the training loss over the K most frequent reply tokens (plus every label of "
                        "the batch) instead of the whole vocabulary: the LM head dominates a CPU step, and this "
                        "cuts it by vocab/K. The drafter then proposes from those K tokens (draft_vocab.json "
                        "beside its weights), which also makes drafting cheaper. Default 0 = off")
    g.add_argument("--batch-size", type=int, default=1, help="conversations per forward, per process (default 1)")
    g.add_argument("--grad-accum", type=int, default=4, help="forwards per optimizer step (default 4)")
    g.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (default 6e-4)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a share of --lr (default 0)")
    g.add_argument("--warmup", type=float, default=0.04, help="warm-up share of the steps (default 0.04)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default 1.0)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (the schedule's length)")
    g.add_argument("--epochs", type=float, default=1.0, help="epochs when --max-steps is not given (default 1)")
    g.add_argument("--fit-minutes", type=float, default=None, metavar="M",
                   help="size the schedule to M minutes of training steps (evaluations not counted): after "
                        f"{FIT_PROBE_STEPS} steps at the measured rate, --max-steps becomes what fits, and the "
                        "warm-up and cosine follow; a resumed run keeps the fitted length. For a time budget, "
                        "e.g. a borrowed GPU; pair it with a slightly larger --max-minutes")
    g.add_argument("--cpu-bf16", default="off", choices=["auto", "on", "off"],
                   help="the drafter's products in bf16 on a CPU (float32 weights and optimizer): auto = where the "
                        "CPU multiplies bf16 natively (AVX-512 BF16, AMX). Default off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--out", default=None, help="run folder: training state, drafters, metrics.jsonl (required "
                                                "unless --eval-only)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from a training state (default with no PATH: OUT/training_state.pt if present)")
    g.add_argument("--save-minutes", type=float, default=10.0, help="save the training state this often (default 10)")
    g.add_argument("--save-every", type=int, default=0, help="also save every N steps (default 0 = off)")
    g.add_argument("--eval-every", type=int, default=500, help="evaluate every N steps (default 500)")
    g.add_argument("--log-every", type=int, default=10, help="write metrics every N steps (default 10)")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop (after saving) when this run has lasted this long; --resume continues")
    g.add_argument("--export-state", default=None, metavar="DIR",
                   help="also write a compact training state (bf16 optimizer moments) here, e.g. to commit")
    g.add_argument("--export-minutes", type=float, default=30.0, help="compact export interval (default 30)")
    g.add_argument("--release-dir", default=None, metavar="DIR",
                   help="copy the best drafter (released bf16 format) here after each evaluation that improves")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    g.add_argument("--eval-only", action="store_true",
                   help="train nothing: evaluate the --init-from drafter (or the --resume state) on the held-out "
                        "conversations and print the figures as JSON. With --eval-fraction 1 every conversation "
                        "of --data is held out: data no drafter has trained on, e.g. newly regenerated rows")


def check_arguments(a: argparse.Namespace) -> None:
    """Refuse values that cannot work, with the flag named."""
    positive = ["max_len", "num_layers", "anchors_per_seq", "batch_size", "grad_accum", "eval_every", "log_every"]
    for name in positive:
        if getattr(a, name) < 1:
            raise DFlashError(f"--{name.replace('_', '-')} must be at least 1")
    if a.block_size is not None and a.block_size < 2:
        raise DFlashError("--block-size must be at least 2 (an anchor and one draft token)")
    if a.out is None and not a.eval_only:
        raise DFlashError("--out is required (the run folder), except with --eval-only")
    if not (0 <= a.eval_fraction <= 1 if a.eval_only else 0 <= a.eval_fraction < 1):
        raise DFlashError("--eval-fraction must be in [0, 1) (up to 1 with --eval-only)")
    if a.lr <= 0 or not 0 <= a.warmup < 1 or a.clip <= 0:
        raise DFlashError("--lr and --clip must be positive and --warmup in [0, 1)")
    if a.max_steps is not None and a.max_steps < 1:
        raise DFlashError("--max-steps must be at least 1")
    if a.fit_minutes is not None and a.fit_minutes <= 0:
        raise DFlashError("--fit-minutes must be positive")
    if not 0 <= a.soft_weight <= 1:
        raise DFlashError("--soft-weight must be in [0, 1]")


# --- distributed ---------------------------------------------------------------------------------

def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


# --- one forward over a few sequences --------------------------------------------------------------

@dataclass
class Batch:
    hidden: torch.Tensor        # [b, n_ctx, F] target features (right-padded)
    soft_hidden: torch.Tensor | None  # [b, n_ctx, H] the target's final hidden states (soft targets), or None
    tokens: torch.Tensor        # [b, Q] block tokens
    positions: torch.Tensor     # [b, Q]
    anchors: torch.Tensor       # [b, n_anchors] (padding: anchor 0); the mask is built from them
    labels: torch.Tensor        # [b, n_anchors, B-1]


def make_batch(items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], anchors: list[torch.Tensor],
               block_size: int, mask_token_id: int, feature_width: int | None = None) -> Batch:
    """Pad a few sequences (features, ids, loss mask) and their blocks into one forward. Padded
    blocks (anchor 0, no labels) see only themselves, so no query row is empty. Features wider
    than `feature_width` carry the target's final hidden state after the drafter's part."""
    n_ctx = max(f.shape[1] for f, _, _ in items)
    n_a = max(1, max(len(a) for a in anchors))
    b, width = len(items), items[0][0].shape[-1]
    q = n_a * block_size
    hidden = items[0][0].new_zeros(b, n_ctx, width)
    tokens = torch.full((b, q), mask_token_id, dtype=torch.long)
    positions = torch.zeros(b, q, dtype=torch.long)
    padded_anchors = torch.zeros(b, n_a, dtype=torch.long)
    labels = torch.full((b, n_a, block_size - 1), IGNORE, dtype=torch.long)
    for i, ((feats, ids, loss_mask), a) in enumerate(zip(items, anchors)):
        hidden[i, : feats.shape[1]] = feats[0]
        padded_anchors[i, : len(a)] = a
        blocks = build_blocks(ids, loss_mask, padded_anchors[i], block_size, mask_token_id)
        tokens[i], positions[i] = blocks.tokens, blocks.positions
        labels[i, : len(a)] = blocks.labels[: len(a)]
    if feature_width is None or feature_width == width:
        return Batch(hidden, None, tokens, positions, padded_anchors, labels)
    return Batch(hidden[..., :feature_width], hidden[..., feature_width:], tokens, positions, padded_anchors, labels)


def _autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on a GPU, and on a CPU when asked (the drafter's weights stay float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16)


def cpu_bf16_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX): there bf16
    products run ~2.5x faster than float32 ones; elsewhere they are emulated, and slower."""
    from dflash.runtime.native import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def block_hidden(drafter: Any, target: Any, batch: Batch, block_size: int, cpu_bf16: bool = False) -> torch.Tensor:
    """The drafter's hidden states at draft positions 1..B-1 of every block, [b, n_a, B-1, H]:
    all blocks of a sequence in one masked forward, each seeing exactly what decoding shows it."""
    device = target.info.device
    b = batch.tokens.shape[0]
    with torch.no_grad():
        noise = target.embed(batch.tokens.to(device)).float()
    n_ctx = batch.hidden.shape[1]
    ctx_pos = torch.arange(n_ctx, device=device).expand(b, n_ctx)
    with _autocast(device, cpu_bf16):
        out = drafter(noise, batch.hidden.to(device).float(), ctx_pos, batch.positions.to(device),
                      attn_mask=block_attention_mask(batch.anchors.to(device), n_ctx, block_size)[:, None])
    return out.view(b, -1, block_size, out.shape[-1])[:, :, 1:]


def forward_loss(drafter: Any, target: Any, head: torch.Tensor, batch: Batch, weights: torch.Tensor,
                 stats: BlockStats | None = None, vocab: torch.Tensor | None = None,
                 soft_weight: float = 0.0, cpu_bf16: bool = False) -> tuple[torch.Tensor, int]:
    """Weighted block loss of one batch, and the number of supervised positions; `stats` (if
    given) collects accuracy and acceptance. `head` is the target's LM head ([V, H]). With `vocab`
    (sorted token ids) the softmax ranges over those ids and the batch's labels only (a
    sampled-softmax style shortcut for CPUs). `soft_weight` > 0 mixes in the loss against the
    target's own distribution (the batch must carry `soft_hidden`). `cpu_bf16`: bf16 products
    on a CPU too."""
    device = target.info.device
    block_size = weights.shape[0] + 1
    out = block_hidden(drafter, target, batch, block_size, cpu_bf16)
    labels = batch.labels.to(device)
    valid = labels != IGNORE
    n = int(valid.sum())
    if n == 0:
        return out.sum() * 0.0, 0
    targets = labels[valid]
    ids = None if vocab is None else torch.unique(torch.cat([vocab.to(device), targets]))  # sorted
    rows = head if ids is None else head[ids]                                             # [V', H]
    with _autocast(device, cpu_bf16):
        logits = torch.nn.functional.linear(out[valid], rows)                             # [N, V']
    if ids is not None:
        targets = torch.searchsorted(ids, targets)
    w = weights.to(device).expand_as(labels)[valid]
    loss = block_loss(logits, targets, w) if soft_weight < 1 else 0.0
    if soft_weight > 0:
        # the target's distribution for token a+k is its output at position a+k-1
        before = batch.positions.to(device).view(labels.shape[0], -1, block_size)[:, :, :-1]  # [b, n_a, B-1]
        b_idx = torch.arange(labels.shape[0], device=device)[:, None, None].expand_as(before)
        with torch.no_grad():
            target_logits = batch.soft_hidden.to(device)[b_idx[valid], before[valid]].float() @ rows.float().T
        loss = (1 - soft_weight) * loss + soft_weight * soft_block_loss(logits, target_logits, w)
    if stats is not None:
        pred = torch.full_like(labels, -1)
        pred[valid] = logits.argmax(-1) if ids is None else ids[logits.argmax(-1)]
        stats.update(pred.view(-1, block_size - 1), labels.view(-1, block_size - 1))
    return loss, n


# --- the trainer -------------------------------------------------------------------------------------

def frequent_tokens(dataset: ConversationDataset, k: int, vocab_size: int, seed: int,
                    sample: int = 2000) -> tuple[torch.Tensor, float]:
    """The k most frequent supervised tokens in a random sample of the training conversations
    (sorted ids) and the share of those tokens they cover. A small model's replies use a few
    thousand tokens for almost all of their text."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(dataset), generator=g)[:sample].tolist()
    counts = torch.zeros(vocab_size)
    for i in rows:
        ids, mask = dataset[i]
        counts.index_add_(0, ids[mask], torch.ones(int(mask.sum())))
    top = counts.topk(min(k, int((counts > 0).sum())))
    return top.indices.sort().values, float(top.values.sum() / counts.sum().clamp(min=1))


def cosine_schedule(optimizer: torch.optim.Optimizer, max_steps: int, warmup: float, min_ratio: float,
                    last_step: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' cosine schedule with a floor: linear warm-up from 0 over the `warmup` share
    of the steps, then cosine decay to `min_ratio` of --lr at `max_steps` (the training loop stops
    there; past it the cosine would rise again). `last_step` >= 0 continues at that step, the
    learning rate set for the next one."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=int(warmup * max_steps), num_training_steps=max_steps,
        min_lr_rate=min_ratio, last_epoch=last_step)


class Trainer:
    def __init__(self, args: argparse.Namespace) -> None:
        from dflash.model.drafter import DFlashDraftModel
        from dflash.runtime.loader import load_target
        from dflash.train.features import TargetFeatures

        check_arguments(args)
        self.args = a = args
        self.d, self.device = init_distributed(a.device)
        if a.threads:
            torch.set_num_threads(a.threads)
        self.out = Path(a.out) if a.out else None
        state = self._find_state()
        if a.eval_only and state is None and not a.init_from:  # (not a fresh, random drafter)
            raise DFlashError("--eval-only evaluates an existing drafter: give --init-from DRAFTER or --resume PATH")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 target features: TF32 is ample
        threads = torch.get_num_threads()
        self.runtime, self.tokenizer = load_target(a.target, dtype=a.target_dtype, device=self.device,
                                                   cpu_weights=a.cpu_weights)
        # the native runtime leaves torch one thread (decoding's small operators); here torch runs the
        # drafter's forward and backward, the larger part of a step, in turn with the native features
        torch.set_num_threads(threads)
        self.head = self.runtime.head_weight().to(self.device)  # frozen; the loss is differentiated through it
        self.cpu_bf16 = a.cpu_bf16 == "on" or (a.cpu_bf16 == "auto" and cpu_bf16_fast())

        if state is not None:
            from dflash.config import DFlashConfig
            drafter = DFlashDraftModel(DFlashConfig.from_dict(state["config"]))
        elif a.init_from:
            drafter = DFlashDraftModel.from_pretrained(a.init_from, dtype="float32", device="cpu")
            drafter.config.block_size = a.block_size or drafter.config.block_size
            if a.num_layers > drafter.config.num_hidden_layers:  # deepen: new layers start as identities
                drafter.add_layers(a.num_layers - drafter.config.num_hidden_layers)
        else:
            torch.manual_seed(a.seed)
            mask_id = a.mask_token_id
            if mask_id is None and a.target is None:
                mask_id = SMOLLM2_MASK_TOKEN
            model = getattr(self.runtime, "model", None)  # (the native runtime has no transformers model)
            if model is None:
                model = load_target(a.target, device="cpu", cpu_weights="float32")[0].model
            try:
                drafter = DFlashDraftModel.from_target(
                    model, num_layers=a.num_layers, block_size=a.block_size or 16, mask_token_id=mask_id,
                    target_layer_ids=a.target_layers, intermediate_size=a.intermediate_size)
            except ValueError as exc:
                raise DFlashError(str(exc)) from None
        self.drafter = drafter.to(self.device, torch.float32).train()
        self.config = drafter.config
        self.block_size = self.config.block_size
        self.features = TargetFeatures(self.runtime, self.config.target_layer_ids, a.feature_cache,
                                       soft=a.soft_weight > 0)
        self.feature_width = len(self.config.target_layer_ids) * self.runtime.info.hidden_size
        self.weights = loss_weights(self.block_size, a.gamma or default_gamma(self.block_size))
        self.loss_vocab: torch.Tensor | None = None  # token ids the training loss ranges over

        train_rows, eval_rows = split_rows(load_conversations(a.data), a.eval_fraction, a.repeat)
        eval_rows = eval_rows[: a.eval_max_seqs]
        if not train_rows and not a.eval_only:
            raise DFlashError("no training conversations left after holding out the evaluation share")
        if not eval_rows and a.eval_only:
            raise DFlashError("no held-out conversations to evaluate: raise --eval-fraction (1 holds out all)")
        self.train_set = ConversationDataset(train_rows, self.tokenizer, a.max_len)
        self.eval_set = ConversationDataset(eval_rows, self.tokenizer, a.max_len)
        files = [r["file"] for r in train_rows]
        self.file_sizes = [files.count(f) for f in dict.fromkeys(files)]
        self.per_step = self.d.world * a.batch_size * a.grad_accum  # conversations per optimizer step
        self.max_steps = a.max_steps or max(1, int(a.epochs * len(train_rows) / self.per_step))

        self.ddp = self.drafter
        if self.d.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(self.drafter, device_ids=[self.d.local_rank] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.drafter.parameters(), lr=a.lr, betas=(0.9, 0.95),
                                           weight_decay=a.weight_decay, fused=self.device.type == "cuda")
        self.scheduler = cosine_schedule(self.optimizer, self.max_steps, a.warmup, a.min_lr_ratio)
        self.step, self.epoch, self.cursor, self.best_tau = 0, 0, 0, -1.0
        self.fitted = False  # whether --fit-minutes has set max_steps
        self._order: list[int] | None = None
        if state is not None:
            self._load_state(state)
        elif (a.loss_vocab or a.eval_only) and drafter.draft_vocab is not None:
            # --init-from: keep the vocabulary it drafts from (evaluation: the one it proposes from)
            self.loss_vocab = drafter.draft_vocab.cpu()
            if self.d.main:
                print(f"dflash train: the loss ranges over the {len(self.loss_vocab)} draft-vocabulary tokens of "
                      f"{a.init_from} plus each batch's labels", flush=True)
        elif a.loss_vocab and not a.eval_only:
            self.loss_vocab, covered = frequent_tokens(self.train_set, a.loss_vocab, self.runtime.info.vocab_size, a.seed)
            if self.d.main:
                print(f"dflash train: the loss ranges over the {len(self.loss_vocab)} most frequent reply tokens "
                      f"(they cover {100 * covered:.2f}% of sampled reply tokens) plus each batch's labels; "
                      "the drafter proposes from them", flush=True)
        self.drafter.draft_vocab = self.loss_vocab  # saved beside the weights; decoding and evaluation use it
        self.stop_requested = False

    # --- state ------------------------------------------------------------------------------

    def _find_state(self) -> dict[str, Any] | None:
        if self.args.resume is None or (self.args.resume == "auto" and self.out is None):
            return None
        path = self.out / STATE_FILE if self.args.resume == "auto" else Path(self.args.resume)
        if path.is_dir():
            path = path / STATE_FILE
        if not path.exists():
            if self.args.resume == "auto":
                return None  # nothing to continue yet: start fresh
            raise DFlashError(f"--resume: no training state at {path}")
        return torch.load(path, map_location="cpu", weights_only=False)

    def state_dict(self, compact: bool = False) -> dict[str, Any]:
        """Everything a resumed run needs. `compact` stores the optimizer moments in bf16
        (about half the size; resuming from it is close to, not bit-identical with, the run)."""
        opt = self.optimizer.state_dict()
        if compact:
            opt = {"param_groups": opt["param_groups"],
                   "state": {k: {n: (t.to(torch.bfloat16) if t.dim() > 0 else t) for n, t in s.items()}
                             for k, s in opt["state"].items()}}
        return {
            "config": self.config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.drafter.state_dict().items()},
            "optimizer": opt,
            "scheduler": self.scheduler.state_dict(),
            "step": self.step, "epoch": self.epoch, "cursor": self.cursor, "best_tau": self.best_tau,
            "max_steps": self.max_steps, "fitted": self.fitted,
            "loss_vocab": self.loss_vocab,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "args": {k: v for k, v in vars(self.args).items() if k != "func"},
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.drafter.load_state_dict(state["model"])
        opt = state["optimizer"]
        for s in opt["state"].values():  # compact states hold bf16 moments
            for n, t in s.items():
                if t.dim() > 0:
                    s[n] = t.float()
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.cursor = state["step"], state["epoch"], state["cursor"]
        self.best_tau = state.get("best_tau", -1.0)
        if state.get("fitted"):
            self._set_schedule(state["max_steps"])
        self.loss_vocab = state.get("loss_vocab")
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self, folder: Path | None = None, compact: bool = False) -> None:
        """Training state + the current drafter in the released format (rank 0 only)."""
        if not self.d.main:
            return
        folder = folder or self.out
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save(self.state_dict(compact), tmp)
        tmp.replace(folder / STATE_FILE)
        if not compact:
            self.drafter.save_pretrained(str(folder / "drafter"))

    def _set_schedule(self, max_steps: int) -> None:
        """Make the warm-up and cosine span `max_steps` (from --fit-minutes)."""
        a = self.args
        self.max_steps, self.fitted = max_steps, True
        self.scheduler = cosine_schedule(self.optimizer, max_steps, a.warmup, a.min_lr_ratio,
                                         last_step=self.scheduler.last_epoch - 1)

    def _fit_schedule(self, started: float, probe: tuple[float, int]) -> None:
        """--fit-minutes: the steps that fit in the rest of the budget at the rate since `probe`."""
        t0, s0 = probe
        now = time.time()
        per_step = (now - t0) / max(1, self.step - s0)
        left = 60 * self.args.fit_minutes - (now - started)
        fitted = self.step + max(1, int(left / per_step))
        if self.d.world > 1:  # every rank must agree on the schedule
            fitted = int(all_sum(torch.tensor([fitted], device=self.device), self.d).item()) // self.d.world
        self._set_schedule(fitted)
        if self.d.main:
            print(f"dflash train: {per_step:.3f} s per step; --fit-minutes {self.args.fit_minutes:g} "
                  f"-> {fitted} steps", flush=True)

    # --- data ------------------------------------------------------------------------------

    def next_rows(self) -> list[int]:
        """This process's conversations for the next optimizer step; advances the data position."""
        if self._order is None:
            self._order = epoch_order(self.file_sizes, self.epoch, self.args.seed, self.args.in_order)
        if self.cursor + self.per_step > len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = epoch_order(self.file_sizes, self.epoch, self.args.seed, self.args.in_order)
        take = self._order[self.cursor: self.cursor + self.per_step]
        self.cursor += self.per_step
        return take[self.d.rank:: self.d.world]

    def anchors_for(self, index: int, loss_mask: torch.Tensor, epoch: int, count: int) -> torch.Tensor:
        """Anchors of conversation `index` in `epoch`: random, fresh each epoch, and the same
        whenever that (seed, epoch, index) comes round again, so resumed runs draw alike."""
        g = torch.Generator().manual_seed((self.args.seed * 1_000_003 + epoch) * 10_000_019 + index)
        return sample_anchors(loss_mask, count, g)

    def load_items(self, dataset: ConversationDataset, indices: list[int], epoch: int, count: int):
        rows = [dataset[i] for i in indices]
        keys = [dataset.key(i) if dataset is self.train_set else None for i in indices]
        feats = self.features.many([ids for ids, _ in rows], keys)  # one target forward for the misses
        items = [(f, ids, loss_mask) for f, (ids, loss_mask) in zip(feats, rows)]
        anchors = [self.anchors_for(i, loss_mask, epoch, count) for i, (_, loss_mask) in zip(indices, rows)]
        return items, anchors

    # --- loop ---------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, BlockStats]:
        """One optimizer step over batch_size * grad_accum conversations per process."""
        a = self.args
        rows = self.next_rows()
        stats = BlockStats.zeros(self.block_size)
        total = 0.0
        epoch = self.epoch
        micro = [rows[i: i + a.batch_size] for i in range(0, len(rows), a.batch_size)]
        for j, chunk in enumerate(micro):
            items, anchors = self.load_items(self.train_set, chunk, epoch, a.anchors_per_seq)
            batch = make_batch(items, anchors, self.block_size, self.config.mask_token_id, self.feature_width)
            sync = j == len(micro) - 1 or self.d.world == 1
            ctx = self.ddp.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                loss, _ = forward_loss(self.ddp, self.runtime, self.head, batch, self.weights, stats, self.loss_vocab,
                                       a.soft_weight, self.cpu_bf16)
                (loss / len(micro)).backward()
            total += loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), a.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return total, stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Loss, per-position accuracy and simulated acceptance length on the held-out rows
        (fixed anchors, so evaluations are comparable), over the vocabulary the drafter proposes
        from."""
        self.drafter.eval()
        stats = BlockStats.zeros(self.block_size)
        loss_sum = torch.zeros(2)
        for i in range(self.d.rank, len(self.eval_set), self.d.world):
            items, anchors = self.load_items(self.eval_set, [i], -1, self.args.anchors_per_seq)
            batch = make_batch(items, anchors, self.block_size, self.config.mask_token_id, self.feature_width)
            # hard labels only: held-out losses compare across --soft-weight
            loss, n = forward_loss(self.drafter, self.runtime, self.head, batch, self.weights, stats, self.loss_vocab)
            loss_sum += torch.tensor([float(loss) * n, n])
        self.drafter.train()
        if self.d.world > 1:
            loss_sum = all_sum(loss_sum.to(self.device), self.d).cpu()
            stats = BlockStats.from_tensor(all_sum(stats.as_tensor().to(self.device), self.d).cpu())
        return {"step": self.step, "eval_loss": float(loss_sum[0] / loss_sum[1].clamp(min=1)),
                "eval_acc": stats.accuracy, "eval_tau": stats.tau,
                "eval_acc_per_position": [round(x, 4) for x in stats.per_position]}

    def log(self, record: dict[str, Any]) -> None:
        if self.d.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _should_stop(self, started: float) -> bool:
        """Stop on a signal or when --max-minutes is spent (agreed by every rank)."""
        want = self.stop_requested or (
            self.args.max_minutes is not None and time.time() - started > 60 * self.args.max_minutes)
        flag = all_sum(torch.tensor([float(want)], device=self.device), self.d)
        return bool(flag.item() > 0)

    def run(self) -> dict[str, Any]:
        a = self.args
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            print(f"dflash train: {len(self.train_set)} train / {len(self.eval_set)} held-out conversations, "
                  f"{self.per_step} per step, steps {self.step} -> {self.max_steps}, drafter "
                  f"{sum(p.numel() for p in self.drafter.parameters()) / 1e6:.2f}M params, "
                  f"target layers {self.config.target_layer_ids}, block {self.block_size}, world {self.d.world}",
                  flush=True)
        signal.signal(signal.SIGTERM, self._on_signal)
        bar = None
        if self.d.main and not a.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=2)
        started = last_save = last_export = time.time()
        result: dict[str, Any] = {}
        window = BlockStats.zeros(self.block_size)
        window_loss, window_n = 0.0, 0
        first_step, probe = self.step, None
        while self.step < self.max_steps:
            loss, stats = self.train_step()
            if a.fit_minutes and not self.fitted:
                if self.step - first_step == 2:
                    probe = (time.time(), self.step)
                elif probe is not None and self.step - first_step == FIT_PROBE_STEPS + 2:
                    self._fit_schedule(started, probe)
                    if bar is not None:
                        bar.total = self.max_steps
            window.merge(stats)
            window_loss, window_n = window_loss + loss, window_n + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{stats.accuracy:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.step % a.log_every == 0:
                self.log({"step": self.step, "epoch": self.epoch, "loss": window_loss / window_n,
                          "acc": window.accuracy, "tau": window.tau, "lr": self.scheduler.get_last_lr()[0],
                          "elapsed_s": round(time.time() - started, 1)})
                window, window_loss, window_n = BlockStats.zeros(self.block_size), 0.0, 0
            if self.step % a.eval_every == 0 or self.step == self.max_steps:
                result = self._evaluate_and_keep_best(bar)
            now = time.time()
            if now - last_save > 60 * a.save_minutes or (a.save_every and self.step % a.save_every == 0):
                self.save()
                last_save = now
            if a.export_state and now - last_export > 60 * a.export_minutes:
                self.save(Path(a.export_state), compact=True)
                last_export = now
            if self._should_stop(started):
                break
        self.save()
        if a.export_state:
            self.save(Path(a.export_state), compact=True)
        if bar is not None:
            bar.close()
        if self.d.main:
            print(f"dflash train: stopped at step {self.step}/{self.max_steps}; state in {self.out / STATE_FILE}",
                  flush=True)
        return result

    def _evaluate_and_keep_best(self, bar: Any) -> dict[str, Any]:
        if not len(self.eval_set):
            return {}
        result = self.evaluate()
        self.log(result)
        if self.d.main:
            msg = (f"eval step {self.step}: loss {result['eval_loss']:.3f}, acc {result['eval_acc']:.3f}, "
                   f"tau {result['eval_tau']:.2f}, per position {result['eval_acc_per_position'][:6]}")
            (bar.write if bar is not None else print)(msg)
            sys.stdout.flush()
            if result["eval_tau"] > self.best_tau:
                self.best_tau = result["eval_tau"]
                self.drafter.save_pretrained(str(self.out / "best"))
                if self.args.release_dir:
                    self.drafter.save_pretrained(self.args.release_dir)
                with open(self.out / "best" / "eval.json", "w") as f:
                    json.dump(result, f, indent=1)
        return result

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested = True  # finish the step, save, exit


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or continue) a training run; returns the last evaluation."""
    trainer = Trainer(args)
    try:
        if args.eval_only:
            result = trainer.evaluate()
            if trainer.d.main:
                print(json.dumps({"drafter": args.init_from or args.resume, "held_out": len(trainer.eval_set),
                                  **result}), flush=True)
            return result
        return trainer.run()
    finally:
        close_distributed(trainer.d)


def main(argv: list[str] | None = None) -> int:
    """`python -m dflash.train.trainer` (what torchrun launches): the `dflash train` flags."""
    parser = argparse.ArgumentParser(prog="dflash.train.trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        train(args)
    except DFlashError as exc:
        print(f"dflash train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
