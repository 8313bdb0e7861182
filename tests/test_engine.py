"""The inference engine: every fast path against its reference (cached == full forward, absorbed == naive ==
fast, batched == one by one, continuous batching == isolated runs, speculative == greedy), sampling,
stopping, log-probs and bad input."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanoseek import decode
from nanoseek import engine as engine_module
from nanoseek.config import preset
from nanoseek.engine import Engine, KVCache, SamplingParams, filtered_probs, penalize
from nanoseek.errors import UserError
from nanoseek.model import NanoSeek

CPU = torch.device("cpu")

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


def random_model(**overrides):
    model = NanoSeek(preset("tiny", **overrides)).eval()
    with torch.no_grad():  # non-trivial norms, so that a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return random_model()


@pytest.fixture(scope="module")
def trained():
    """A tiny model whose MTP module is good but lags behind its main model, so that speculative decoding
    both accepts and rejects drafts, sometimes within one batch: both learn a successor permutation, then the
    main model alone learns that a quarter of the tokens have a different successor."""
    torch.manual_seed(0)
    V = 64
    model = NanoSeek(preset("tiny", vocab_size=V, max_position_embeddings=128, mtp_loss_weight=1.0)).train()
    perm, perm2 = torch.randperm(V), torch.randperm(V)
    changed = torch.where(torch.arange(V) < V // 4, perm2, perm)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        if step == 40:
            model.config.mtp_loss_weight = 0.0
        successor = perm if step < 40 else changed
        x = torch.empty(16, 33, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (16,))
        for i in range(1, 33):
            x[:, i] = successor[x[:, i - 1]]
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_expert_bias()
    return model.eval()


def greedy_reference(model, prompt, n, presence=0.0, frequency=0.0, repetition=1.0):
    """Plain greedy decoding with full forwards, no cache; with penalties as vLLM applies them (repetition on
    the logits of tokens in the prompt or output, then presence and frequency over the output)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].float()
            out = ids[len(prompt):]
            for t in set(ids):
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
            for t in set(out):
                logits[t] -= presence + frequency * out.count(t)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def cached_logits(engine, ids, split):
    """Prefill ids[:split] in one forward, then feed the rest one token at a time through the cache."""
    cache, fwd = engine.cache, engine.forward
    slot = cache.allocate()
    out, start = [], 0
    with torch.no_grad():
        for stop in [split, *range(split + 1, ids.shape[1] + 1)]:
            positions = cache.begin([slot], stop - start)
            out.append(fwd.logits(fwd.hidden(ids[:, start:stop], positions, cache)))
            cache.advance([slot], [stop - start])
            start = stop
    cache.free(slot)
    return torch.cat(out, 1)


@pytest.mark.parametrize("q_lora", [32, None])
def test_cached_decoding_matches_full_forward_for_every_impl(q_lora):
    model = random_model(q_lora_rank=q_lora)
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        full = model(ids)
    results = {impl: cached_logits(Engine(model, impl=impl), ids, split=10) for impl in ("naive", "absorbed", "fast")}
    for impl, logits in results.items():
        torch.testing.assert_close(logits, full, atol=2e-5, rtol=1e-4, msg=impl)
    torch.testing.assert_close(results["absorbed"], results["naive"], atol=2e-5, rtol=1e-4)


def test_long_prefills_attend_in_query_blocks_like_the_full_forward(model, monkeypatch):
    """The fast path's attention takes a long prefill's queries in blocks (ATTENTION_BLOCK, 4 here), each over
    the keys it may see: a prefill of three blocks, one of four onto a cache that holds tokens already, and a batch
    of prompts of different lengths, against the full forward."""
    monkeypatch.setattr(engine_module, "ATTENTION_BLOCK", 4)
    ids = torch.randint(0, 512, (1, 24))
    engine = Engine(model, impl="fast")
    cache, fwd = engine.cache, engine.forward
    slot = cache.allocate()
    out = []
    with torch.no_grad():
        full = model(ids)
        for start, stop in ((0, 10), (10, 24)):
            positions = cache.begin([slot], stop - start)
            out.append(fwd.logits(fwd.hidden(ids[:, start:stop], positions, cache)))
            cache.advance([slot], [stop - start])
    torch.testing.assert_close(torch.cat(out, 1), full, atol=2e-5, rtol=1e-4)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (13, 6, 9)]
    batched = Engine(model, max_batch=3, impl="fast").generate(prompts, GREEDY)
    assert [o.tokens for o in batched] == [greedy_reference(model, p, 12) for p in prompts]


def test_mla_cache_holds_only_the_latent_and_rope_key():
    cpu = preset("cpu")
    mla = KVCache(cpu, range(1), max_batch=1, max_len=4)
    mha = KVCache(cpu.replace(attention_type="mha"), range(1), max_batch=1, max_len=4)  # same head dims
    assert mla.bytes_per_token_per_layer == (cpu.kv_lora_rank + cpu.qk_rope_head_dim) * 4
    assert mha.bytes_per_token_per_layer == cpu.num_attention_heads * (cpu.qk_head_dim + cpu.v_head_dim) * 4
    assert mha.bytes_per_token_per_layer / mla.bytes_per_token_per_layer >= 8


def test_bf16_cache_is_half_the_size_and_close(model):
    ids = torch.randint(0, 512, (1, 20))
    e32, e16 = Engine(model), Engine(model, cache_dtype=torch.bfloat16)
    assert e16.cache.bytes_per_token_per_layer * 2 == e32.cache.bytes_per_token_per_layer
    a, b = cached_logits(e32, ids, 8), cached_logits(e16, ids, 8)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_bf16_fast_weights_stay_close(model):
    ids = torch.randint(0, 512, (1, 20))
    a, b = cached_logits(Engine(model), ids, 8), cached_logits(Engine(model, dtype=torch.bfloat16), ids, 8)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("impl", ["fast", "absorbed", "naive"])
def test_a_bf16_model_generates_with_every_impl(model, impl):
    m16 = random_model().to(torch.bfloat16)
    out = Engine(m16, impl=impl, speculative=True).generate([[1, 2, 3]], GREEDY)[0]
    assert len(out.tokens) == 12 and all(-30 < lp <= 0 for lp in out.logprobs)


def test_dense_mha_baseline_decodes_like_full_forward():
    model = NanoSeek(preset("dense", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
    out = Engine(model, max_batch=2).generate(prompts, GREEDY)
    assert [o.tokens for o in out] == [greedy_reference(model, p, 12) for p in prompts]


@pytest.mark.parametrize("impl", ["fast", "naive"])
def test_batched_prompts_of_different_lengths_equal_one_by_one(model, impl):
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (7, 1, 19, 4, 11)]
    sampled = SamplingParams(temperature=1.0, top_k=40, seed=3, max_new_tokens=12)
    params = [GREEDY, sampled, GREEDY, sampled, GREEDY]
    # max_batch 3 < 5 prompts: the last ones wait for free slots; a prefill budget of 40 tokens splits the
    # admissions too (7 and 1 first: 3 x 19 padded tokens would exceed it)
    batched = Engine(model, max_batch=3, impl=impl, max_prefill_tokens=40).generate(prompts, params)
    alone = [Engine(model, max_batch=1, impl=impl).generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    assert [o.tokens for o in batched] == [o.tokens for o in alone]
    for o, p in zip(batched[::2], prompts[::2]):
        assert o.tokens == greedy_reference(model, p, 12)
    for a, b in zip(batched, alone):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.6, top_k=20, top_p=0.9,
                                                                   repetition_penalty=1.3)])
def test_logprobs_are_log_softmax_of_full_forward_logits(model, params):
    """Of the model's own distribution, whatever the sampling settings (what RL needs)."""
    prompt = [5, 9, 200, 3]
    out = Engine(model).generate([prompt], SamplingParams(seed=0, max_new_tokens=10, **params))[0]
    with torch.no_grad():
        logp = model(torch.tensor([prompt + out.tokens])).log_softmax(-1)[0, len(prompt) - 1: -1]
    expected = logp.gather(1, torch.tensor(out.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-5, rtol=0)


def test_top_logprobs_and_prompt_scores_are_those_of_the_full_forward(model):
    """A prompt scored at prefill and the alternatives at every generated position, next to a request in the same
    batch that asked for neither (and gets neither)."""
    prompt = [5, 9, 200, 3, 17, 1]
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=6, top_logprobs=3, prompt_logprobs=True)
    engine = Engine(model)
    out, plain = engine.generate([prompt, [7, 8]], [params, SamplingParams(temperature=0, max_new_tokens=6)])
    with torch.no_grad():
        logp = model(torch.tensor([prompt + out.tokens])).log_softmax(-1)[0, :-1]  # position i predicts i + 1
    targets = torch.tensor(prompt[1:] + out.tokens)
    scores = out.prompt_logprobs
    torch.testing.assert_close(torch.tensor(scores.logprobs + out.logprobs),
                               logp.gather(1, targets[:, None])[:, 0], atol=1e-5, rtol=0)
    values, ids = logp.topk(3)
    tops = scores.top_logprobs + out.top_logprobs
    assert [[t for t, _ in top] for top in tops] == ids.tolist()
    torch.testing.assert_close(torch.tensor([[lp for _, lp in top] for top in tops]), values, atol=1e-5, rtol=0)
    assert plain.top_logprobs is None and plain.prompt_logprobs is None
    small = Engine(random_model(vocab_size=16)).generate([[1, 2]], SamplingParams(max_new_tokens=2, top_logprobs=20))
    assert [len(top) for top in small[0].top_logprobs] == [16, 16]  # at most the whole vocabulary
    events = list(engine.stream(prompt, params))  # alone now; the scores come with the first event only
    assert all(e.prompt_logprobs is None for e in events[1:])
    torch.testing.assert_close(torch.tensor(events[0].prompt_logprobs.logprobs), torch.tensor(scores.logprobs),
                               atol=1e-5, rtol=0)
    assert [[t for t, _ in e.top_logprobs] for e in events] == ids[len(prompt) - 1:].tolist()  # (seeded: same tokens)


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    prompt = [1, 2, 3, 4]

    def sample(seed, others=0):
        e = Engine(model, max_batch=4)
        extra = [[7] * 5, [9, 8]][:others]
        params = [SamplingParams(temperature=1.2, top_p=0.95, seed=seed, max_new_tokens=16)]
        params += [SamplingParams(temperature=1.0, seed=99 + i) for i in range(others)]
        return e.generate([prompt, *extra], params)[0].tokens

    assert sample(1) == sample(1)
    assert sample(1) == sample(1, others=2)  # the same tokens whatever else shares the batch
    assert sample(1) != sample(2)


def test_top_k_and_top_p_restrict_the_choices(model):
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        top = model(torch.tensor([prompt]))[0, -1].topk(3).indices.tolist()
    firsts = {Engine(model).generate([prompt], SamplingParams(temperature=5.0, top_k=3, seed=s,
                                                             max_new_tokens=1))[0].tokens[0] for s in range(30)}
    assert firsts <= set(top) and len(firsts) > 1
    nucleus = {Engine(model).generate([prompt], SamplingParams(temperature=1.0, top_p=1e-6, seed=s,
                                                              max_new_tokens=1))[0].tokens[0] for s in range(5)}
    assert nucleus == {top[0]}  # a tiny nucleus is the single most likely token


def test_sampling_distribution_after_temperature_top_k_and_top_p():
    p = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.05])
    logits = p.log() + 7.0  # (softmax does not see the shift)
    got = filtered_probs(logits, SamplingParams(top_p=0.7))  # 0.5 and 0.3 reach 0.7: 0.1 and less are dropped
    torch.testing.assert_close(got, torch.tensor([0.625, 0.0, 0.375, 0.0, 0.0]))
    sharp = torch.tensor([0.25, 0.01, 0.09, 0.0, 0.0])  # temperature 0.5 squares, top-k 3 keeps three
    torch.testing.assert_close(filtered_probs(logits, SamplingParams(temperature=0.5, top_k=3)), sharp / sharp.sum())
    torch.testing.assert_close(filtered_probs(logits, SamplingParams()), p)


def test_continuous_batching_joins_and_leaves_like_isolated_runs(model):
    prompts = {"a": [1, 2, 3], "b": [10, 11, 12, 13, 14, 15], "c": [20, 21], "d": [30, 31, 32, 33]}
    params = {"a": SamplingParams(temperature=0, max_new_tokens=14),
              "b": SamplingParams(temperature=0, max_new_tokens=3),
              "c": SamplingParams(temperature=0.9, seed=5, max_new_tokens=6),
              "d": SamplingParams(temperature=0, max_new_tokens=5)}
    e = Engine(model, max_batch=2)
    rid, got, finished_at, step = {}, {}, {}, 0
    rid["a"] = e.add_request(prompts["a"], params["a"])
    names = {}
    while e.has_work() or len(rid) < 4:
        if step == 2:  # b joins a running batch; c and d arrive while both slots are taken
            for k in "bcd":
                rid[k] = e.add_request(prompts[k], params[k])
            names = {v: k for k, v in rid.items()}
        for ev in e.step():
            k = names.get(ev.request_id, "a")
            got.setdefault(k, []).append(ev.token)
            if ev.finish_reason:
                finished_at[k] = step
        assert len(e.running) <= 2
        step += 1
    for k in prompts:
        assert got[k] == Engine(model, max_batch=1).generate([prompts[k]], params[k])[0].tokens, k
    assert finished_at["b"] < finished_at["c"]  # c only got a slot when b left
    assert sorted(e.cache.free_slots) == [0, 1] and e.cache.lengths == [0, 0] and not e.sequences


def test_abort_frees_the_slot(model):
    e = Engine(model, max_batch=1)
    r = e.add_request([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=50))
    e.step()
    e.step()
    assert e.cache.free_slots == [] and e.cache.lengths[0] == 4
    e.abort(r)
    assert e.cache.free_slots == [0] and not e.has_work()
    assert e.generate([[4, 5]], GREEDY)[0].tokens == greedy_reference(model, [4, 5], 12)


def test_stop_tokens_stop_checks_and_lengths(model):
    prompt = [8, 6, 7, 5, 3, 0, 9]
    ref = greedy_reference(model, prompt, 12)
    stop_at = next(i for i in range(2, 12) if ref[i] not in ref[:i])  # a token's first occurrence
    e = Engine(model, max_len=20)
    out = e.generate([prompt], SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=[ref[stop_at]]))[0]
    assert out.tokens == ref[: stop_at + 1] and out.finish_reason == "stop"  # the stop token is emitted
    out = e.generate([prompt], SamplingParams(temperature=0, stop_check=lambda ids: len(ids) == 5))[0]
    assert out.tokens == ref[:5] and out.finish_reason == "stop"
    out = e.generate([prompt], SamplingParams(temperature=0, max_new_tokens=4))[0]
    assert out.tokens == ref[:4] and out.finish_reason == "length"
    out = e.generate([prompt * 2], SamplingParams(temperature=0, max_new_tokens=100))[0]
    assert len(out.tokens) == 20 - 14 and out.finish_reason == "length"  # the context is full


def test_streams_and_generate_interleaved_each_get_all_their_tokens(model):
    """A step run by one caller also makes the others' tokens: each stream still yields all of its own."""
    e = Engine(model, max_batch=4)
    a, b = e.stream([1, 2, 3], GREEDY), e.stream([4, 5], SamplingParams(temperature=0, max_new_tokens=3))
    first = next(a)
    assert [ev.token for ev in b] == greedy_reference(model, [4, 5], 3)  # runs a's steps too
    assert [first.token, *(ev.token for ev in a)] == greedy_reference(model, [1, 2, 3], 12)
    c = e.stream([6, 7], GREEDY)
    next(c)
    assert e.generate([[8, 9]], GREEDY)[0].tokens == greedy_reference(model, [8, 9], 12)
    assert len([next(c), *c]) == 11 and not e.has_work()


def test_a_failing_stop_check_ends_its_request_only(model):
    def fails(ids):
        if len(ids) == 3:
            raise KeyError("the caller's bug")
        return False
    e = Engine(model, max_batch=2)
    bad = e.add_request([1, 2, 3], SamplingParams(temperature=0, stop_check=fails))
    good = e.add_request([4, 5], GREEDY)
    other = e.sequences[good]
    events = [ev for _ in range(3) for ev in e.step()]  # the step where it raises returns every event
    last = [ev for ev in events if ev.request_id == bad][-1]
    assert last.finish_reason == "error" and isinstance(last.error, KeyError)
    assert bad not in e.sequences and [ev.token for ev in events if ev.request_id == good] == other.tokens[:3]
    while e.has_work():
        e.step()
    assert e.sequences == {} and sorted(e.cache.free_slots) == [0, 1]
    # the other request's tokens are those of a run alone (its cache did not drift)
    assert other.tokens == greedy_reference(model, [4, 5], 12)
    # generate() and stream() raise it for their own request; another stream goes on
    with pytest.raises(KeyError):
        e.generate([[4, 5], [1, 2, 3]], [GREEDY, SamplingParams(temperature=0, stop_check=fails)])
    assert not e.has_work()
    mine, theirs = e.stream([1, 2, 3], SamplingParams(temperature=0, stop_check=fails)), e.stream([4, 5], GREEDY)
    assert next(theirs).token == other.tokens[0]
    with pytest.raises(KeyError):
        list(mine)
    assert [ev.token for ev in theirs] == other.tokens[1:]


def raising(error: BaseException):
    """A stand-in for a forward that fails with `error`."""
    def forward(*args):
        raise error
    return forward


def test_a_step_that_fails_ends_its_sequences_and_the_engine_serves_on(trained):
    """An exception inside the model's forward (out of memory, an interrupt) after the MTP cache advanced but
    before the main one did: the step's sequences end with their slots freed, a stream driven by another caller
    says so, and later requests decode exactly as on a fresh engine."""
    e = Engine(trained, max_batch=2, speculative=True)
    want = Engine(trained, speculative=True).generate([[5, 6, 7]], GREEDY)[0].tokens
    stream = e.stream([1, 2, 3], GREEDY)
    next(stream)  # admitted and prefilled
    other = e.add_request([4, 5], GREEDY)
    real = e.forward.decode
    e.forward.decode = raising(MemoryError("out of memory"))
    with pytest.raises(MemoryError):
        e.step()  # the MTP module drafted (its cache advanced), the verifying forward failed
    e.forward.decode = real
    assert other not in e.sequences and not e.has_work()
    assert sorted(e.cache.free_slots) == [0, 1] == sorted(e.mtp_cache.free_slots)
    with pytest.raises(RuntimeError, match="out of memory"):
        next(stream)
    assert e.generate([[5, 6, 7]], GREEDY)[0].tokens == want

    real = e.forward.hidden  # now in a prefill
    e.forward.hidden = raising(KeyboardInterrupt())
    e.add_request([1, 2], GREEDY)
    with pytest.raises(KeyboardInterrupt):
        e.step()
    e.forward.hidden = real
    assert not e.has_work() and sorted(e.cache.free_slots) == [0, 1] == sorted(e.mtp_cache.free_slots)
    assert e.generate([[5, 6, 7]], GREEDY)[0].tokens == want


@pytest.mark.parametrize("penalties", [  # (this random model never repeats a token unpenalized: negative ones make it)
    dict(frequency=-0.5), dict(presence=-1.0, frequency=0.6), dict(repetition=0.5, frequency=0.4),
    dict(presence=-0.5, frequency=0.3, repetition=1.3)])
def test_penalties_steer_greedy_choices_like_the_reference(model, trained, penalties):
    names = {"presence": "presence_penalty", "frequency": "frequency_penalty", "repetition": "repetition_penalty"}
    params = SamplingParams(temperature=0, max_new_tokens=16, **{names[k]: v for k, v in penalties.items()})
    prompt = [3, 1, 4, 1, 5]
    ref = greedy_reference(model, prompt, 16, **penalties)
    assert ref != greedy_reference(model, prompt, 16)  # the penalty changes the output here
    e = Engine(model, max_batch=2)
    out, plain = e.generate([prompt, prompt], [params, SamplingParams(temperature=0, max_new_tokens=16)])
    assert out.tokens == ref and plain.tokens == greedy_reference(model, prompt, 16)  # a neighbour is unaffected
    with torch.no_grad():  # log-probs stay the model's own
        full = model(torch.tensor([prompt + out.tokens]))[0, len(prompt) - 1: -1].float().log_softmax(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs), full[torch.arange(16), torch.tensor(out.tokens)],
                               atol=1e-4, rtol=0)
    # speculative decoding (drafts verified against the penalized choice) gives the same tokens
    spec = Engine(trained, speculative=True).generate([prompt], params)[0]
    assert spec.tokens == Engine(trained).generate([prompt], params)[0].tokens
    assert spec.tokens == greedy_reference(trained, prompt, 16, **penalties)


@pytest.mark.parametrize("temperature", [1e-40, 1e-46])  # 1e-46 is 0 in float32
def test_a_tiny_temperature_is_greedy_not_nan(model, temperature):
    out = Engine(model).generate([[1, 2, 3]], SamplingParams(temperature=temperature, max_new_tokens=12, seed=0))[0]
    assert out.tokens == greedy_reference(model, [1, 2, 3], 12)


def test_a_tiny_repetition_penalty_repeats_not_nan():
    """A penalty near 0 multiplies a seen token's positive logit beyond float32's range: it stays finite (as inf,
    inf - inf = NaN made every probability NaN, and the engine drew the last vocabulary id every time)."""
    p = SamplingParams(temperature=1.0, repetition_penalty=1e-46)
    logits = penalize(torch.tensor([2.0, 1.0, -1.0, 0.5]), p, prompt=[0, 2], output=[])
    assert torch.isfinite(logits).all() and logits.argmax() == 0
    assert filtered_probs(logits, p).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_fast_weights_follow_a_trained_model(model):
    m = random_model()
    e = Engine(m)
    e.generate([[1, 2]], GREEDY)
    with torch.no_grad():  # what an optimizer step does: in-place updates
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert e.generate([[1, 2]], GREEDY)[0].tokens == greedy_reference(m, [1, 2], 12)


def test_fast_weights_follow_an_update_of_the_expert_bias_alone():
    m = random_model().to(torch.bfloat16)  # (the fold's fp32 copy of a bf16 bias would keep the old values)
    e = Engine(m)
    e.generate([[1, 2]], GREEDY)
    assert not e.forward.stale()
    with torch.no_grad():  # what model.update_expert_bias() does
        m.moe_layers()[0].gate.e_score_correction_bias[0] += 1.0
    assert e.forward.stale()
    e.generate([[1, 2]], GREEDY)  # refolded
    assert not e.forward.stale() and e.forward.w.layers[1].bias[0] == 1.0


@pytest.mark.parametrize("impl", ["fast", "naive"])
def test_speculative_greedy_equals_plain_greedy(trained, impl):
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [40, 41, 9], [3, 3]]
    params = SamplingParams(temperature=0, max_new_tokens=40, top_logprobs=2)
    plain = Engine(trained, max_batch=3, impl=impl).generate(prompts, params)
    spec_engine = Engine(trained, max_batch=3, impl=impl, speculative=True)
    spec = spec_engine.generate(prompts, params)
    assert [o.tokens for o in spec] == [o.tokens for o in plain]
    for a, b in zip(spec, plain):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
        assert [[t for t, _ in top] for top in a.top_logprobs] == [[t for t, _ in top] for top in b.top_logprobs]
        torch.testing.assert_close(torch.tensor([[lp for _, lp in top] for top in a.top_logprobs]),
                                   torch.tensor([[lp for _, lp in top] for top in b.top_logprobs]), atol=1e-4, rtol=0)
    s = spec_engine.stats
    assert 0 < s["accepted"] < s["drafted"], s  # both branches ran


def test_speculative_mtp_cache_matches_the_training_forward(trained):
    e = Engine(trained, speculative=True)
    prompt = [7, 8, 9, 10]
    out = e.generate([prompt], SamplingParams(temperature=0, max_new_tokens=20))[0]
    ids = torch.tensor([prompt + out.tokens])
    k = ids.shape[1] - 3  # MTP positions certainly filled by the end
    ref = KVCache(trained.config, e.mtp_cache.layers, 1, 128)
    with torch.no_grad():  # module 0 at position i sees the main model's h_i and token i+1
        h = trained.hidden(ids[:, :k])
        trained.mtp_hidden(0, h, ids[:, 1: k + 1], ref.begin([0], k), ref)
    torch.testing.assert_close(e.mtp_cache.buffers[0][0][0, :k], ref.buffers[0][0][0, :k], atol=1e-5, rtol=1e-4)


def test_speculative_sampling_with_top_k_1_equals_greedy(trained):
    """Also in a batch with a greedy sequence (a sampled one takes the steps' general path)."""
    prompts = [[2, 4, 6], [11], [7, 8]]
    one = SamplingParams(temperature=0.7, top_k=1, seed=0, max_new_tokens=30)
    spec = Engine(trained, max_batch=3, speculative=True).generate(prompts, [one, one, GREEDY])
    assert [o.tokens for o in spec] == [greedy_reference(trained, p, len(o.tokens)) for p, o in zip(prompts, spec)]


def test_speculative_sampling_keeps_the_target_distribution(model):
    """Accept d ~ q with probability min(1, p/q), else resample from max(p - q, 0): the token is ~ p."""
    e = Engine(model, speculative=True)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0] * 4])
    p = logits[0].softmax(-1)
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    seq = SimpleNamespace(params=SamplingParams(temperature=1.0), generator=torch.Generator().manual_seed(0))
    counts = torch.zeros(4)
    for _ in range(4000):
        d = int(torch.multinomial(q, 1, generator=seq.generator))
        ok, first, _ = e._verify_sampled(seq, d, q, logits)
        counts[d if ok else first] += 1
    assert (counts / counts.sum() - p).abs().max() < 0.03


# --- decode steps through torch.compile (decode.py): each graph compiles once per session (~10-20 s here)

def test_compiled_decoding_equals_eager_alone_and_batched(trained, compiler):
    """One sequence (the one-token graph), two (on CPUs without AMX fused reductions too, in a graph of their own;
    see decode.gemm_from) and three (the graph of every other token count; then nothing compiles anew)."""
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [40, 41, 9]]
    params = SamplingParams(temperature=0, max_new_tokens=20)
    eager = Engine(trained, max_batch=3).generate(prompts, params)
    for batch in (1, 2, 3):
        engine = Engine(trained, max_batch=batch, compile=True)
        out = [c for i in range(0, 3, batch) for c in engine.generate(prompts[i: i + batch], params)]
        assert engine.forward.compiled is not None  # (a failed compile falls back to eager decoding)
        # on x86 CPUs the graphs' GEMMs (3 sequences) read oneDNN's packed weights
        assert isinstance(engine.forward.compiled.packed.head, decode.Packed) == decode.packs(torch.float32, CPU)
        assert [o.tokens for o in out] == [o.tokens for o in eager]
        for a, b in zip(out, eager):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    # once warmed up, a batch whose sequences leave one by one (3, 2, then 1 left) compiles nothing new
    engine.warm_up()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    lengths = (20, 12, 6)
    out = engine.generate(prompts, [SamplingParams(temperature=0, max_new_tokens=n) for n in lengths])
    assert [o.tokens for o in out] == [o.tokens[:n] for o, n in zip(eager, lengths)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("speculative, warm", [(False, None), (True, None), (True, "greedy"), (True, "sampled")])
def test_after_warm_up_one_sequence_at_a_time_compiles_nothing(trained, compiler, speculative, warm):
    """A chat's engine (max_batch=1) warmed up meets no new graph in its first requests: prompts of 1 to 29 tokens
    (prefills of up to COMPILED_PREFILL_TOKENS run through the graphs), greedy and sampled, or the one sampling
    warm_up() was given; a speculative engine warmed up for greedy requests only has not built the sampled path."""
    torch._dynamo.reset()  # (graphs compiled by earlier tests would hide one that warm_up() misses)
    decode._GRAPHS.clear()
    kinds = {"greedy": SamplingParams(temperature=0, max_new_tokens=6),
             "sampled": SamplingParams(max_new_tokens=6, seed=1, stop_token_ids=[0])}
    engine = Engine(trained, max_batch=1, speculative=speculative, compile=True)
    engine.warm_up(kinds[warm] if warm else None)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for prompt in ([5], [1, 2], [40, 41, 9], list(range(1, 8)), list(range(1, 30))):
        for kind, params in kinds.items():
            if warm in (None, kind):
                engine.generate([prompt], params)
    assert engine.forward.compiled is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    if warm == "greedy":
        engine.generate([[1, 2, 3]], kinds["sampled"])
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_equals_f_linear(dtype):
    """The compiled graphs' GEMM on oneDNN's packed copy of a weight, against F.linear on the weight itself."""
    if not decode.packs(dtype, CPU):
        pytest.skip(f"oneDNN's packed {dtype} weights are used on x86 CPUs (with bf16 units for bfloat16) only")
    torch.manual_seed(0)
    w = torch.randn(96, 64).to(dtype)
    packed = decode.pack_matrix(w)
    for n in (3, 17):
        x = torch.randn(n, 64)
        torch.testing.assert_close(decode._linear(x, packed), F.linear(x.to(dtype), w).float(),
                                   **({} if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)))
    with torch.inference_mode():
        w = decode.pack(decode.fold_model(random_model(), dtype))
    assert all(isinstance(m, decode.Packed) for m in (w.head, w.layers[0].w_in, w.layers[1].gate_up, w.mtp.eh_proj))


def test_compiled_sampling_draws_the_eager_tokens(trained, compiler):
    """Sampled decoding steps draw their tokens inside the compiled graph (decode.sample): temperature and top-k,
    greedy rows beside sampled ones; top-p and penalties sample eagerly after the graph. The same seeds give the
    same tokens as eager decoding, alone and batched."""
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [40, 41, 9]]
    params = [SamplingParams(temperature=1.3, seed=1, max_new_tokens=20),
              SamplingParams(temperature=0, max_new_tokens=20),
              SamplingParams(temperature=2.0, top_k=5, seed=2, max_new_tokens=20)]
    nucleus = SamplingParams(temperature=1.5, top_p=0.8, seed=3, max_new_tokens=20)
    eager = Engine(trained, max_batch=3)
    expected = [o.tokens for o in eager.generate(prompts, params)] + [eager.generate(prompts[:1], nucleus)[0].tokens]
    assert len({tuple(t) for t in expected}) == 4
    for batch in (1, 3):
        engine = Engine(trained, max_batch=batch, compile=True)
        out = [o.tokens for i in range(0, 3, batch)
               for o in engine.generate(prompts[i: i + batch], params[i: i + batch])]
        out.append(engine.generate(prompts[:1], nucleus)[0].tokens)
        assert out == expected and engine.forward.compiled is not None
    calls = []
    steps = engine.forward.compiled
    main_sampled = steps.main_sampled
    steps.main_sampled = lambda *a: calls.append(1) or main_sampled(*a)
    engine.generate(prompts, params)
    assert len(calls) >= 19  # (a step with the greedy row alone is a greedy one)


def test_compiled_engine_prefills_through_its_graph_up_to_the_limit(trained, monkeypatch, compiler):
    """A compiled engine prefills a prompt through its compiled step, and eagerly beyond COMPILED_PREFILL_TOKENS;
    the same tokens either way."""
    prompt, params = [1, 2, 3, 4, 5, 6, 7], SamplingParams(temperature=0, max_new_tokens=8)
    engine = Engine(trained, max_batch=1, compile=True)
    expected = engine.generate([prompt], params)[0].tokens
    eager_calls = []
    hidden = engine.forward.hidden
    monkeypatch.setattr(engine.forward, "hidden", lambda *a: eager_calls.append(1) or hidden(*a))
    assert engine.generate([prompt], params)[0].tokens == expected and not eager_calls
    monkeypatch.setattr(engine_module, "COMPILED_PREFILL_TOKENS", len(prompt) - 1)
    assert engine.generate([prompt], params)[0].tokens == expected and len(eager_calls) == 1


def test_compiled_speculative_decoding_equals_plain_greedy(trained, monkeypatch, compiler):
    """Greedy speculative steps run as one graph each (draft and verification): the MTP module's own compiled step
    is not called."""
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [40, 41, 9]]
    params = SamplingParams(temperature=0, max_new_tokens=30)
    plain = [o.tokens for o in Engine(trained, max_batch=3).generate(prompts, params)]
    monkeypatch.setattr(decode.CompiledSteps, "mtp", None)  # a call fails: the engine would stop compiling
    for batch in (1, 3):
        engine = Engine(trained, max_batch=batch, speculative=True, compile=True)
        out = [c.tokens for i in range(0, 3, batch) for c in engine.generate(prompts[i: i + batch], params)]
        assert out == plain and engine.forward.compiled is not None
        assert 0 < engine.stats["accepted"] < engine.stats["drafted"]


def test_compiled_graphs_follow_retrained_weights_without_recompiling(trained, compiler):
    m = copy.deepcopy(trained)
    engine = Engine(m, max_batch=1, compile=True)
    engine.generate([[1, 2]], GREEDY)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert engine.generate([[1, 2]], GREEDY)[0].tokens == greedy_reference(m, [1, 2], 12)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert engine.forward.compiled is not None


def test_compiled_steps_run_past_dynamo_once_compiled(trained, monkeypatch, compiler):
    """Once a step function is compiled for its inputs, the engine runs the compiled code directly, after its guards
    (decode.DirectCalls); inputs that no compiled variant accepts (here: two sequences) go through torch.compile,
    which compiles for them, and then run directly too. The same tokens throughout."""
    torch._dynamo.reset()  # (graphs compiled by earlier tests would serve the batch of two)
    decode._GRAPHS.clear()
    engine = Engine(trained, max_batch=2, compile=True)
    assert engine.generate([[1, 2]], GREEDY)[0].tokens == greedy_reference(trained, [1, 2], 12)
    through_dynamo = []
    for graph in decode._GRAPHS.values():
        monkeypatch.setattr(graph, "compiled", lambda *a, c=graph.compiled: through_dynamo.append(1) or c(*a))
    assert engine.generate([[1, 2]], GREEDY)[0].tokens == greedy_reference(trained, [1, 2], 12)
    assert not through_dynamo
    out = engine.generate([[1, 2], [3]], GREEDY)
    assert [o.tokens for o in out] == [greedy_reference(trained, p, 12) for p in ([1, 2], [3])]
    assert through_dynamo and engine.forward.compiled is not None
    through_dynamo.clear()
    assert [o.tokens for o in engine.generate([[1, 2], [3]], GREEDY)] == [o.tokens for o in out]
    assert not through_dynamo


def test_compile_falls_back_to_eager_when_the_compiler_fails(trained, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: no C++ compiler")
    monkeypatch.setattr(decode, "_graph", lambda fn, device: broken)
    engine = Engine(trained, max_batch=1, compile=True)
    out = engine.generate([[1, 2]], GREEDY)[0]
    assert out.tokens == greedy_reference(trained, [1, 2], 12)
    assert "no C++ compiler" in capsys.readouterr().err
    with torch.no_grad():
        trained.lm_head.weight.mul_(1.0)  # an in-place update: the weights are folded again, and not compiled
    assert engine.generate([[1, 2]], GREEDY)[0].tokens == out.tokens and capsys.readouterr().err == ""


def test_compile_needs_the_fast_mla_path(trained):
    with pytest.raises(UserError, match="compile"):
        Engine(trained, impl="naive", compile=True)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(seed=2**64), "seed"), (dict(top_logprobs=21), "top_logprobs"), (dict(top_logprobs=-1), "top_logprobs"),
    (dict(top_k=True), "top_k"), (dict(stop_token_ids=5), "stop_token_ids"), (dict(stop_token_ids=None), "stop"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty="x"), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(temperature=10**400), "temperature=1000"),
])
def test_invalid_sampling_parameters_are_user_errors(kwargs, field):
    with pytest.raises(UserError, match=field):
        SamplingParams(**kwargs)


def test_prompts_may_be_torch_or_numpy_vectors(model):
    e = Engine(model, max_batch=3)
    outs = e.generate([[5, 6, 7], torch.tensor([5, 6, 7]), np.array([5, 6, 7])], GREEDY)
    assert outs[0].tokens == outs[1].tokens == outs[2].tokens


def test_bad_prompts_and_engine_settings_are_user_errors(model):
    e = Engine(model, max_len=16)
    with pytest.raises(UserError, match="empty prompt"):
        e.add_request([])
    with pytest.raises(UserError, match="does not fit the context of 16"):
        e.add_request(list(range(16)))
    with pytest.raises(UserError, match="0..511"):
        e.add_request([1, 512])
    with pytest.raises(UserError, match="flat sequence"):  # a [1, T] batch is not a prompt
        e.add_request(torch.tensor([[1, 2]]))
    with pytest.raises(UserError, match="max_len"):
        Engine(model, max_len=10_000)
    with pytest.raises(UserError, match="cannot allocate the KV cache"):
        Engine(model, max_batch=10**9)
    with pytest.raises(UserError, match="MTP"):
        Engine(random_model(num_nextn_predict_layers=0), speculative=True)
    with pytest.raises(UserError, match="empty prompt"):  # the valid prompt before it is not left queued
        e.generate([[1, 2], []])
    assert not e.has_work()
    tight = Engine(model, max_batch=2, max_len=2)
    tight.warm_up()  # (its prompts leave room for a token)
    assert not tight.has_work()
