"""Does real decoding accept what the trainer's evaluation says the drafter gets right?

For each prompt of an evaluation set this decodes with DFlash (greedy, the shipped drafter by
default) and then scores the drafter teacher-forced on exactly the text it just decoded, with
the trainer's own masked forward (`dflash.train.trainer.block_hidden`) at every anchor of the
answer. It prints, per draft position:

- real: of the verify steps that reached draft k (drafts 1..k-1 accepted), the share that
  accepted draft k too;
- teacher-forced: the share of anchors where draft k is the target's next token.

Draft 1 is comparable directly (both are unconditional). A gap there means the drafter sees
something different when decoding than in training (block length, context, positions); no
gap with low numbers means it needs more training. Float32 target, no draft threshold.

    python benchmarks/acceptance_gap.py --prompts 5 --block-size 4
"""

from __future__ import annotations

import argparse

import torch

from dflash import DFlashDraftModel, chat_input_ids, default_drafter_path, generate, load_target
from dflash.bench.report import acceptance_summary
from dflash.datasets import eval_prompts
from dflash.runtime.loader import stop_token_ids
from dflash.train.blocks import BlockStats, valid_anchors
from dflash.train.features import TargetFeatures
from dflash.train.trainer import block_hidden, make_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gsm8k", help="evaluation set (default gsm8k)")
    p.add_argument("--prompts", type=int, default=5, help="prompts (default 5)")
    p.add_argument("--new-tokens", type=int, default=256, help="new tokens per prompt (default 256)")
    p.add_argument("--block-size", type=int, default=None, help="verified block (default: the drafter's)")
    p.add_argument("--draft", default=None, help="drafter folder (default: the shipped one)")
    p.add_argument("--data-dir", default=None, help="folder with eval/NAME.jsonl (default $DFLASH_DATA_DIR)")
    args = p.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_target(None, cpu_weights="float32")
    drafter = DFlashDraftModel.from_pretrained(args.draft or str(default_drafter_path()), dtype="float32", device="cpu")
    block = args.block_size or drafter.block_size
    trained = drafter.block_size
    stops = stop_token_ids(tokenizer, model)
    features = TargetFeatures(model, drafter.target_layer_ids)
    lengths: list[int] = []
    drafted: list[int] = []
    teacher = BlockStats.zeros(trained)
    for turns in eval_prompts(args.dataset, args.data_dir, args.prompts):
        prompt = chat_input_ids(tokenizer, [{"role": "user", "content": turns[0]}])
        stats = generate(model, drafter, prompt, max_new_tokens=args.new_tokens, block_size=block,
                         stop_token_ids=stops)
        lengths += stats.acceptance_lengths
        drafted += stats.draft_lengths
        ids = stats.output_ids[0]
        supervised = torch.arange(len(ids)) >= len(prompt)
        with torch.no_grad():
            feats = features(ids)
            for anchors in valid_anchors(supervised).split(32):
                batch = make_batch([(feats, ids, supervised)], [anchors], trained, drafter.mask_token_id)
                hidden = block_hidden(drafter, model, batch, trained)
                vocab = drafter.draft_vocab  # as decoding: only draft-vocabulary tokens are proposed
                if vocab is None:
                    guesses = model.lm_head(hidden).argmax(-1)
                else:
                    guesses = vocab[model.lm_head(hidden, vocab=vocab).argmax(-1)]
                teacher.update(guesses[0], batch.labels[0])
        print(f"tau {stats.tau:.2f}  {tokenizer.decode(stats.new_tokens[:50])!r}", flush=True)
    real = [x or 0.0 for x in acceptance_summary(lengths, block, drafted)["per_position_acceptance"]]
    print(f"block {block} (drafted as {trained}), {args.prompts} {args.dataset} prompts")
    print("draft position         " + " ".join(f"{k:>6}" for k in range(1, block)))
    print("real acceptance        " + " ".join(f"{x:6.3f}" for x in real))
    print("teacher-forced correct " + " ".join(f"{x:6.3f}" for x in teacher.per_position[: block - 1]))


if __name__ == "__main__":
    main()
