"""The drafter's configuration and every fact of the released checkpoint format.

One place for: config keys as the released drafters (and vLLM / SGLang) spell them, tensor
names, the default choice of target layers, and the package-wide defaults. Imports no other
dflash module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Files of a drafter checkpoint folder.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# optional: the token ids the drafter proposes from (a side file; vLLM and SGLang ignore it)
DRAFT_VOCAB_FILE = "draft_vocab.json"
ARCHITECTURE = "DFlashDraftModel"

# Package-wide defaults.
DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TARGET = "smollm2-135m-instruct"


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """Target layers whose outputs feed the drafter when a config names none.

    One draft layer reads the middle layer; n > 1 layers read n ids spread evenly from layer 1
    to layer L-3 (shallow features carry the token, deep ones the plan for the next tokens).
    """
    if num_target_layers < 1:
        raise ValueError("a target needs at least one decoder layer")
    if num_draft_layers <= 1:
        return [num_target_layers // 2]
    last = max(1, num_target_layers - 3)
    span = last - 1
    ids = [round(1 + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]
    return [min(i, num_target_layers - 1) for i in ids]


def tensor_names(num_layers: int) -> list[str]:
    """Every tensor of a drafter checkpoint, in the released naming."""
    names = ["fc.weight", "hidden_norm.weight", "norm.weight"]
    for i in range(num_layers):
        p = f"layers.{i}."
        names += [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v", "o")]
        names += [p + f"self_attn.{n}_norm.weight" for n in ("q", "k")]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return names


@dataclass
class DFlashConfig:
    """A DFlash drafter: a small Qwen3-shaped stack reading fused target features.

    Field names follow the released `config.json`; `target_layer_ids` and `mask_token_id` live
    under `dflash_config` there.
    """

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: list[int]
    mask_token_id: int
    block_size: int = DEFAULT_BLOCK_SIZE
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 40960
    hidden_act: str = "silu"
    attention_bias: bool = False
    # Optional sliding window over the context (vLLM's dflash_config.use_swa / swa_window_size).
    use_swa: bool = False
    swa_window_size: int | None = None
    # Keys we do not interpret but carry over unchanged on save (auto_map, dtype, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size <= 0 or self.num_hidden_layers <= 0:
            problems.append("hidden_size and num_hidden_layers must be positive")
        if self.num_attention_heads % max(self.num_key_value_heads, 1):
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if not self.target_layer_ids:
            problems.append("dflash_config.target_layer_ids is empty")
        if any(not 0 <= i < self.num_target_layers for i in self.target_layer_ids):
            problems.append(
                f"target_layer_ids {self.target_layer_ids} fall outside the target's "
                f"{self.num_target_layers} layers"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            problems.append(f"mask_token_id {self.mask_token_id} is not in the vocabulary")
        if self.block_size < 2:
            problems.append("block_size must be at least 2 (an anchor and one draft token)")
        if self.use_swa and not self.swa_window_size:
            problems.append("use_swa needs a positive swa_window_size")
        if problems:
            raise ValueError("invalid DFlash drafter config: " + "; ".join(problems))

    # --- reading and writing config.json ---------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DFlashConfig":
        """Read a released config (transformers 4.x or 5.x style)."""
        d = dict(raw)
        dflash = dict(d.pop("dflash_config", None) or {})
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "vocab_size") if k not in d]
        if missing:
            raise ValueError(f"not a DFlash drafter config: missing {', '.join(missing)}")
        theta, scaling = _rope_from_dict(d)
        heads = d["num_attention_heads"]
        num_target_layers = d.get("num_target_layers")
        layer_ids = dflash.get("target_layer_ids") or d.get("target_layer_ids")
        if num_target_layers is None and layer_ids is None:
            raise ValueError("not a DFlash drafter config: no num_target_layers or target_layer_ids")
        if layer_ids is None:
            layer_ids = default_target_layer_ids(num_target_layers, d["num_hidden_layers"])
        if num_target_layers is None:
            num_target_layers = max(layer_ids) + 1
        mask = dflash.get("mask_token_id", d.get("mask_token_id"))
        if mask is None:
            raise ValueError("not a DFlash drafter config: no dflash_config.mask_token_id")
        known = {f.name for f in dataclasses.fields(cls)}
        consumed = known | {"rope_parameters", "dflash_config", "sliding_window"}
        extra = {k: v for k, v in raw.items() if k not in consumed and k not in _WRITTEN_KEYS}
        swa_window = dflash.get("swa_window_size")
        return cls(
            hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads", heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            intermediate_size=d["intermediate_size"],
            vocab_size=d["vocab_size"],
            num_target_layers=num_target_layers,
            target_layer_ids=[int(i) for i in layer_ids],
            mask_token_id=int(mask),
            block_size=int(d.get("block_size", DEFAULT_BLOCK_SIZE)),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 40960),
            hidden_act=d.get("hidden_act", "silu"),
            attention_bias=bool(d.get("attention_bias", False)),
            use_swa=bool(dflash.get("use_swa", False)),
            swa_window_size=int(swa_window) if swa_window else None,
            extra=extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """The released config.json: a Qwen3 config plus the DFlash keys.

        Rope is written both as `rope_theta`/`rope_scaling` (what the released drafters and
        transformers 4.x use) and as `rope_parameters` (transformers 5.x), so every loader
        of either generation reads the same values.
        """
        dflash: dict[str, Any] = {
            "target_layer_ids": list(self.target_layer_ids),
            "mask_token_id": self.mask_token_id,
        }
        if self.use_swa:
            dflash.update(use_swa=True, swa_window_size=self.swa_window_size)
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {})}
        rope_parameters["rope_theta"] = self.rope_theta
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=[ARCHITECTURE],
            model_type="qwen3",
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            attention_bias=self.attention_bias,
            attention_dropout=0.0,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            rope_parameters=rope_parameters,
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size,
            layer_types=["full_attention"] * self.num_hidden_layers,
            sliding_window=self.swa_window_size if self.use_swa else None,
            use_sliding_window=False,
            tie_word_embeddings=False,
            torch_dtype="bfloat16",
            block_size=self.block_size,
            num_target_layers=self.num_target_layers,
            dflash_config=dflash,
        )
        return out


# Keys to_dict writes itself; on read they are never carried over as `extra`.
_WRITTEN_KEYS = {
    "architectures", "model_type", "attention_dropout", "layer_types", "use_sliding_window",
    "tie_word_embeddings", "torch_dtype", "rope_theta", "rope_scaling",
}


def _rope_from_dict(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) config."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", d.get("rope_theta", 1_000_000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        return theta, scaling
    scaling = d.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(d.get("rope_theta", 1_000_000.0)), scaling
