"""The fp16 CPU target's step operators in C++ (`csrc/fp16_steps.cpp`), built once with the
machine's C++ compiler and cached under dflash's cache folder.

Why: a decoding step calls fbgemm's fp16 product ~120 times. Called from Python, each call
spends ~13 us converting its packed-weight object into the dispatcher's argument type, ~1.3 ms
of a ~13 ms compiled step; the C++ operator holds the packed weights in a table and takes a slot
number instead (~4 us a call, same kernel, bit for bit the same result). `torch.compile`d steps
call these operators (inductor cannot trace the packed weights), and the eager fp16 forward
uses them too once they are loaded.

`--compile` needs a C++ compiler anyway (inductor generates C++), so it builds them; without a
compiler the eager fp16 forward keeps torch's own operator.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dflash.errors import DFlashError

SOURCE = Path(__file__).with_name("csrc") / "fp16_steps.cpp"
_out_features: list[int] = []  # per held slot, for the compiled graphs' shape inference
_state: dict[str, object] = {}  # "loaded": True, or "error": why it could not be


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_flags() -> set[str]:
    """The feature flags the CPU reports (/proc/cpuinfo; elsewhere just the machine type)."""
    try:
        line = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        return set(line.partition(":")[2].split())
    except OSError:
        return {os.uname().machine}


def compile_library(source: Path, library: Path, flags: list[str], what: str, without: str) -> None:
    """Compile `source` into the shared library `library` with the machine's C++ compiler, saying
    so once on stderr; `what` names it in messages, `without` says what runs without a compiler."""
    compiler = _compiler()
    if compiler is None:
        raise DFlashError(f"no C++ compiler found (set CXX, or install g++): {what} needs one; {without}")
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as partial:
        pass  # built under a temporary name, then renamed
    print(f"dflash: building {what} with {compiler} (once, ~15 s) ...", file=sys.stderr, flush=True)
    try:
        result = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(source), "-o", partial.name],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise DFlashError(f"building {what} failed ({compiler}):\n" + result.stderr[-2000:])
        os.replace(partial.name, library)  # whole or not at all, also with a concurrent build
    finally:
        if os.path.exists(partial.name):
            os.unlink(partial.name)


def _build(library: Path) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths

    lib_dirs = library_paths()
    flags = ["-O2", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *[f"-I{path}" for path in include_paths()], *[f"-L{path}" for path in lib_dirs],
             *[f"-Wl,-rpath,{path}" for path in lib_dirs], "-ltorch_cpu", "-lc10"]
    compile_library(SOURCE, library, flags, "dflash's native fp16 operators", "the fp16 path runs torch's own operator")


def load() -> None:
    """Build (first time, ~10 s) and load the operators; raises DFlashError saying why not."""
    if _state.get("loaded"):
        return
    if "error" in _state:
        raise DFlashError(str(_state["error"]))
    from dflash.runtime.loader import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__} {sys.platform}".encode()).hexdigest()[:16]
    library = cache_dir() / "native" / key / "dflash_native.so"
    try:
        if not library.exists():
            _build(library)
        torch.ops.load_library(str(library))
    except (DFlashError, OSError, RuntimeError) as error:
        _state["error"] = error if isinstance(error, DFlashError) else f"loading {library} failed: {error}"
        raise DFlashError(str(_state["error"])) from error

    torch.library.register_fake("dflash_native::linear_fp16")(
        lambda x, slot: x.new_empty((x.shape[0], _out_features[slot])))
    torch.library.register_fake("dflash_native::attend_cached")(
        lambda q, k, v, keys, values, positions, mask, scale: torch.empty_like(q))
    _state["loaded"] = True


def loaded() -> bool:
    return bool(_state.get("loaded"))


def try_load() -> bool:
    """`load()`, answering whether the operators are there instead of raising."""
    try:
        load()
    except DFlashError:
        return False
    return True


def hold(packed: object, out_features: int) -> int:
    """Keep fbgemm packed fp16 weights in the operators' table; returns their slot."""
    slot = torch.ops.dflash_native.hold(packed)
    assert slot == len(_out_features), "slots are handed out in order"
    _out_features.append(out_features)
    return slot


def release(slot: int) -> None:
    """Drop the table's reference to a slot's weights (their module is gone)."""
    if torch is not None and loaded():  # (at interpreter exit the modules may already be torn down)
        torch.ops.dflash_native.release(slot)
