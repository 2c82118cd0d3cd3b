"""`--compile` mistakes are named, not tracebacks; `dflash serve` offers it with `--draft-threshold`."""

import io
import re
import sys

import pytest

from dflash.cli.main import main


def test_compile_without_fp16_weights_is_refused(tiny_target_dir, capsys):
    assert main(["generate", "--target", str(tiny_target_dir), "--block-size", "1", "--cpu-weights", "float32",
                 "--compile", "hi"]) == 2
    assert "--compile applies to the lean fp16 forward: add --cpu-weights fp16" in capsys.readouterr().err


def test_serve_offers_compile_and_a_draft_threshold(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--compile" in out and "--draft-threshold" in out


class Recorder(io.TextIOBase):
    """Stands in for stdout or stderr and notes every write, in one order for both."""

    def __init__(self, name: str, writes: list[tuple[str, str]]) -> None:
        self.name, self.writes = name, writes

    def write(self, text: str) -> int:
        self.writes.append((self.name, text))
        return len(text)


@pytest.mark.slow
@pytest.mark.native
def test_generate_compiles_before_it_streams(tiny_target_dir, monkeypatch):
    writes: list[tuple[str, str]] = []
    monkeypatch.setattr(sys, "stdout", Recorder("out", writes))
    monkeypatch.setattr(sys, "stderr", Recorder("err", writes))
    assert main(["generate", "--target", str(tiny_target_dir), "--block-size", "1", "--cpu-weights", "fp16",
                 "--compile", "--max-new-tokens", "8", "hi"]) == 0

    def first(stream: str, text: str) -> int:
        return next(i for i, (name, written) in enumerate(writes) if name == stream and text in written)

    compiling = first("err", "dflash: compiling the target's decoding steps")
    compiled = first("err", "dflash: compiled in")
    reply = next(i for i, (name, written) in enumerate(writes) if name == "out" and written)
    assert compiling < compiled < reply


def test_default_draft_threshold_follows_what_runs_the_target():
    """No --draft-threshold: the measured best for the target's kernels (native AVX-512 0.1,
    AVX2 and portable 0.3, torch on a CPU 0.1), none on a GPU; a given one is kept or refused."""
    import argparse
    from types import SimpleNamespace

    import pytest
    import torch

    from dflash.cli.common import draft_threshold
    from dflash.errors import DFlashError

    def runtime(device, isa=None):
        return SimpleNamespace(info=SimpleNamespace(device=torch.device(device)), isa=isa)

    unset = argparse.Namespace(draft_threshold=None)
    assert draft_threshold(unset, runtime("cpu", "avx512")) == 0.1
    assert draft_threshold(unset, runtime("cpu", "avx2")) == 0.3
    assert draft_threshold(unset, runtime("cpu", "portable")) == 0.3
    assert draft_threshold(unset, runtime("cpu")) == 0.1
    assert draft_threshold(unset, runtime("cuda")) == 0.0
    assert draft_threshold(argparse.Namespace(draft_threshold=0.05), runtime("cpu", "avx2")) == 0.05
    with pytest.raises(DFlashError, match="must be in"):
        draft_threshold(argparse.Namespace(draft_threshold=1.5), runtime("cpu"))


def test_compare_times_both_methods_apart_from_the_streamed_reply(tiny_target_dir, tiny_drafter_dir, capsys,
                                                                   monkeypatch):
    """`--compare` decodes each method twice after the reply (dflash, plain, plain, dflash) and
    prints the ratio of their tokens/s and whether plain decoding gave the streamed reply."""
    import dflash.decode.engine as engine

    calls: list[int] = []
    real = engine.generate

    def recording(*args, **kwargs):
        calls.append(kwargs.get("block_size", 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", recording)
    assert main(["generate", "--target", str(tiny_target_dir), "--draft", str(tiny_drafter_dir),
                 "--cpu-weights", "float32", "--max-new-tokens", "12", "--compare", "hi"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("[compare]"))
    assert "(two runs each, after the reply)" in line and line.endswith("outputs identical: yes")
    found = re.search(r"dflash ([\d.]+) tok/s vs plain ([\d.]+) tok/s.*speedup ([\d.]+)x", line)
    dflash, plain, ratio = (float(x) for x in found.groups())
    assert ratio == pytest.approx(dflash / plain, abs=0.01)
    block = calls[-1]
    assert block > 1 and calls[-4:] == [block, 1, 1, block]  # (after the warm-up call)
