"""Generation reproduces `transformers`: greedy tokens and their log-probabilities for random small
Llama, Qwen2, Mistral and GPT-2 models, batched prompts of different lengths (left-padded), under
tp 1, tp 2 and pp 2; plus sampling, EOS and the errors a user can cause."""

import functools
from functools import cache

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks

from threefold.infer.generate import Decoder, generate
from threefold.infer.load import build_stage, load_weights
from threefold.infer.sampling import SamplingParams, choose
from threefold.infer.step import forward_step
from threefold.model.hf import from_hf_state_dict, model_config_from_hf
from threefold.parallel.mesh import build_mesh

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 99, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [300]]
NEW_TOKENS = 8


def _hf_config(case: str):
    llama_family = dict(
        vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5,
        tie_word_embeddings=case == "qwen2",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    if case == "llama":
        return transformers.LlamaConfig(**llama_family)
    if case == "qwen2":
        return transformers.Qwen2Config(**llama_family, use_sliding_window=False)
    if case == "mistral":
        return transformers.MistralConfig(**llama_family, sliding_window=None)
    return transformers.GPT2Config(
        vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=None, eos_token_id=None
    )


@cache
def _reference(case: str) -> tuple[dict, dict[str, torch.Tensor], list[list[int]], list[list[float]]]:
    """(config, state dict, greedy tokens, their log-probabilities) of a random HF model, batched with
    left padding as transformers does it."""
    config = _hf_config(case)
    torch.manual_seed(0)
    cls = {"gpt2": transformers.GPT2LMHeadModel, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM}.get(case, transformers.LlamaForCausalLM)  # fmt: skip
    model = cls._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than HF's init, so that the greedy choices are not near-ties
            p.add_(0.3 * torch.randn_like(p))
    length = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (length - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[:, length:]
    logits = torch.stack(out.logits, 1).float()  # (b, new, V)
    logprobs = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    return model.config.to_dict(), model.state_dict(), tokens.tolist(), logprobs.tolist()


def _generate(rank: int, world: int, hf_cfg: dict, hf_state: dict, tp: int, pp: int, params: SamplingParams,
              eos_id: int | None):  # fmt: skip
    cfg = model_config_from_hf(hf_cfg)
    state = from_hf_state_dict(cfg, hf_state)
    mesh = build_mesh(tp, 1, pp)
    model = build_stage(cfg, mesh)
    load_weights(model, state.__getitem__)
    return generate(model, PROMPTS, params, eos_id=eos_id, mesh=mesh)


GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("case", ["llama", "qwen2", "mistral", "gpt2"])
def test_greedy_tokens_and_logprobs_match_transformers(case, tp, pp):
    hf_cfg, hf_state, tokens, logprobs = _reference(case)
    results = run_ranks(tp * pp, _generate, hf_cfg, hf_state, tp, pp, GREEDY, None, timeout=60)
    for got in results:  # every rank returns the same text
        assert got.tokens == tokens
        diff = max(
            abs(a - b)
            for row, ref in zip(got.logprobs, logprobs, strict=True)
            for a, b in zip(row, ref, strict=True)
        )
        assert diff < 1e-4, f"{case} tp={tp} pp={pp}: max |logprob - transformers| = {diff:.3g}"


def test_generation_stops_at_eos_per_row():
    hf_cfg, hf_state, tokens, _ = _reference("llama")
    eos = tokens[0][3]  # the first prompt's 4th new token: that row stops there, the others run on
    [got] = run_ranks(1, _generate, hf_cfg, hf_state, 1, 1, GREEDY, eos)
    for row, ref in zip(got.tokens, tokens, strict=True):
        assert row == (ref[: ref.index(eos)] if eos in ref else ref)
    assert len(got.tokens[0]) == 3


def test_sampling_is_seeded_and_same_under_tp():
    hf_cfg, hf_state, _, _ = _reference("llama")
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_k=50, top_p=0.9, seed=3)
    one = run_ranks(1, _generate, hf_cfg, hf_state, 1, 1, params, None)[0]
    two = run_ranks(2, _generate, hf_cfg, hf_state, 2, 1, params, None)
    assert two[0].tokens == two[1].tokens == one.tokens
    other = run_ranks(
        1, _generate, hf_cfg, hf_state, 1, 1, SamplingParams(max_new_tokens=6, temperature=1.5, seed=4), None
    )
    assert other[0].tokens != one.tokens


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    seen_k = set(choose(logits, SamplingParams(temperature=1.0, top_k=2), gen).tolist())
    assert seen_k == {0, 1}
    seen_p = set(choose(logits, SamplingParams(temperature=1.0, top_p=0.7), gen).tolist())
    assert seen_p == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the third is dropped
    seen_all = set(choose(logits, SamplingParams(temperature=1.0), gen).tolist())
    assert seen_all == {0, 1, 2, 3}


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(top_p=0.0), "top_p must lie in \\(0, 1\\], got 0.0"),
    (dict(top_p=1.5), "top_p must lie in \\(0, 1\\], got 1.5"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
])  # fmt: skip
def test_bad_sampling_params_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).check()


def _too_long(rank: int, world: int, hf_cfg: dict, hf_state: dict):
    cfg = model_config_from_hf(hf_cfg)
    model = build_stage(cfg, build_mesh(1, 1, 1))
    with pytest.raises(ValueError, match="prompt 1 has 32 tokens, but the model's context .* is 32"):
        generate(model, [[1], [2] * 32], GREEDY)
    return dist.get_rank()


def test_prompt_longer_than_the_context_is_rejected():
    hf_cfg, hf_state, _, _ = _reference("llama")
    run_ranks(1, _too_long, hf_cfg, hf_state)


def _reuse(rank: int, world: int, hf_cfg: dict, hf_state: dict):
    cfg = model_config_from_hf(hf_cfg)
    model = build_stage(cfg, build_mesh(1, 1, 1))
    load_weights(model, from_hf_state_dict(cfg, hf_state).__getitem__)
    decoder = Decoder()
    first = generate(model, PROMPTS, GREEDY, decoder=decoder)
    cache = decoder.prepare(model, len(PROMPTS), 9 + NEW_TOKENS, None)
    reordered = generate(model, PROMPTS[::-1], GREEDY, decoder=decoder)  # the same cache, stale contents
    assert decoder.prepare(model, len(PROMPTS), 9 + NEW_TOKENS, None) is cache
    return first, reordered, generate(model, PROMPTS[::-1], GREEDY)


def test_a_decoder_reuses_its_cache_across_calls():
    hf_cfg, hf_state, tokens, _ = _reference("gpt2")
    first, reordered, fresh = run_ranks(1, _reuse, hf_cfg, hf_state)[0]
    assert first.tokens == tokens
    assert reordered.tokens == fresh.tokens == tokens[::-1]


def _matvec_vs_matmul(rank: int, world: int, hf_cfg: dict, hf_state: dict, tp: int):
    """Batch-1 generation with the decode step's projections as product-and-sum (`matvec`, what the
    compiled GPU step uses) and as the layers' own matrix products."""
    cfg = model_config_from_hf(hf_cfg)
    state = from_hf_state_dict(cfg, hf_state)
    mesh = build_mesh(tp, 1, 1)
    model = build_stage(cfg, mesh)
    load_weights(model, state.__getitem__)
    results = []
    for matvec in (False, True):
        decoder = Decoder()
        decoder.prepare(model, 1, len(PROMPTS[0]) + NEW_TOKENS, mesh)
        decoder._step = functools.partial(forward_step, matvec=matvec)
        results.append(generate(model, PROMPTS[:1], GREEDY, mesh=mesh, decoder=decoder))
    return results


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", ["llama", "qwen2", "gpt2"])  # qwen2: biases on q, k and v
def test_matvec_decode_step_matches_the_layers(case, tp):
    hf_cfg, hf_state, _, _ = _reference(case)
    for plain, matvec in run_ranks(tp, _matvec_vs_matmul, hf_cfg, hf_state, tp, timeout=60):
        assert matvec.tokens == plain.tokens
        diff = max(abs(a - b) for a, b in zip(matvec.logprobs[0], plain.logprobs[0], strict=True))
        assert diff < 1e-4, f"{case} tp={tp}: max |logprob(matvec) - logprob(matmul)| = {diff:.3g}"


def _compiled_prefill(rank: int, world: int, hf_cfg: dict, hf_state: dict):
    cfg = model_config_from_hf(hf_cfg)
    model = build_stage(cfg, build_mesh(1, 1, 1))
    load_weights(model, from_hf_state_dict(cfg, hf_state).__getitem__)
    decoder = Decoder(compiled=True)  # on CPU: the prompt's forward compiled, decode steps eager
    torch._dynamo.utils.counters.clear()
    batch = generate(model, PROMPTS, GREEDY, decoder=decoder)
    one = generate(model, PROMPTS[:1], GREEDY, decoder=decoder)  # a prompt of another length
    return batch, one, sum(torch._dynamo.utils.counters["stats"].values())


def test_a_compiled_prefill_matches_transformers_at_two_prompt_lengths():
    hf_cfg, hf_state, tokens, logprobs = _reference("llama")
    batch, one, compiled = run_ranks(1, _compiled_prefill, hf_cfg, hf_state, timeout=240)[0]
    assert compiled > 0, "the prompt's forward was not compiled"
    assert batch.tokens == tokens
    assert one.tokens == tokens[:1]
    diff = max(abs(a - b) for a, b in zip(batch.logprobs[1], logprobs[1], strict=True))
    assert diff < 1e-4, f"max |logprob - transformers| = {diff:.3g}"
