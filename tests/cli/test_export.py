"""`dflash export`: the folder reloads as the same drafter, and the command carries the block."""

import json

import torch

from dflash import DFlashDraftModel
from dflash.cli.main import main


def test_export_for_vllm_and_sglang(tiny_drafter_dir, tiny_target_dir, tmp_path, capsys):
    assert main(["export", str(tiny_drafter_dir), str(tmp_path / "v"), "--for", "vllm",
                 "--target", str(tiny_target_dir)]) == 0
    out = capsys.readouterr().out
    assert f"vllm serve {tiny_target_dir}" in out
    spec = json.loads(out.split("--speculative-config ")[1].strip().strip("'"))
    assert spec == {"method": "dflash", "model": str(tmp_path / "v"), "num_speculative_tokens": 3}
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["dflash_config"]["target_layer_ids"] == [0, 2] and config["block_size"] == 4
    a = DFlashDraftModel.from_pretrained(str(tiny_drafter_dir))
    b = DFlashDraftModel.from_pretrained(str(tmp_path / "v"))
    for name, t in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], t)
    assert main(["export", str(tiny_drafter_dir), str(tmp_path / "s"), "--for", "sglang",
                 "--target", "org/model"]) == 0
    out = capsys.readouterr().out
    assert "--speculative-algorithm DFLASH --speculative-draft-model-path" in out
    assert out.strip().endswith("--speculative-num-draft-tokens 4")  # SGLang takes the block itself


def test_export_refuses_a_folder_that_is_not_a_drafter(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err
