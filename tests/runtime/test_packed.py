"""fp16 CPU weights (--cpu-weights fp16): exact against the same packed model's own decoding."""

import os

import pytest
import torch
from helpers import BATCH_PROMPTS, PROMPTS, greedy_reference, oracle_for, run_all, tiny_target

from dflash import DFlashDraftModel, chat_input_ids, default_drafter_path, generate, load_target, runtime_for
from dflash.errors import DFlashError
from dflash.runtime.hf import TransformersRuntime
from dflash.runtime.lean import LeanRuntime
from dflash.runtime.packed import PackedFp16Linear, apply_cpu_weights, pack_fp16_linears


def test_packed_rows_do_not_depend_on_their_batch():
    """What keeps verification exact: a row's output is the same alone or among others. fbgemm's
    AVX-512 kernels give that bit for bit; its AVX2 ones block rows by six with other kernels for
    the remainder, so there a row moves by an ulp or two with the row count (as MKL's float32
    products and SDPA do): identical outputs then hold except at near-ties (docs/performance.md)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 200, bias=True)
    packed = PackedFp16Linear.of(layer)
    x = torch.randn(16, 96)
    together = packed(x)
    alone = torch.cat([packed(x[i:i + 1]) for i in range(16)])
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert torch.equal(alone, together)
    else:
        torch.testing.assert_close(alone, together, rtol=1e-6, atol=2e-6)
    rounded = torch.nn.functional.linear(x, layer.weight.half().float(), layer.bias)
    torch.testing.assert_close(together, rounded, rtol=1e-4, atol=1e-4)  # fp16 weights, fp32 math
    assert not torch.allclose(together, layer(x), rtol=0, atol=1e-7)      # and not the fp32 model


def test_pack_replaces_every_linear_and_keeps_the_shared_head():
    model = tiny_target("llama", tie_word_embeddings=True)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert pack_fp16_linears(model) == linears
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight  # drafters gather rows of it
    assert model.model.layers[0].mlp.up_proj.weight is None    # unshared: memory freed


def test_refuses_what_it_cannot_pack():
    with pytest.raises(DFlashError, match="float32 model on the CPU"):
        pack_fp16_linears(tiny_target("llama").to(torch.bfloat16))
    with pytest.raises(DFlashError, match="unknown CPU weight format"):
        apply_cpu_weights(tiny_target("llama"), "int3")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_speculative_equals_plain_on_a_packed_target(family):
    """llama runs the lean forward, qwen3 the packed transformers one: either way drafts of any
    quality give exactly the packed model's own greedy decoding."""
    model = runtime_for(tiny_target(family), "fp16")
    assert isinstance(model, LeanRuntime) == (family == "llama")
    torch.manual_seed(1)
    drafter = DFlashDraftModel.from_target(model.model, num_layers=1, block_size=8).eval()
    for seed in range(3):
        ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(seed))
        plain = generate(model, None, ids, max_new_tokens=48)
        if family != "llama":
            assert torch.equal(plain.output_ids, greedy_reference(model.model, ids, 48))
        assert torch.equal(generate(model, drafter, ids, max_new_tokens=48, block_size=8).output_ids, plain.output_ids)
        oracle = oracle_for(drafter, plain.output_ids, wrong_every=2, wrong_at=3)
        stats = generate(model, oracle, ids, max_new_tokens=48, block_size=8)
        assert torch.equal(stats.output_ids, plain.output_ids)
        assert {4, 8} <= set(stats.acceptance_lengths)  # full blocks and mid-block rollbacks


def test_lean_forward_computes_what_the_packed_model_computes():
    """The lean Llama forward (fused GEMMs, one RoPE, fused RMSNorm) against the packed
    transformers forward on the same weights: prefill, then a block after the cache, logits and
    the hidden states a drafter reads."""
    from transformers import DynamicCache

    runtime = runtime_for(tiny_target("llama", tie_word_embeddings=True), "fp16")
    model = runtime.model
    runtime.bind([0, 2, 3])
    ids = torch.randint(1, 128, (20,), generator=torch.Generator().manual_seed(0))
    cache, hf_cache = runtime.new_cache(), DynamicCache(config=model.config)
    row, lean = runtime.prefill(cache, ids[:12], logits=True)
    for part, lean in ((ids[:12], lean), (ids[12:], None)):
        if lean is None:
            lean = runtime.step(cache, [row], part[None], logits=True)
            runtime.commit(cache, [row], [len(part)])
        hf = model(input_ids=part[None], past_key_values=hf_cache, use_cache=True, output_hidden_states=True)
        torch.testing.assert_close(lean.logits, hf.logits[:, -lean.logits.shape[1]:], rtol=1e-4, atol=1e-4)
        hf_features = torch.cat([hf.hidden_states[i + 1] for i in (0, 2, 3)], dim=-1)
        torch.testing.assert_close(lean.features, hf_features, rtol=1e-4, atol=1e-4)
    assert cache.rows[row].get_seq_length() == hf_cache.get_seq_length() == 20
    torch.testing.assert_close(cache.rows[row].keys(3), hf_cache.layers[3].keys, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def smollm_fp16():
    return load_target(device="cpu", cpu_weights="fp16")


@pytest.mark.slow
@pytest.mark.real_model
def test_shipped_drafter_is_lossless_on_the_fp16_smollm2(smollm_fp16, smollm):
    torch.set_num_threads(2)
    runtime, tok = smollm_fp16
    drafter = DFlashDraftModel.from_pretrained(str(default_drafter_path()), device="cpu")
    pack_fp16_linears(drafter)
    assert isinstance(runtime, LeanRuntime)
    differs = 0
    for prompt in PROMPTS[:4]:
        ids = torch.tensor([chat_input_ids(tok, prompt)])
        reference = greedy_reference(runtime.model, ids, 48)  # the packed transformers forward
        assert torch.equal(generate(runtime, None, ids, max_new_tokens=48).output_ids, reference)  # the lean one
        stats = generate(runtime, drafter, ids, max_new_tokens=48, block_size=4)
        assert torch.equal(stats.output_ids, reference)
        assert stats.tau > 1.0
        with torch.no_grad():  # the packed model is a (slightly) different model
            a = runtime.model(ids).logits[0, -1]
            b = smollm[0](ids).logits[0, -1]
        differs += not torch.equal(a, b)
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
    assert differs == 4


@pytest.mark.parametrize("lean", [False, True])
def test_batched_engine_on_a_packed_target(lean):
    """The server's engine gives every row the packed model's own greedy decoding through the same
    runtime: the packed transformers forward (ragged rows, masks) or the lean one (a cache per
    row), with a draft threshold."""
    from dflash.decode.batch import BatchEngine, BatchRequest

    runtime = runtime_for(tiny_target("llama"), "fp16")
    if not lean:
        runtime = TransformersRuntime(runtime.model)
    torch.manual_seed(1)
    drafter = DFlashDraftModel.from_target(runtime.model, num_layers=1, block_size=4)
    pack_fp16_linears(drafter)
    engine = BatchEngine(runtime, drafter, block_size=4, stop_token_ids=[], max_batch_size=4, draft_threshold=0.05)
    out, _ = run_all(engine, [BatchRequest(i, p, 32) for i, p in enumerate(BATCH_PROMPTS)], join_every=3)
    for i, p in enumerate(BATCH_PROMPTS):
        assert out[i] == generate(runtime, None, torch.tensor([p]), max_new_tokens=32).new_tokens, i


@pytest.mark.native
def test_compiled_steps_compute_what_the_eager_lean_forward_computes():
    """--compile: the decoding steps run as torch.compile'd graphs (prompts stay eager); their
    logits, drafter features and cache writes match the eager lean forward."""
    eager = runtime_for(tiny_target("llama"), "fp16")
    compiled = runtime_for(tiny_target("llama"), "fp16", compile=True)
    assert compiled.lean.compiled is not None and eager.lean.compiled is None
    for runtime in (eager, compiled):
        runtime.bind([0, 2, 3])
    assert compiled.warmup([1, 2, 3]) > 0
    assert len(compiled.lean.compile_seconds) == 3  # blocks of 1, 2, 3 with the bound features
    ids = torch.randint(1, 128, (26,), generator=torch.Generator().manual_seed(0))
    caches = {}
    for name, runtime in (("eager", eager), ("compiled", compiled)):
        cache = runtime.new_cache()
        row, first = runtime.prefill(cache, ids[:20], logits=True)
        outs = [first]
        for part in (ids[20:23], ids[23:24], ids[24:26]):
            outs.append(runtime.step(cache, [row], part[None], logits=True))
            runtime.commit(cache, [row], [len(part)])
        caches[name] = (cache.rows[row], outs)
    (eager_cache, eager_outs), (compiled_cache, compiled_outs) = caches["eager"], caches["compiled"]
    for a, b in zip(eager_outs, compiled_outs):
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.features, a.features, rtol=1e-4, atol=1e-4)
    assert compiled_cache.get_seq_length() == 26
    torch.testing.assert_close(compiled_cache.values(2), eager_cache.values(2), rtol=1e-4, atol=1e-4)
    with pytest.raises(DFlashError, match="--cpu-weights fp16"):
        runtime_for(tiny_target("llama"), "float32", compile=True)
    with pytest.raises(DFlashError, match="Llama-architecture"):
        runtime_for(tiny_target("qwen3"), "fp16", compile=True)


@pytest.mark.native
def test_speculative_equals_plain_on_a_compiled_target():
    """Drafts of any quality, verified by compiled steps, give the compiled model's own greedy
    decoding; with a draft threshold the verified block lengths vary and still agree."""
    model = runtime_for(tiny_target("llama"), "fp16", compile=True)
    torch.manual_seed(1)
    drafter = DFlashDraftModel.from_target(model.model, num_layers=1, block_size=4).eval()
    for seed in range(2):
        ids = torch.randint(1, 128, (1, 9), generator=torch.Generator().manual_seed(seed))
        plain = generate(model, None, ids, max_new_tokens=40)
        assert torch.equal(generate(model, drafter, ids, max_new_tokens=40, block_size=4).output_ids, plain.output_ids)
        oracle = oracle_for(drafter, plain.output_ids, wrong_every=2, wrong_at=2)
        stats = generate(model, oracle, ids, max_new_tokens=40, block_size=4, draft_threshold=0.3)
        assert torch.equal(stats.output_ids, plain.output_ids)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.native
def test_compiled_smollm2_decodes_like_the_eager_one(smollm_fp16):
    """The real target with --compile: DFlash with the shipped drafter and plain decoding give
    the tokens of the eager fp16 model."""
    torch.set_num_threads(2)
    eager, tok = smollm_fp16
    model, _ = load_target(device="cpu", cpu_weights="fp16", compile=True)
    drafter = apply_cpu_weights(DFlashDraftModel.from_pretrained(str(default_drafter_path()), device="cpu"), "fp16")
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([chat_input_ids(tok, prompt)])
        reference = generate(eager, None, ids, max_new_tokens=32).output_ids
        assert torch.equal(generate(model, None, ids, max_new_tokens=32).output_ids, reference)
        stats = generate(model, drafter, ids, max_new_tokens=32, block_size=4, draft_threshold=0.1)
        assert torch.equal(stats.output_ids, reference)
    assert len(model.lean.compile_seconds) >= 3  # one-token steps, with and without features, blocks


@pytest.mark.native
def test_compiled_code_is_cached_under_dflash_unless_the_user_chose(monkeypatch, tmp_path):
    """torch writes its /tmp default into TORCHINDUCTOR_CACHE_DIR the first time it asks, so
    --compile moves that default under dflash's cache (kept across sessions) and leaves a
    directory the user set alone."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from dflash.runtime.loader import cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    runtime_for(tiny_target("llama"), "fp16", compile=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_dir() / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    runtime_for(tiny_target("llama"), "fp16", compile=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


@pytest.mark.native
def test_native_operators_compute_what_torchs_operator_computes(monkeypatch):
    """dflash's C++ product (built once with the machine's compiler) runs fbgemm's own kernel on
    the same packed weights: bit for bit torch's `quantized::linear_dynamic_fp16`, at every
    block length. Without the library loaded a packed linear keeps torch's operator."""
    from dflash.runtime import native

    native.load()
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 96), torch.randn(300)
    fast = PackedFp16Linear(weight, bias)
    with monkeypatch.context() as patch:
        patch.setattr(native, "loaded", lambda: False)
        plain = PackedFp16Linear(weight, bias)
    assert fast.slot is not None and plain.slot is None
    for rows in (1, 3, 16):
        x = torch.randn(2, rows, 96)
        assert torch.equal(fast(x), plain(x))
    slot = fast.slot
    del fast  # its slot's weights are released with it
    with pytest.raises(RuntimeError, match="was released"):
        torch.ops.dflash_native.linear_fp16(torch.randn(1, 96), slot)


@pytest.mark.native
def test_native_attention_writes_the_cache_and_attends_like_the_python_one():
    from dflash.runtime import native
    from dflash.runtime.lean import _attend_cached

    native.load()
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    positions = torch.arange(5, 8)
    mask = torch.arange(16) <= positions[:, None]
    for block_mask in (mask, None):
        buffers = [torch.randn(1, 2, 16, 8) for _ in range(2)]
        copies = [b.clone() for b in buffers]
        ours = torch.ops.dflash_native.attend_cached(q, k, v, *buffers, positions, block_mask, 0.3)
        reference = _attend_cached(q, k, v, *copies, positions, block_mask, 0.3)
        assert torch.equal(ours, reference)
        assert all(torch.equal(a, b) for a, b in zip(buffers, copies))


def test_without_a_compiler_the_native_build_says_so(monkeypatch, tmp_path):
    from dflash.runtime import native

    monkeypatch.setattr(native, "_compiler", lambda: None)
    with pytest.raises(DFlashError, match="no C.. compiler"):
        native._build(tmp_path / "dflash_native.so")
    assert not (tmp_path / "dflash_native.so").exists()


@pytest.mark.native
def test_generate_calls_hold_no_new_native_slots():
    """The runtime is made once: decoding again neither repacks the drafter's rows of the LM head
    nor takes new native slots (each generate once did both)."""
    from dflash.runtime import native

    if not native.try_load():
        pytest.skip("no C++ compiler: packed weights hold no native slots")
    runtime = runtime_for(tiny_target("llama"), "fp16")
    torch.manual_seed(1)
    drafter = DFlashDraftModel.from_target(runtime.model, num_layers=1, block_size=4).eval()
    drafter.draft_vocab = torch.arange(0, 128, 2)
    ids = torch.tensor([[5, 6, 7]])
    generate(runtime, drafter, ids, max_new_tokens=8, block_size=4)
    slots, head = len(native._out_features), runtime._vocab_head
    for _ in range(10):
        generate(runtime, drafter, ids, max_new_tokens=8, block_size=4)
    assert len(native._out_features) == slots and runtime._vocab_head is head
