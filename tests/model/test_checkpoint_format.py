"""The released checkpoint format: keys, tensor names and shapes, bf16, round trips, and
checkpoints written by other tools (transformers 4.x and 5.x style configs)."""

import json

import pytest
import torch
from helpers import tiny_target
from safetensors.torch import load_file, save_file

from dflash import DFlashConfig, DFlashDraftModel
from dflash.config import default_target_layer_ids, tensor_names
from dflash.errors import DFlashError

QWEN3_8B_DRAFTER = {  # the keys of the released Qwen3-8B drafter's config.json
    "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
    "attention_bias": False, "attention_dropout": 0.0, "block_size": 16,
    "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
    "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
    "layer_types": ["full_attention"] * 5, "max_position_embeddings": 40960, "max_window_layers": 5,
    "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 5, "num_key_value_heads": 8,
    "num_target_layers": 36, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "transformers_version": "4.57.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_default_target_layer_rule():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B drafter
    assert default_target_layer_ids(24, 5) == [1, 6, 11, 16, 21]  # Qwen2.5-0.5B drafter
    assert default_target_layer_ids(30, 1) == [15]


def test_released_qwen3_8b_config_builds_the_published_shapes():
    config = DFlashConfig.from_dict(QWEN3_8B_DRAFTER)
    assert (config.block_size, config.mask_token_id, config.num_target_layers) == (16, 151669, 36)
    with torch.device("meta"):
        model = DFlashDraftModel(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert set(shapes) == set(tensor_names(5))
    assert shapes["fc.weight"] == (4096, 5 * 4096)
    assert shapes["layers.0.self_attn.q_proj.weight"] == (32 * 128, 4096)
    assert shapes["layers.0.self_attn.k_proj.weight"] == (8 * 128, 4096)
    assert shapes["layers.4.self_attn.k_norm.weight"] == (128,)
    assert shapes["layers.2.mlp.down_proj.weight"] == (4096, 12288)
    # written back: the released keys, and the unknown ones (auto_map, ...) carried over
    out = config.to_dict()
    for key, value in QWEN3_8B_DRAFTER.items():
        if key not in ("dtype", "transformers_version", "rope_theta"):
            assert out[key] == value, key
    assert out["rope_theta"] == 1e6 and out["rope_parameters"]["rope_theta"] == 1e6


@pytest.fixture
def drafter():
    torch.manual_seed(0)
    return DFlashDraftModel.from_target(tiny_target("qwen3"), num_layers=2, block_size=8, mask_token_id=3)


def test_save_writes_bf16_tensors_with_released_names(drafter, tmp_path):
    drafter.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"target_layer_ids": drafter.config.target_layer_ids, "mask_token_id": 3}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
                "vocab_size", "layer_types", "sliding_window", "block_size", "num_target_layers"):
        assert key in config, key
    assert config["tie_word_embeddings"] is False
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert set(tensors) == set(tensor_names(2))
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors["fc.weight"].shape == (64, 64 * len(drafter.config.target_layer_ids))


def test_round_trip_is_bit_exact(drafter, tmp_path):
    drafter = drafter.to(torch.bfloat16)
    drafter.save_pretrained(tmp_path)
    loaded = DFlashDraftModel.from_pretrained(str(tmp_path), dtype=torch.bfloat16, device="cpu")
    assert loaded.config == drafter.config
    original, again = drafter.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_checkpoint_written_by_another_tool_loads(tmp_path, style):
    """A folder made without dflash: hand-written config, tensors saved by safetensors directly."""
    h, heads, kv, d, inter, layers = 64, 4, 2, 16, 96, 2
    config = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": h,
              "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
              "head_dim": d, "intermediate_size": inter, "vocab_size": 100, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 4096, "block_size": 10, "num_target_layers": 8,
              "dflash_config": {"target_layer_ids": [1, 4, 6], "mask_token_id": 99}}
    if style == "transformers4":
        config.update(rope_theta=500000.0, rope_scaling=None)
    else:
        config.update(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (h, 3 * h), "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
                       p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                       p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    tensors = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = DFlashDraftModel.from_pretrained(str(tmp_path), device="cpu")
    assert model.dtype == torch.float32  # bf16 on disk, float32 compute on CPU
    assert model.config.rope_theta == 500000.0 and model.config.target_layer_ids == [1, 4, 6]
    assert model.block_size == 10 and model.mask_token_id == 99
    state = model.state_dict()
    assert all(torch.equal(state[k], tensors[k].float()) for k in tensors)


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    raw = dict(QWEN3_8B_DRAFTER, rope_theta=500000.0, rope_scaling=scaling, head_dim=128)
    config = DFlashConfig.from_dict(raw)
    with torch.device("meta"):
        DFlashDraftModel(config)  # builds
    from dflash.model.drafter import RotaryEmbedding

    ours = RotaryEmbedding(config)
    theirs = LlamaRotaryEmbedding(LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128,
                                              rope_theta=500000.0, rope_scaling=scaling,
                                              max_position_embeddings=131072))
    pos = torch.arange(0, 20000, 997)
    cos, sin = ours(pos, torch.float32)
    ref_cos, ref_sin = theirs(torch.zeros(1), pos[None])
    assert torch.allclose(cos[0, 0], ref_cos[0], atol=1e-5) and torch.allclose(sin[0, 0], ref_sin[0], atol=1e-5)


def test_broken_checkpoints_are_refused_clearly(drafter, tmp_path):
    with pytest.raises(DFlashError, match="no drafter folder"):
        DFlashDraftModel.from_pretrained(str(tmp_path / "missing"))
    drafter.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(DFlashError, match="missing"):
        DFlashDraftModel.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DFlashError, match="not valid JSON"):
        DFlashDraftModel.from_pretrained(str(tmp_path))


def test_draft_vocabulary_round_trips_and_limits_proposals(tmp_path):
    """draft_vocab.json beside the weights: proposals come from those ids only, decoding stays
    lossless, and a save without a vocabulary removes a stale file."""
    from dflash import generate
    from helpers import greedy_reference, tiny_target

    target = tiny_target("llama", vocab=128)
    torch.manual_seed(0)
    drafter = DFlashDraftModel.from_target(target, num_layers=1, block_size=4)
    drafter.draft_vocab = torch.arange(0, 128, 3)
    drafter.save_pretrained(str(tmp_path / "d"))
    loaded = DFlashDraftModel.from_pretrained(str(tmp_path / "d"), dtype="float32", device="cpu")
    assert torch.equal(loaded.draft_vocab, torch.arange(0, 128, 3))
    from dflash import TransformersRuntime

    adapter = TransformersRuntime(target)
    adapter.bind(loaded.config.target_layer_ids)
    ids = torch.tensor([[5, 6, 7, 8]])
    feats = adapter.prefill(adapter.new_cache(), ids[0])[1].features
    logits = loaded.propose(adapter, torch.tensor([[9, 1, 1, 1]]), feats, loaded.new_cache())
    assert logits.shape == (1, 3, 128)
    assert bool((logits.argmax(-1) % 3 == 0).all())
    assert torch.isinf(logits[..., 1]).all()
    want = greedy_reference(target, ids, 24)
    got = generate(target, loaded, ids, max_new_tokens=24, block_size=4).output_ids
    assert torch.equal(got, want)
    loaded.draft_vocab = None
    loaded.save_pretrained(str(tmp_path / "d"))
    assert not (tmp_path / "d" / "draft_vocab.json").exists()
    (tmp_path / "d" / "draft_vocab.json").write_text('{"token_ids": [1, 999]}')
    with pytest.raises(DFlashError, match="within the vocabulary"):
        DFlashDraftModel.from_pretrained(str(tmp_path / "d"))


def test_device_mistakes_are_named_not_tracebacks():
    from dflash.errors import DFlashError
    from dflash.model.checkpoint import resolve_device

    with pytest.raises(DFlashError, match="unknown device 'banana'"):
        resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(DFlashError, match="sees no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
