"""A drafter as a GGUF file that llama.cpp's DFlash speculative decoding loads.

llama.cpp (`llama-server --spec-type draft-dflash -md DRAFTER.gguf`) runs a DFlash drafter as a
model of architecture `dflash`. Its own converter needs a llama.cpp checkout and the target as a
Hugging Face folder; this module writes the same file from a drafter folder and the target's GGUF
alone. What llama.cpp reads (its `src/models/dflash.cpp`, `src/llama-model.cpp`,
`common/speculative.cpp`):

- the usual `dflash.*` transformer keys (layers, widths, heads, rope base, RMS epsilon);
- `dflash.block_size`, the block the drafter was trained for (it drafts block_size - 1 tokens);
- `dflash.target_layers`: the target layers whose features feed `fc`. llama.cpp takes them from
  the *input* of a target layer, so it counts the embedding output as layer 0 and the output of
  decoder layer i as i + 1: the checkpoint's `target_layer_ids`, each plus one;
- `tokenizer.ggml.mask_token_id`, and the target's whole tokenizer: llama.cpp checks that drafter
  and target vocabularies agree before it speculates;
- tensors `fc`, `enc.output_norm` (the checkpoint's hidden_norm), `output_norm` and per layer
  `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm, ffn_norm,
  ffn_gate, ffn_up, ffn_down}`; no embedding table or LM head: the target's are used.

The `gguf` package on PyPI may not know the `dflash` architecture yet, so every key is written
here by name rather than through its per-architecture helpers.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dflash.config import DFlashConfig
from dflash.errors import DFlashError, IncompatibleDrafterError

ARCH = "dflash"

# Target architectures (GGUF `general.architecture`) whose llama.cpp graph hands the input of its
# decoder layers to a drafter (`res->t_layer_inp[il]` in src/models/*.cpp, llama-cpp-python 0.3.36).
# A target of any other architecture (qwen2, gemma3, phi3, ...) runs, but cannot feed a DFlash drafter.
FEATURE_ARCHS = frozenset({
    "bailingmoe3", "deepseek4", "gemma4", "gpt-oss", "hunyuan_vl", "lfm2", "llama", "mimo2", "minimax-01",
    "minimax-m2", "muse-glimmer", "nanbeige", "nemotron_h", "qwen3", "qwen35", "qwen35moe", "qwen3moe",
    "qwen3next", "qwen4exp",
})
# Of those, the ones whose graph also exposes the last decoder layer's output (layer input L).
LAST_OUTPUT_ARCHS = frozenset({"deepseek4", "mimo2", "nemotron_h"})

# --outtype: the type of the 2-D weight matrices. Norm vectors are always float32 (ggml wants them so).
OUTTYPES = ("f16", "bf16", "f32")
_FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32}  # general.file_type (llama_ftype ALL_F32, MOSTLY_F16, MOSTLY_BF16)

# checkpoint name (per layer, after `layers.N.`) -> llama.cpp name (after `blk.N.`)
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {"fc": "fc", "hidden_norm": "enc.output_norm", "norm": "output_norm"}


def gguf_tensor_name(checkpoint_name: str) -> str:
    """llama.cpp's name for a drafter tensor of the released checkpoint format."""
    stem = checkpoint_name.removesuffix(".weight")
    if stem in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[stem] + ".weight"
    parts = stem.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"blk.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
    raise DFlashError(f"drafter tensor {checkpoint_name!r} has no counterpart in llama.cpp's DFlash model")


@dataclass
class TargetGGUF:
    """What the export needs from the target's GGUF: its shape and its tokenizer."""

    path: Path
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    # (key, value, value type, element type for arrays) of every `tokenizer.*` key
    tokenizer: list[tuple[str, Any, Any, Any]] = field(default_factory=list)


def read_target(path: str | os.PathLike) -> TargetGGUF:
    """Read the target GGUF's architecture, sizes and tokenizer keys (no tensor data)."""
    import gguf

    p = Path(path).expanduser()
    if p.suffix.lower() != ".gguf" or not p.is_file():
        raise DFlashError(
            f"--target {path}: llama.cpp needs the target as a .gguf file (its tokenizer is copied into the "
            "drafter and the server runs it); convert a Hugging Face target with llama.cpp's convert_hf_to_gguf.py")
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as exc:  # truncated or not a GGUF: one line, not the parser's traceback
        raise DFlashError(f"{p} is not a readable GGUF file: {type(exc).__name__}: {exc}") from None

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            raise DFlashError(f"{p} has no {key!r}: not a model GGUF llama.cpp can serve")
        return f.contents()

    arch = str(value("general.architecture"))
    tokenizer = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.ggml.mask_token_id":
            continue
        main = f.types[0]
        sub = f.types[1] if main == gguf.GGUFValueType.ARRAY else None
        if main == gguf.GGUFValueType.ARRAY and (len(f.types) != 2 or sub == gguf.GGUFValueType.ARRAY):
            raise DFlashError(f"{p}: tokenizer key {key!r} is a nested array, which this export cannot copy")
        tokenizer.append((key, f.contents(), main, sub))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise DFlashError(f"{p} carries no tokenizer (tokenizer.ggml.tokens); the drafter needs the target's")
    return TargetGGUF(path=p, architecture=arch, num_layers=int(value(f"{arch}.block_count")),
                      hidden_size=int(value(f"{arch}.embedding_length")), vocab_size=len(tokens.data),
                      tokenizer=tokenizer)


def check_exportable(config: DFlashConfig, target: TargetGGUF) -> None:
    """Refuse, with the reason, a drafter llama.cpp would load wrongly or not feed at all."""
    if target.architecture not in FEATURE_ARCHS:
        raise DFlashError(
            f"llama.cpp cannot feed a DFlash drafter from a {target.architecture!r} target: its graph for that "
            f"architecture does not hand over layer features (it does for {', '.join(sorted(FEATURE_ARCHS))})")
    if config.num_target_layers != target.num_layers:
        raise IncompatibleDrafterError(
            f"the drafter was trained on a target of {config.num_target_layers} layers; {target.path.name} has "
            f"{target.num_layers}")
    if config.hidden_size != target.hidden_size:
        raise IncompatibleDrafterError(
            f"the drafter's hidden size {config.hidden_size} differs from the target's {target.hidden_size}")
    if config.vocab_size != target.vocab_size:
        raise IncompatibleDrafterError(
            f"the drafter's vocabulary has {config.vocab_size} tokens, {target.path.name}'s tokenizer "
            f"{target.vocab_size}")
    if target.architecture not in LAST_OUTPUT_ARCHS and max(config.target_layer_ids) >= target.num_layers - 1:
        raise DFlashError(
            f"target_layer_ids {config.target_layer_ids} include the target's last layer "
            f"({target.num_layers - 1}); llama.cpp reads features at the input of the next layer, which a "
            f"{target.architecture!r} target does not have")
    if config.attention_bias:
        raise DFlashError("the drafter has attention biases; llama.cpp's DFlash model has no bias tensors")
    if config.hidden_act != "silu":
        raise DFlashError(f"hidden_act {config.hidden_act!r}: this export writes SwiGLU (silu) drafters only")
    if config.rope_scaling:
        kind = config.rope_scaling.get("rope_type", config.rope_scaling.get("type"))
        raise DFlashError(f"rope_scaling {kind!r}: this export writes drafters with plain RoPE only")


def _metadata(config: DFlashConfig, name: str, outtype: str) -> list[tuple[str, Any, str]]:
    """(key, value, kind) of every key besides the tokenizer's, kind one of u32/f32/str/i32[]/bool[]."""
    keys: list[tuple[str, Any, str]] = [
        ("general.name", name, "str"),
        ("general.file_type", _FILE_TYPE[outtype], "u32"),
        (f"{ARCH}.block_count", config.num_hidden_layers, "u32"),
        (f"{ARCH}.context_length", config.max_position_embeddings, "u32"),
        (f"{ARCH}.embedding_length", config.hidden_size, "u32"),
        (f"{ARCH}.feed_forward_length", config.intermediate_size, "u32"),
        (f"{ARCH}.attention.head_count", config.num_attention_heads, "u32"),
        (f"{ARCH}.attention.head_count_kv", config.num_key_value_heads, "u32"),
        (f"{ARCH}.attention.key_length", config.head_dim, "u32"),
        (f"{ARCH}.attention.value_length", config.head_dim, "u32"),
        (f"{ARCH}.attention.layer_norm_rms_epsilon", config.rms_norm_eps, "f32"),
        (f"{ARCH}.rope.dimension_count", config.head_dim, "u32"),
        (f"{ARCH}.rope.freq_base", config.rope_theta, "f32"),
        (f"{ARCH}.block_size", config.block_size, "u32"),
        (f"{ARCH}.target_layers", [i + 1 for i in config.target_layer_ids], "i32[]"),
        ("tokenizer.ggml.mask_token_id", config.mask_token_id, "u32"),
    ]
    if config.use_swa:  # every draft layer attends to a window of the context
        keys.append((f"{ARCH}.attention.sliding_window", config.swa_window_size, "u32"))
        keys.append((f"{ARCH}.attention.sliding_window_pattern", [True] * config.num_hidden_layers, "bool[]"))
    return keys


def write_gguf(state: dict[str, Any], config: DFlashConfig, target: TargetGGUF, out: str | os.PathLike, *,
               outtype: str = "f16", name: str = "DFlash drafter") -> Path:
    """Write the drafter (`state`: checkpoint name -> torch tensor) as llama.cpp's `dflash` GGUF.

    Written to a temporary name first, so an interrupted export never leaves a file llama.cpp
    would half-load."""
    import gguf
    import numpy as np
    import torch

    if outtype not in OUTTYPES:
        raise DFlashError(f"--outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    check_exportable(config, target)
    out = Path(out).expanduser().resolve()
    if out.suffix.lower() != ".gguf":
        raise DFlashError(f"{out}: the output must be a .gguf file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=ARCH)  # writes general.architecture = "dflash"
    t = gguf.GGUFValueType
    for key, val, kind in _metadata(config, name, outtype):
        if kind == "u32":
            writer.add_uint32(key, int(val))
        elif kind == "f32":
            writer.add_float32(key, float(val))
        elif kind == "str":
            writer.add_string(key, str(val))
        elif kind == "i32[]":
            writer.add_key_value(key, [int(v) for v in val], t.ARRAY, sub_type=t.INT32)
        else:
            writer.add_key_value(key, [bool(v) for v in val], t.ARRAY, sub_type=t.BOOL)
    for key, val, main, sub in target.tokenizer:
        writer.add_key_value(key, val, main, sub_type=sub)

    for ckpt_name in sorted(state):
        tensor = state[ckpt_name].detach().to("cpu")
        gname = gguf_tensor_name(ckpt_name)
        if tensor.dim() == 1 or outtype == "f32":
            writer.add_tensor(gname, tensor.to(torch.float32).contiguous().numpy())
        elif outtype == "f16":
            if float(tensor.abs().max()) > 65504.0:
                raise DFlashError(f"{ckpt_name} holds values beyond float16's range; export with --outtype bf16")
            writer.add_tensor(gname, tensor.to(torch.float16).contiguous().numpy())
        else:  # numpy has no bfloat16: hand the writer the raw 16-bit words and say what they are
            words = tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            writer.add_tensor(gname, words, raw_shape=words.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out)
    return out


def serve_command(target: str | os.PathLike, drafter_gguf: str | os.PathLike, block_size: int) -> str:
    """The llama-server command that serves `target` with the exported drafter: block_size - 1
    drafts per step, the most llama.cpp takes from a drafter of that block; `--metrics` exposes its
    acceptance counters to `dflash bench`."""
    return (f"llama-server -m {shlex.quote(str(target))} -md {shlex.quote(str(drafter_gguf))} "
            f"--spec-type draft-dflash --spec-draft-n-max {block_size - 1} --metrics")
