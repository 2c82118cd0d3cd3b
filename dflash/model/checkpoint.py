"""Reading and writing drafters in the released format: config.json + bf16 model.safetensors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dflash.config import CONFIG_FILE, DRAFT_VOCAB_FILE, WEIGHTS_FILE, DFlashConfig, tensor_names
from dflash.errors import DFlashError
from dflash.model.drafter import DFlashDraftModel, RotaryEmbedding


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are ~400x slower there without AVX-512), bf16 on GPUs."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DFlashError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DFlashError(f"device {device!r} asked for, but this PyTorch sees no CUDA GPU: use --device cpu")
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, str):
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise DFlashError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        return value
    return dtype


def _local_folder(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise DFlashError(f"no drafter folder at {name_or_path!r} (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:  # a Hub id such as z-lab/Qwen3-8B-DFlash-b16
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, DRAFT_VOCAB_FILE]))
    except Exception as exc:  # offline, unknown repo, gated repo: one clear message
        raise DFlashError(
            f"{name_or_path!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from exc


def read_config(folder: str | Path) -> DFlashConfig:
    path = Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DFlashError(f"{folder} has no {CONFIG_FILE}: not a drafter checkpoint") from None
    except json.JSONDecodeError as exc:
        raise DFlashError(f"{path} is not valid JSON: {exc}") from None
    try:
        return DFlashConfig.from_dict(raw)
    except ValueError as exc:
        raise DFlashError(f"{path}: {exc}") from None


def load_drafter(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None) -> DFlashDraftModel:
    """A drafter from a released-format folder or Hub id; every tensor must be present with the
    right shape (a partial load would decode, slowly and silently, with random weights)."""
    folder = _local_folder(str(name_or_path))
    config = read_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists():
        raise DFlashError(f"{folder} has no {WEIGHTS_FILE}")
    state = load_file(str(weights_path))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    expected = set(tensor_names(config.num_hidden_layers))
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise DFlashError(
            f"{weights_path} does not match its config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    device_ = resolve_device(device)
    with torch.device("meta"):
        model = DFlashDraftModel(config)
    for name, param in model.named_parameters():
        if tuple(state[name].shape) != tuple(param.shape):
            raise DFlashError(f"{weights_path}: {name} has shape {tuple(state[name].shape)}, "
                              f"the config implies {tuple(param.shape)}")
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary_emb = RotaryEmbedding(config)  # its buffer is computed, not stored
    model.draft_vocab = read_draft_vocab(folder, config.vocab_size)
    return model.to(device=device_, dtype=resolve_dtype(dtype, device_)).eval()


def read_draft_vocab(folder: Path, vocab_size: int) -> torch.Tensor | None:
    """The optional draft vocabulary: sorted, distinct token ids below vocab_size."""
    path = folder / DRAFT_VOCAB_FILE
    if not path.exists():
        return None
    try:
        ids = torch.tensor(json.loads(path.read_text())["token_ids"], dtype=torch.long)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DFlashError(f"{path} is not a draft vocabulary ({{\"token_ids\": [...]}}): {exc}") from None
    if ids.dim() != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise DFlashError(f"{path}: token ids must be a non-empty list within the vocabulary (0..{vocab_size - 1})")
    return torch.unique(ids)


def save_drafter(model: DFlashDraftModel, path: str | os.PathLike) -> None:
    """config.json + bf16 model.safetensors, written to a temporary name first so an
    interrupted save never leaves a half-written checkpoint behind."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_FILE)
    tmp_config = folder / (CONFIG_FILE + ".tmp")
    tmp_config.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    os.replace(tmp_config, folder / CONFIG_FILE)
    vocab_path = folder / DRAFT_VOCAB_FILE
    if getattr(model, "draft_vocab", None) is not None:
        tmp_vocab = folder / (DRAFT_VOCAB_FILE + ".tmp")
        tmp_vocab.write_text(json.dumps({"token_ids": model.draft_vocab.tolist()}) + "\n")
        os.replace(tmp_vocab, vocab_path)
    elif vocab_path.exists():
        vocab_path.unlink()  # a stale vocabulary from an earlier save would mislead
