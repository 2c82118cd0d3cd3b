"""`--compile` mistakes are named, not tracebacks; `dflash serve` does not offer it."""

import pytest

from dflash.cli.main import main


def test_compile_without_fp16_weights_is_refused(tiny_target_dir, capsys):
    assert main(["generate", "--target", str(tiny_target_dir), "--block-size", "1", "--compile", "hi"]) == 2
    assert "--compile applies to the lean fp16 forward: add --cpu-weights fp16" in capsys.readouterr().err


def test_serve_has_no_compile_flag(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--compile"])
    assert "unrecognized arguments: --compile" in capsys.readouterr().err


def test_generate_compiles_before_it_streams(tiny_target_dir, capsys):
    assert main(["generate", "--target", str(tiny_target_dir), "--block-size", "1", "--cpu-weights", "fp16",
                 "--compile", "--max-new-tokens", "8", "hi"]) == 0
    err = capsys.readouterr().err
    assert "dflash: compiling the target's decoding steps" in err and "dflash: compiled in" in err
