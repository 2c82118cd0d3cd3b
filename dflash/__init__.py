"""dflash: lossless speculative decoding with DFlash block-diffusion drafters."""

from dflash.config import DFlashConfig
from dflash.decode.engine import GenerationStats, generate, stream
from dflash.decode.sampling import SamplingParams
from dflash.model.drafter import DFlashDraftModel
from dflash.runtime.base import TargetRuntime
from dflash.runtime.hf import TransformersRuntime
from dflash.runtime.loader import chat_input_ids, load_target, runtime_for, stop_token_ids
from dflash.drafters import default_drafter_path

__all__ = [
    "DFlashConfig", "DFlashDraftModel", "GenerationStats", "SamplingParams", "TargetRuntime", "TransformersRuntime",
    "chat_input_ids", "default_drafter_path", "generate", "load_target", "runtime_for", "stop_token_ids", "stream",
]
__version__ = "0.1.0"
