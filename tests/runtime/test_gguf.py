"""The native GGUF runtime: each weight type's kernel against an exact reference, a block equal
bit for bit to its tokens run one at a time (real prompts, every kernel path this CPU has),
rollback, several rows in one cache, and clear refusals."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from helpers import tiny_gguf

from dflash.errors import DFlashError, UnsupportedTargetError
from dflash.runtime import gguf as native

pytestmark = pytest.mark.native

TYPES = ("Q4_0", "Q4_1", "Q8_0")


def _isas() -> list[str]:
    best = native.ISAS[native.library().dfl_isa_detect()]
    return list(native.ISAS[: native.ISAS.index(best) + 1])


@pytest.fixture(params=_isas())
def isa(request):
    """Every kernel path this CPU can run (AVX-512 machines test the AVX2 and portable ones too)."""
    before = native.select_isa()
    native.select_isa(request.param)
    yield request.param
    native.select_isa(before)


def _quantized_activations(x: np.ndarray):
    """Rows quantised per 32 values as the runtime defines it (llama.cpp's 8-bit activations):
    q = round-half-even(x * 127 / max|x|), d = max|x| / 127 and s = d * sum(q) in half precision."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    inverse = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inverse).astype(np.int64)
    d = (amax[..., 0] / np.float32(127)).astype(np.float32)
    s = (d * q.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float64)
    return q, d.astype(np.float16).astype(np.float64), s


def _weight_parts(raw: np.ndarray, kind: str):
    """(integer values [n, blocks, 32], scales d [n, blocks], minimums m or None) of GGUF blocks."""
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = raw.reshape(raw.shape[0], -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if kind == "Q8_0":
        return blocks[..., 2:].copy().view(np.int8).astype(np.int64), d, None
    start = 4 if kind == "Q4_1" else 2
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64) if kind == "Q4_1" else None
    nib = blocks[..., start:].astype(np.int64)
    values = np.concatenate([nib & 15, nib >> 4], axis=-1)
    return (values - 8 if kind == "Q4_0" else values), d, m


@pytest.mark.parametrize("kind", TYPES)
def test_kernel_matches_exact_reference(kind, isa):
    rng = np.random.default_rng(TYPES.index(kind))
    n, k, rows = 40, 128, 5  # 40 outputs: the last group of 16 is partly padding
    weights = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    raw = np.ascontiguousarray(quants.quantize(weights, GGMLQuantizationType[kind]))
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[1, :32] = 0  # an all-zero block
    y = native.NativeLinear(native.library(), kind, raw, k)(torch.from_numpy(x)).numpy()

    q, d, s = _quantized_activations(x)
    values, dw, mw = _weight_parts(raw, kind)
    integer = np.einsum("nbi,rbi->rnb", values, q)  # exact block dot products
    exact = (integer * dw[None] * d[:, None]).sum(-1)
    if mw is not None:
        exact += (mw[None] * s[:, None]).sum(-1)
    scale = (np.abs(integer * dw[None] * d[:, None]).sum(-1) + 1e-30)
    assert np.all(np.abs(y - exact) <= 1e-5 * scale), f"{kind} on {isa}: not the exact block products"
    # and the product of the dequantised weights with the unquantised rows, to 8-bit activation precision
    reference = x.astype(np.float64) @ quants.dequantize(raw, GGMLQuantizationType[kind]).astype(np.float64).T
    assert np.abs(y - reference).max() <= 0.02 * np.abs(reference).max()


# --- the embedded SmolLM2 GGUF ------------------------------------------------------------------

@pytest.fixture(scope="module")
def runtime():
    from dflash.runtime.loader import embedded_gguf_path

    rt = native.GGUFRuntime(embedded_gguf_path(), threads=2)  # (chunks shared by two threads: the same numbers)
    rt.bind([1, 10, 19, 29])  # the last layer too: its features are taken after the final norm
    return rt


@pytest.fixture(scope="module")
def prompts(data_dir):
    from dflash.runtime.gguf import load_tokenizer
    from dflash.runtime.loader import chat_input_ids, embedded_gguf_path

    tokenizer = load_tokenizer(embedded_gguf_path())
    with open(data_dir / "eval" / "gsm8k.jsonl") as f:
        questions = [json.loads(line)["turns"][0] for _, line in zip(range(3), f)]
    return [torch.tensor(chat_input_ids(tokenizer, q)) for q in questions]


def _one_at_a_time(rt, ids):
    cache = rt.new_cache()
    row, _ = rt.prefill(cache, ids[:1], logits=True)
    outs = []
    for token in ids[1:]:
        out = rt.step(cache, [row], token.view(1, 1), logits=True)
        rt.commit(cache, [row], [1])
        outs.append(out)
    return torch.cat([o.logits for o in outs], 1), torch.cat([o.features for o in outs], 1)


@pytest.mark.real_model
def test_block_equals_its_rows_one_at_a_time(runtime, prompts, isa):
    """B = 1..16 tokens verified in one step give bit for bit the logits and features of B
    one-token steps, and leave the same cache (the step after them agrees too). Each block is
    rejected by `commit` before the next: rollback is under test as well."""
    for ids in prompts[: 1 if isa == "portable" else 2]:  # (the portable path is the slow one)
        n_prefix = len(ids) - 17
        logits, features = _one_at_a_time(runtime, ids)  # outputs for positions 1..len-1
        cache = runtime.new_cache()
        row, _ = runtime.prefill(cache, ids[:n_prefix])
        for b in range(1, 17):
            out = runtime.step(cache, [row], ids[n_prefix:n_prefix + b].view(1, -1), logits=True)
            at = slice(n_prefix - 1, n_prefix - 1 + b)
            assert torch.equal(out.logits[0], logits[0, at]), f"B={b} logits differ on {isa}"
            assert torch.equal(out.features[0], features[0, at]), f"B={b} features differ on {isa}"
            assert torch.equal(out.tokens[0], logits[0, at].argmax(-1))
            runtime.commit(cache, [row], [0])  # rejected: the next block starts from the prefix again
        runtime.step(cache, [row], ids[n_prefix:n_prefix + 16].view(1, -1))
        runtime.commit(cache, [row], [16])
        after = runtime.step(cache, [row], ids[n_prefix + 16].view(1, 1), logits=True)
        assert torch.equal(after.logits[0, 0], logits[0, n_prefix + 15]), f"the block's cache entries differ on {isa}"


@pytest.mark.real_model
def test_prefill_equals_steps_and_training_features(runtime, prompts):
    ids = prompts[0]
    cache = runtime.new_cache()
    _, out = runtime.prefill(cache, ids, logits=True)
    logits, features = _one_at_a_time(runtime, ids)
    assert torch.equal(out.logits[0, 0], logits[0, -1])
    assert torch.equal(out.features[0, 1:], features[0])
    assert torch.equal(runtime.features([ids])[0], out.features)


@pytest.mark.real_model
def test_commit_rewinds_and_rows_share_a_cache(runtime, prompts):
    a, b = prompts[0], prompts[1]
    cache = runtime.new_cache(max_rows=2)
    row_a, _ = runtime.prefill(cache, a[:-8])
    row_b, _ = runtime.prefill(cache, b[:-8])
    runtime.step(cache, [row_a, row_b], torch.stack([a[-8:-4], b[-8:-4]]))
    runtime.commit(cache, [row_a, row_b], [1, 3])  # keep 1 and 3 of the 4 tokens
    both = runtime.step(cache, [row_a, row_b], torch.stack([a[-7:-5], b[-5:-3]]), logits=True)
    for i, (ids, kept) in enumerate(((a, 1), (b, 3))):
        alone = runtime.new_cache()
        row, _ = runtime.prefill(alone, ids[:-8 + kept])
        out = runtime.step(alone, [row], ids[-8 + kept:-6 + kept].view(1, -1), logits=True)
        assert torch.equal(both.logits[i], out.logits[0])
    runtime.drop(cache, [row_a])
    assert list(cache.seqs) == [row_b]


@pytest.mark.real_model
def test_against_the_float32_model(runtime, prompts, smollm):
    """The quantised model is the float32 (dequantised) one up to its 4-bit weights and 8-bit
    activations: same next token at most positions, logits within a few units."""
    model, _ = smollm
    ids = prompts[0]
    cache = runtime.new_cache()
    runtime.prefill(cache, ids[:1])
    ours = runtime.step(cache, [0], ids[1:].view(1, -1), logits=True).logits[0]
    with torch.no_grad():
        theirs = model(input_ids=ids[None]).logits[0, 1:]
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
    assert agree > 0.75
    assert (ours - theirs).abs().mean() < 1.0


@pytest.mark.parametrize("kind", TYPES)
def test_tiny_models_of_each_type_run_exactly(tmp_path, kind):
    rt = native.GGUFRuntime(tiny_gguf(tmp_path / "tiny.gguf", kind=kind))
    rt.bind([0])
    ids = torch.tensor([5, 17, 3, 88, 41, 9])
    cache = rt.new_cache()
    row, _ = rt.prefill(cache, ids[:2])
    block = rt.step(cache, [row], ids[2:].view(1, -1), logits=True)
    cache2 = rt.new_cache()
    row2, _ = rt.prefill(cache2, ids[:2])
    for i in range(4):
        one = rt.step(cache2, [row2], ids[2 + i].view(1, 1), logits=True)
        rt.commit(cache2, [row2], [1])
        assert torch.equal(one.logits[0, 0], block.logits[0, i])
    assert torch.isfinite(block.logits).all() and block.logits.shape == (1, 4, 96)


def test_refuses_unsupported_architecture_and_type(tmp_path):
    with pytest.raises(UnsupportedTargetError, match="'gpt2'"):
        native.GGUFRuntime(tiny_gguf(tmp_path / "a.gguf", arch="gpt2"))
    with pytest.raises(UnsupportedTargetError, match="Q5_0"):
        native.GGUFRuntime(tiny_gguf(tmp_path / "b.gguf", kind="Q5_0"))


@pytest.mark.real_model
def test_load_target_runs_a_gguf_natively_by_default(tmp_path):
    from dflash import load_target

    runtime, tokenizer = load_target()
    assert isinstance(runtime, native.GGUFRuntime) and runtime.info.precision == "gguf q4_1"
    assert tokenizer.decode(tokenizer("7 times 8")["input_ids"]) == "7 times 8"
    with pytest.raises(DFlashError, match="runs a GGUF target"):
        load_target(str(tmp_path), cpu_weights="gguf")
    with pytest.raises(UnsupportedTargetError, match="'gpt2'"):
        load_target(str(tiny_gguf(tmp_path / "g.gguf", arch="gpt2")), cpu_weights="gguf")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_families_compute_what_transformers_computes(tmp_path, arch):
    """Each family the native runtime reads (Llama's paired rotary layout, Qwen2's q/k/v biases,
    Qwen3's q/k norms and NeoX rotary halves) against transformers on the same GGUF, dequantised:
    equal up to the 8-bit activations (a wrong rotary layout or a missing bias is off by ~100 %)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tiny_gguf(tmp_path / "t.gguf", arch=arch, kind="Q8_0", layers=2)
    config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    config.head_dim = 16  # (transformers' GGUF reader does not take Qwen3's key_length)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, config=config,
                                                 dtype=torch.float32)
    rt = native.GGUFRuntime(path)
    ids = torch.tensor([5, 17, 3, 88, 41, 9, 33, 2, 60, 61, 62, 63])
    cache = rt.new_cache()
    row, _ = rt.prefill(cache, ids[:1])
    ours = rt.step(cache, [row], ids[1:].view(1, -1), logits=True).logits[0]
    with torch.no_grad():
        theirs = model(input_ids=ids[None]).logits[0, 1:]
    assert (ours - theirs).abs().max() < 0.08 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.8  # (random weights: near ties)


@pytest.mark.real_model
def test_batched_engine_equals_single_sequences(runtime, prompts):
    """Continuous batching over the native runtime (rows of different lengths, joining at once,
    drafts with a threshold): every greedy answer equals decoding it alone, bit for bit."""
    from dflash import DFlashDraftModel, generate
    from dflash.decode.batch import BatchEngine, BatchRequest
    from dflash.drafters import default_drafter_path

    drafter = DFlashDraftModel.from_pretrained(str(default_drafter_path()), device="cpu")
    engine = BatchEngine(runtime, drafter, block_size=4, stop_token_ids=[], max_batch_size=3, draft_threshold=0.1)
    for i, ids in enumerate(prompts):
        engine.add(BatchRequest(i, ids.tolist(), max_new_tokens=24 + 8 * i))
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while not engine.idle:
        for o in engine.step():
            out[o.rid] += o.tokens
    for i, ids in enumerate(prompts):
        alone = generate(runtime, drafter, ids[None], max_new_tokens=24 + 8 * i, block_size=4, draft_threshold=0.1)
        plain = generate(runtime, None, ids[None], max_new_tokens=24 + 8 * i)
        assert out[i] == alone.new_tokens == plain.new_tokens


def test_quantized_drafter_linears_stay_close():
    """A drafter beside the native runtime runs its linears as Q8_0 through the native kernels:
    the same function up to 8-bit weights and activations (drafts are checked by the target)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 32, bias=False))
    x = torch.randn(5, 64)
    before = model(x).detach()
    assert native.quantize_linears(model) == 2
    assert isinstance(model[0], native.QuantizedLinear)
    after = model(x)
    assert (after - before).abs().max() < 0.02 * before.abs().max()
