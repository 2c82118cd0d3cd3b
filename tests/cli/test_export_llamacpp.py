"""`dflash export --for llama.cpp`: the GGUF holds what llama.cpp's DFlash loader reads (keys, types,
tensor names and shapes in ggml order), read back with gguf.GGUFReader; no llama.cpp build needed."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from dflash import DFlashDraftModel
from dflash.cli.main import main
from dflash.export.llamacpp import gguf_tensor_name

T = gguf.GGUFValueType
VOCAB = 49152  # the tiny drafter's (SmolLM2's) vocabulary


def write_target_gguf(path, arch="llama", layers=4, hidden=64, vocab=VOCAB):
    """A target GGUF with the metadata the export reads (no tensors: llama.cpp is not run here)."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_key_value("tokenizer.ggml.tokens", [f"t{i}" for i in range(vocab)], T.ARRAY, sub_type=T.STRING)
    w.add_key_value("tokenizer.ggml.token_type", [1] * vocab, T.ARRAY, sub_type=T.INT32)
    w.add_key_value("tokenizer.ggml.merges", ["t 0"], T.ARRAY, sub_type=T.STRING)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def target_gguf(tmp_path_factory):
    return write_target_gguf(tmp_path_factory.mktemp("target") / "tiny.gguf")


def fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {k: f for k, f in reader.fields.items()}


def test_gguf_holds_what_llamacpp_reads(tiny_drafter_dir, target_gguf, tmp_path, capsys):
    out = tmp_path / "d.gguf"
    assert main(["export", str(tiny_drafter_dir), "--for", "llama.cpp", str(out), "--target", str(target_gguf)]) == 0
    printed = capsys.readouterr().out
    assert (f"llama-server -m {target_gguf} -md {out} --spec-type draft-dflash --spec-draft-n-max 3"
            in printed)
    config = json.loads((tiny_drafter_dir / "config.json").read_text())
    reader, f = fields(out)
    value = {k: v.contents() for k, v in f.items()}
    assert value["general.architecture"] == "dflash"
    expected = {
        "dflash.block_count": config["num_hidden_layers"], "dflash.embedding_length": config["hidden_size"],
        "dflash.feed_forward_length": config["intermediate_size"],
        "dflash.attention.head_count": config["num_attention_heads"],
        "dflash.attention.head_count_kv": config["num_key_value_heads"],
        "dflash.attention.key_length": config["head_dim"], "dflash.attention.value_length": config["head_dim"],
        "dflash.context_length": config["max_position_embeddings"],
        "dflash.block_size": 4, "tokenizer.ggml.mask_token_id": config["dflash_config"]["mask_token_id"],
    }
    for key, want in expected.items():
        assert f[key].types == [T.UINT32], key  # llama.cpp's get_key takes these as uint32
        assert value[key] == want, key
    assert f["dflash.attention.layer_norm_rms_epsilon"].types == [T.FLOAT32]
    assert value["dflash.rope.freq_base"] == pytest.approx(config["rope_theta"])
    # llama.cpp counts the embedding output as layer 0: checkpoint ids [0, 2] -> [1, 3]
    assert f["dflash.target_layers"].types == [T.ARRAY, T.INT32] and value["dflash.target_layers"] == [1, 3]
    # the target's tokenizer, whole
    assert value["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(VOCAB)]
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.chat_template"] == "{{ messages }}"
    assert value["tokenizer.ggml.eos_token_id"] == 2

    drafter = DFlashDraftModel.from_pretrained(str(tiny_drafter_dir))
    state = drafter.state_dict()
    tensors = {t.name: t for t in reader.tensors}
    h, n_ids = config["hidden_size"], len(config["dflash_config"]["target_layer_ids"])
    want_names = {"fc.weight", "enc.output_norm.weight", "output_norm.weight"} | {
        f"blk.0.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                                      "attn_k_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == want_names  # no token_embd / output: llama.cpp shares the target's
    assert list(tensors["fc.weight"].shape) == [n_ids * h, h]  # ggml order: {n_embd_inp, n_embd}
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [config["intermediate_size"], h]
    for name, t in state.items():
        g = tensors[gguf_tensor_name(name)]
        assert g.tensor_type == (gguf.GGMLQuantizationType.F32 if t.dim() == 1 else gguf.GGMLQuantizationType.F16)
        np.testing.assert_array_equal(np.asarray(g.data).reshape(t.shape), t.to(torch.float16).float().numpy())


def test_bf16_and_f32_weights(tiny_drafter_dir, target_gguf, tmp_path):
    for outtype, qtype in (("bf16", gguf.GGMLQuantizationType.BF16), ("f32", gguf.GGMLQuantizationType.F32)):
        out = tmp_path / f"{outtype}.gguf"
        assert main(["export", str(tiny_drafter_dir), str(out), "--for", "llama.cpp", "--target", str(target_gguf),
                     "--outtype", outtype]) == 0
        reader, _ = fields(out)
        fc = next(t for t in reader.tensors if t.name == "fc.weight")
        assert fc.tensor_type == qtype
    drafter = DFlashDraftModel.from_pretrained(str(tiny_drafter_dir))
    fc = next(t for t in fields(tmp_path / "bf16.gguf")[0].tensors if t.name == "fc.weight")
    words = torch.from_numpy(np.asarray(fc.data).view(np.int16).copy()).view(torch.bfloat16)
    assert torch.equal(words.reshape(drafter.fc.weight.shape), drafter.fc.weight.to(torch.bfloat16))


def test_shipped_drafter_with_the_embedded_target(tmp_path, capsys):
    from dflash.runtime.loader import embedded_gguf_path

    out = tmp_path / "smollm2.gguf"
    assert main(["export", "--for", "llama.cpp", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target layers [1, 14, 27] (llama.cpp counts [2, 15, 28])" in printed
    assert "--spec-draft-n-max 3" in printed and str(embedded_gguf_path()) in printed
    _, f = fields(out)
    _, t = fields(embedded_gguf_path())
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert f[key].contents() == t[key].contents(), key
    assert f["dflash.target_layers"].contents() == [2, 15, 28]


def _error(capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_bad_inputs_get_one_line(tiny_drafter_dir, target_gguf, tiny_target_dir, tmp_path, capsys):
    base = ["export", str(tiny_drafter_dir), "--for", "llama.cpp"]
    err = _error(capsys, base + [str(tmp_path / "d.gguf"), "--target", str(tiny_target_dir)])
    assert "needs the target as a .gguf file" in err
    err = _error(capsys, base + [str(tmp_path / "folder"), "--target", str(target_gguf)])
    assert "name it with .gguf" in err
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert "not a readable GGUF" in _error(capsys, base + [str(tmp_path / "d.gguf"), "--target", str(bad)])
    qwen2 = write_target_gguf(tmp_path / "qwen2.gguf", arch="qwen2")
    err = _error(capsys, base + [str(tmp_path / "d.gguf"), "--target", str(qwen2)])
    assert "cannot feed a DFlash drafter from a 'qwen2' target" in err
    deeper = write_target_gguf(tmp_path / "deep.gguf", layers=8)
    assert "4 layers" in _error(capsys, base + [str(tmp_path / "d.gguf"), "--target", str(deeper)])
    wider = write_target_gguf(tmp_path / "wide.gguf", hidden=128)
    assert "hidden size 64" in _error(capsys, base + [str(tmp_path / "d.gguf"), "--target", str(wider)])
    small = write_target_gguf(tmp_path / "small.gguf", vocab=1000)
    assert "vocabulary" in _error(capsys, base + [str(tmp_path / "d.gguf"), "--target", str(small)])
    assert not (tmp_path / "d.gguf").exists()


def test_a_drafter_reading_the_last_target_layer_is_refused(tiny_drafter_dir, target_gguf, tmp_path, capsys):
    folder = tmp_path / "last"
    shutil.copytree(tiny_drafter_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["dflash_config"]["target_layer_ids"] = [0, 3]  # layer 3 is the last of 4
    (folder / "config.json").write_text(json.dumps(config))
    err = _error(capsys, ["export", str(folder), str(tmp_path / "d.gguf"), "--for", "llama.cpp",
                          "--target", str(target_gguf)])
    assert "include the target's last layer" in err
