"""What the decoding engines, the drafter and training ask of a target model, whatever computes
it: the transformers forward, the lean fp16 forward, or the native GGUF runtime.

A runtime owns its cache. The engine only holds it and names rows of it: `prefill` adds a row,
`step` runs a block of tokens after each named row's committed tokens, `commit` says how many of
that block each row keeps (the rest are forgotten: rejected drafts), `drop` removes rows. Nothing
is stored on the model object the runtime wraps, and the engine never sees the cache's layout.

`exact_blocks` is the runtime's promise that a block of n tokens gives every position the logits
and features (bit for bit) that n one-token steps give: speculative decoding is then token-identical
to plain decoding through the same runtime by construction, not only where no two logits nearly tie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from dflash.errors import IncompatibleDrafterError


@dataclass(frozen=True)
class TargetInfo:
    """Facts about a target the engines and the drafter check against."""

    model_type: str           # "llama", "qwen3", ...
    name: str                 # where it came from (a path, a Hub id), for messages
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_positions: int
    device: torch.device
    dtype: torch.dtype        # of embeddings, features and logits handed out
    precision: str = ""       # how its weights are computed with, for a one-line account ("float32", "fp16", "gguf q4_1")


@dataclass
class StepOutput:
    """What one prefill or step computed for its rows."""

    tokens: torch.Tensor              # [rows, n] int64: each position's greedy choice (argmax of its logits)
    logits: torch.Tensor | None       # [rows, n, vocab]: only when asked for (sampling)
    features: torch.Tensor | None     # [rows, n, len(feature_layers) * hidden]: when feature layers are bound


@runtime_checkable
class TargetRuntime(Protocol):
    """A target model as the engines drive it (see the module docstring)."""

    info: TargetInfo
    exact_blocks: bool                 # a block computes each row exactly as one-token steps would
    feature_layers: tuple[int, ...]    # hidden states after these layers (0-based) form the features

    def bind(self, feature_layers: Sequence[int]) -> None:
        """Return features of these layers from now on (a drafter's `target_layer_ids`; empty: none)."""

    def new_cache(self, max_rows: int = 1) -> Any:
        """An empty cache for up to `max_rows` sequences (opaque to the caller)."""

    def prefill(self, cache: Any, ids: torch.Tensor, *, logits: bool = False) -> tuple[int, StepOutput]:
        """Run a prompt (`ids`: [n]) as a new row of `cache`; returns the row's id and the output:
        tokens/logits of the last position only ([1, 1]), features of every position ([1, n, F])."""

    def step(self, cache: Any, rows: Sequence[int], ids: torch.Tensor, *, logits: bool = False) -> StepOutput:
        """Run `ids` ([len(rows), n]) after each row's committed tokens; every position's output.
        The block stays in the cache until `commit` says how much of it each row keeps."""

    def commit(self, cache: Any, rows: Sequence[int], keep: Sequence[int]) -> None:
        """After a step: row `rows[i]` keeps the first `keep[i]` tokens of its block, forgets the rest."""

    def drop(self, cache: Any, rows: Sequence[int]) -> None:
        """Remove rows from the cache (finished or cancelled sequences)."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's input embeddings of `ids` (the drafter embeds its block with them)."""

    def lm_head(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of every token, or of the token ids in `vocab` only (in that order)."""

    def draft_rows(self, drafter: Any) -> Any | None:
        """A faster draft pass beside this runtime for `drafter` (the draft caches of the rows
        being decoded, dflash/decode/drafting.py's interface), or None: the drafter's own pass."""

    def head_weight(self) -> torch.Tensor:
        """Training: the LM head as one float32 matrix [vocab, hidden] (the drafter's loss is
        differentiated through it)."""

    def features(self, seqs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Training: features ([1, n_i, F]) of whole sequences, with the numbers decoding computes."""

    def warmup(self, block_sizes: Sequence[int]) -> float:
        """Prepare every step shape a decoding will ask for (compile, build); returns the seconds spent."""


def check_drafter(info: TargetInfo, config: Any) -> None:
    """Refuse a drafter built for another target before it decodes garbage slowly."""
    problems = []
    if config.hidden_size != info.hidden_size:
        problems.append(f"hidden size {config.hidden_size} != target's {info.hidden_size}")
    if config.vocab_size != info.vocab_size:
        problems.append(f"vocabulary {config.vocab_size} != target's {info.vocab_size}")
    if config.num_target_layers != info.num_layers:
        problems.append(f"trained on a {config.num_target_layers}-layer target, this one has {info.num_layers}")
    elif max(config.target_layer_ids) >= info.num_layers:
        problems.append(f"target_layer_ids {config.target_layer_ids} exceed the target's {info.num_layers} layers")
    if problems:
        raise IncompatibleDrafterError(
            f"this drafter does not fit target {info.model_type} ({info.name or 'unnamed'}): " + "; ".join(problems))
