"""Inference engine: KV cache, sampling, batched and continuous generation, MTP speculative decoding.

Token ids in, token ids out: no tokenizer in here (chat.py, the server and RL add text on top).

    engine = Engine(model, max_batch=8)
    out = engine.generate([[1, 5, 7], [1, 9]], SamplingParams(temperature=0, max_new_tokens=32))
    out[0].tokens, out[0].logprobs, out[0].finish_reason

    rid = engine.add_request(prompt_ids, params)     # continuous batching: add at any time ...
    while engine.has_work():
        for ev in engine.step():                     # ... every step decodes one token per running sequence
            ev.request_id, ev.token, ev.logprob, ev.finish_reason

Cache layout (MLA): per token per layer only the normalised latent c_kv and the roped key, dc + dr numbers,
in fixed slots allocated once (max_batch x max_len per layer); a finished sequence gives its slot back at
once. Decoding uses the absorbed form (W_UK folded into the query, W_UV into the output). Three
interchangeable forward implementations, tested against each other:
  "fast"     - absorbed MLA with decode-friendly weights precomputed once (FastForward, the default);
  "absorbed" - the model's own absorbed form (model.hidden(absorb=True)), the reference for "fast";
  "naive"    - the model's naive form, expanding per-head K/V from the cached latent (the reference of both).
With compile=True the fast path's decode steps run as torch.compile'd graphs (decode.py), ~3x faster per token
for one sequence; prefills of up to COMPILED_PREFILL_TOKENS tokens run through them too.

Not thread-safe: drive one engine from one thread (the server's event loop thread does). Shapes: B batch
(sequences in this forward), S new tokens per sequence, T key length, H hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanoseek.decode import SAMPLED_TOP_K, CompiledSteps, LayerWeights, fold_model, packs, pick
from nanoseek.errors import UserError, first_line
from nanoseek.model import NanoSeek, route

IMPLS = ("fast", "absorbed", "naive")
MAX_TOP_LOGPROBS = 20  # alternatives per position at most (OpenAI's and vLLM's limit)
PROMPT_LOGPROBS_LOGITS = 1 << 24  # logits per output-head matmul when scoring a prompt (positions x vocabulary)
COMPILED_PREFILL_TOKENS = 64  # new tokens (all prompts of one prefill) up to which a compiled engine prefills
# through its decode graph; there the routed experts read their weights once per token-expert pair, so beyond it
# eager prefill's sorted dispatch is faster (32 prompts of 32 tokens through the graph: 4651 vs 5012 tokens/s)
ATTENTION_BLOCK = 128  # queries per attention block in the eager fast path (long prefills): on the AMD EPYC, one
# layer's latent attention over a 900-token prompt took 17.1 -> 8.6 ms in blocks of 128 (64: 8.4, 256: 9.1), 512
# tokens 6.1 -> 3.1 ms, 256 tokens 1.4 -> 1.1 ms
PADDED_MOE_MAX = 1024  # token-expert pairs up to which the fast MoE pads all experts into batched matmuls
# (from n_routed_experts pairs up: below that most experts get no token, and their weights need not be read)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it before top-k / top-p."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches top_p (1: all)."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token already generated (-2..2; 0: off)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was already generated (-2..2; 0: off)."""
    repetition_penalty: float = 1.0
    """transformers' and vLLM's: the logit of a token seen in the prompt or the output is divided by it when
    positive, multiplied when negative (> 0; 1: off). The penalties steer the choice of tokens (greedy too);
    log-probs stay those of the model's own distribution."""
    max_new_tokens: int = 256
    """Generated tokens at most (fewer when the context, max_len, fills up first)."""
    stop_token_ids: Sequence[int] = ()
    """Generation stops after emitting one of these (it is part of the output, with its log-prob)."""
    seed: int | None = None
    """Seeds this request's own torch.Generator: the same seed gives the same tokens."""
    stop_check: Callable[[list[int]], bool] | None = None
    """Called with the generated ids after every new token; True stops (stop strings: the caller decodes)."""
    top_logprobs: int = 0
    """Also report the k most likely tokens and their log-probs at every generated position (0: none)."""
    prompt_logprobs: bool = False
    """Also score the prompt: the log-prob of each prompt token given the ones before it (and, with top_logprobs,
    the most likely alternatives there). Costs one output-head matmul per prompt token at prefill."""

    def __post_init__(self):
        def bad(name, why):
            value = repr(getattr(self, name))
            value = value if len(value) <= 40 else value[:37] + "..."
            raise UserError(f"invalid sampling parameter {name}={value}: {why}")

        def integer(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def number(x):
            try:
                return (integer(x) or isinstance(x, float)) and math.isfinite(x)
            except OverflowError:  # an int beyond float range
                return False

        if not number(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 is greedy)")
        if not integer(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables it)")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "must be a number in -2..2")
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a number > 0")
        if not integer(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not integer(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be an integer in 0..{MAX_TOP_LOGPROBS}")
        if self.seed is not None and (not integer(self.seed) or not -(2**63) <= self.seed < 2**63):
            bad("seed", "must be a 64-bit signed integer")
        try:
            self.stop_token_ids = tuple(self.stop_token_ids)
        except TypeError:
            bad("stop_token_ids", "must be a list of token ids")
        if not all(integer(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1


Top = list[tuple[int, float]]
"""The most likely tokens at one position, most likely first: [(token id, log-prob), ...]."""


@dataclass
class PromptLogprobs:
    """A scored prompt (SamplingParams.prompt_logprobs): entry i is about prompt token i + 1 (the first token has
    no context to be scored in)."""

    logprobs: list[float]
    """log p(prompt[i + 1] | prompt[: i + 1])."""
    top_logprobs: list[Top] | None = None
    """With SamplingParams.top_logprobs = k: the k most likely tokens at each of those positions."""


@dataclass
class Event:
    """One generated token of one request."""

    request_id: int
    token: int
    logprob: float
    """log p(token) under the model's own next-token distribution (log_softmax of the raw logits, before
    temperature / top-k / top-p): what RL needs."""
    finish_reason: str | None = None
    """None while the request runs; "stop" (a stop token or stop_check), "length" (max_new_tokens or the
    context is full) or "error" (its stop_check raised) on its last token."""
    top_logprobs: Top | None = None
    """With SamplingParams.top_logprobs = k: the k most likely tokens at this position (the same log-probs)."""
    prompt_logprobs: PromptLogprobs | None = None
    """With SamplingParams.prompt_logprobs: the scored prompt, on the request's first event only."""
    error: BaseException | None = None
    """With finish_reason "error": what the request's stop_check raised."""


@dataclass
class Completion:
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    top_logprobs: list[Top] | None = None
    prompt_logprobs: PromptLogprobs | None = None


class KVCache:
    """Fixed slots for the attention layers `layers` (main layers 0..L-1, or MTP layers L+k).

    Per layer one buffer per cached tensor, [max_batch, max_len, ...], allocated once: for MLA the
    latent [.., dc + dr], for the MHA baseline k [.., nh, dqk] and v [.., nh, dv]. Each slot holds one
    sequence; `lengths[slot]` counts its valid positions. A forward first calls begin(slots, S): row b
    writes positions lengths[slot_b] .. +S-1 and may attend to keys <= its own position; update() is what
    the attention layers call. After the forward, advance() says how many of the S were real (padding and
    rejected draft tokens are not: their stale entries are masked, then overwritten).
    """

    def __init__(self, cfg, layers: range, max_batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        if cfg.attention_type == "mla":
            shapes = [(cfg.kv_lora_rank + cfg.qk_rope_head_dim,)]
        else:
            shapes = [(cfg.num_attention_heads, cfg.qk_head_dim), (cfg.num_attention_heads, cfg.v_head_dim)]
        self.layers, self.max_batch, self.max_len, self.dtype = layers, max_batch, max_len, dtype
        try:
            self.buffers = [[torch.zeros(max_batch, max_len, *s, dtype=dtype, device=device) for s in shapes]
                            for _ in layers]
        except (RuntimeError, MemoryError):  # (torch's out-of-memory errors are RuntimeErrors)
            size = len(layers) * max_batch * max_len * sum(math.prod(s) for s in shapes) * dtype.itemsize
            raise UserError(f"cannot allocate the KV cache: {size / 2**30:.1f} GiB for {max_batch} sequences of "
                            f"{max_len} positions; ask for fewer sequences (--max-batch)") from None
        self.lengths = [0] * max_batch
        self.free_slots = list(range(max_batch - 1, -1, -1))  # pop() hands out the lowest slot first
        self.device = device
        self._rows_for = None

    @property
    def bytes_per_token_per_layer(self) -> int:
        return sum(b[0, 0].numel() * b.element_size() for b in self.buffers[0])

    def allocate(self) -> int:
        slot = self.free_slots.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give the slot back; its memory is reused by the next sequence (no reallocation). Freeing a free
        slot does nothing."""
        self.lengths[slot] = 0
        if slot not in self.free_slots:
            self.free_slots.append(slot)
            self.free_slots.sort(reverse=True)

    def begin(self, slots: list[int], S: int) -> torch.Tensor:
        """Prepare a forward of S new tokens for each slot; returns their positions [B, S]."""
        B = len(slots)
        starts = [self.lengths[s] for s in slots]
        T = max(starts) + S
        if T > self.max_len:
            raise UserError(f"the KV cache holds {self.max_len} positions per sequence, {T} were needed")
        self.T, self.S, self.slots = T, S, slots
        # fast paths: a contiguous block of slots reads as a view; equal starts write as one slice
        self.block = slots[0] if slots == list(range(slots[0], slots[0] + B)) else None
        self.start = starts[0] if starts.count(starts[0]) == B else None
        # one tensor built from Python ints: each tensor operation between two steps costs ~10 us on the CPU
        # (the step's weights have evicted the interpreter from its caches)
        self.positions = torch.tensor([range(p, p + S) for p in starts], device=self.device)  # [B, S]
        if (slots, S) != self._rows_for:  # (the same batch step after step: kept)
            self._rows_for = (list(slots), S)
            self.rows = torch.tensor(slots, device=self.device)  # [B]
            self.token_rows = self.rows.repeat_interleave(S) if S > 1 else self.rows  # [B * S]: each new token's row
        self._mask = None
        return self.positions

    @property
    def mask(self) -> torch.Tensor:
        """[B, 1, S, T], causal over each row's own history: key t is visible to the query at position p iff
        t <= p. Built on first use: the compiled steps build theirs inside the graph (see decode.CompiledSteps)."""
        if self._mask is None:
            self._mask = (torch.arange(self.T, device=self.device) <= self.positions[..., None])[:, None]
        return self._mask

    def update(self, layer_idx: int, *new: torch.Tensor):
        """The attention layers' hook: store new [B, S, ...], return (*all [B, T, ...], mask [B, 1, S, T])."""
        out = []
        for buf, x in zip(self.buffers[layer_idx - self.layers.start], new):
            if self.start is not None and self.block is not None:
                buf[self.block: self.block + len(self.slots), self.start: self.start + self.S] = x
            else:
                buf[self.rows[:, None], self.positions] = x.to(buf.dtype)
            if self.block is not None:
                entries = buf[self.block: self.block + len(self.slots), : self.T]
            else:
                entries = buf[self.rows, : self.T]
            out.append(entries.to(x.dtype))  # a bf16 cache serves an fp32 model
        return (*out, self.mask)

    def advance(self, slots: list[int], counts: list[int]) -> None:
        for s, n in zip(slots, counts):
            self.lengths[s] += n


class _Forward:
    """What the engine calls. hidden/logits (and mtp_hidden/mtp_logits) are the pieces; decode() and mtp_decode()
    are one step of a few new tokens per sequence, hidden states and logits at every one of them (decode() also
    the greedy choice at each and its log-prob, decode.pick: the compiled steps compute it in their graph)."""

    def decode(self, ids, positions, cache):
        h = self.hidden(ids, positions, cache)
        logits = self.logits(h)
        return h, logits, *pick(logits)

    def prefill(self, ids, positions, cache):
        return self.hidden(ids, positions, cache)

    def decode_sampled(self, ids, cache, temps, ks, top, u):
        """decode() of one new token per sequence with the tokens drawn in the compiled graph (decode.sample): its
        outputs with the tokens and their log-probs for pick's, or None where there is no graph (then the engine
        samples eagerly)."""
        return None

    def mtp_decode(self, h_prev, next_ids, positions, cache):
        h = self.mtp_hidden(h_prev, next_ids, positions, cache)
        return h, self.mtp_logits(h)

    def speculate(self, h_prev, mtp_ids, last, ids, mtp_cache, cache):
        """A greedy speculative step (Engine._speculate), both caches begun for two tokens per sequence: the MTP
        module takes the pairs (h_prev [B, 2, H], mtp_ids [B, 2]) and drafts the argmax at pair last[b]; the main
        model runs [ids[b], draft[b]]. -> drafts [B], hidden states [B, 2, H], logits [B, 2, V], and the greedy
        choice at each with its log-prob [B, 2] (decode.pick)."""
        _, q = self.mtp_decode(h_prev, mtp_ids, mtp_cache.positions, mtp_cache)
        drafts = q[torch.arange(len(last)), last].argmax(-1)
        return drafts, *self.decode(torch.stack((ids, drafts), 1), cache.positions, cache)


class _ModelForward(_Forward):
    """The model's own forward (absorbed or naive MLA): the reference implementations."""

    def __init__(self, model: NanoSeek, absorb: bool):
        self.model, self.absorb = model, absorb

    def hidden(self, ids, positions, cache):
        return self.model.hidden(ids, positions, cache, self.absorb)

    def mtp_hidden(self, h_prev, next_ids, positions, cache):
        return self.model.mtp_hidden(0, h_prev, next_ids, positions, cache, self.absorb)

    def logits(self, h):
        return self.model.lm_head(h).float()

    def mtp_logits(self, h):
        return self.model.lm_head(self.model.mtp[0].norm(h)).float()

    def stale(self) -> bool:
        return False


class _Weight:
    """A linear weight prepared for decoding: x [..., in] -> [..., out], in x's dtype.

    float32: one token reads a copy stored [in, out]: x @ w reads it ~1.6x faster than F.linear(x, w) at batch 1
    on this CPU (55 vs 104 us for 256x768 out of cache), and batch-1 decoding is bound by reading weights. More
    tokens, on x86 CPUs: oneDNN's prepacked copy (decode.packs), which MKL's GEMM of a few rows is 2-3x slower than
    on AMD's CPUs (eager calls, 256 -> 768 / 256 -> 4096: 2 tokens 53 / 141 us against 40 / 53, 32 tokens 144 / 527
    against 77 / 320; one token 25 / 78 against 41 / 56). bfloat16 on CPU: oneDNN's prepacked layout always, the
    kernel torch.compile itself uses (torch.ops.mkldnn; MKL's bf16 F.linear is no faster than float32 here). Alone
    such a matmul is ~2x float32; in a whole decode step the casts around it cost that back at batch 1 and leave
    ~10-15% at batch 32 (measured on this CPU). The padded expert matmuls of larger batches (_padded_experts) gain
    more from bf16: ~1.6x for the whole step at batch 32."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        w = w.detach().to(dtype)
        self.dtype = dtype
        bf16 = dtype == torch.bfloat16 and w.device.type == "cpu" and torch.backends.mkldnn.is_available()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w) if bf16 or packs(dtype, w.device) else None
        self.w = None if bf16 else w.t().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.packed is not None and (self.w is None or rows.shape[0] > 1):
            y = torch.ops.mkldnn._linear_pointwise(rows.to(self.dtype), self.packed, None, "none", [], "")
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        return (x.to(self.w.dtype) @ self.w).to(x.dtype)


def _norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """A model RMSNorm (fp32 gain) through F.rms_norm: the same float32 result in one call instead of nine (~5 us
    less per norm here; a decode step runs 4 per layer)."""
    return F.rms_norm(x, gain.shape, gain, eps)


class _SwiGLU:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul (gate_up [2I, H], gate rows first)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, dtype):
        self.gate_up, self.down = _Weight(gate_up, dtype), _Weight(down, dtype)

    def __call__(self, x):
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)


class _FastLayer:
    """One decoder layer with absorbed-MLA weights folded once (decode.fold_layer; see FastForward)."""

    def __init__(self, p: LayerWeights, layer_idx: int, dtype, cfg):
        self.p, self.layer_idx, self.cfg = p, layer_idx, cfg
        self.w_in, self.w_o = _Weight(p.w_in, dtype), _Weight(p.w_o, dtype)
        self.w_q = _Weight(p.w_q, dtype) if p.w_q is not None else None
        self.dense = _SwiGLU(p.gate_up, p.down, dtype) if p.gate_up is not None else None
        if p.router is not None:
            self.experts = [_SwiGLU(gu, dn, dtype) for gu, dn in zip(p.experts_gate_up, p.experts_down)]
            # all experts stacked for the padded batched path: [E, H, 2I] and [E, I, H]
            self.stacked = (p.experts_gate_up.transpose(1, 2).contiguous(), p.experts_down.transpose(1, 2).contiguous())

    def __call__(self, h, rot, bias, cache):
        p = self.p
        h = h + self.attention(_norm(h, p.norm1, p.eps), rot, bias, cache)
        return h + self.ffn(_norm(h, p.norm2, p.eps))

    def attention(self, x, rot, bias, cache):
        B, S, _ = x.shape
        p = self.p
        nh, dc, dr = p.nh, p.dc, p.dr
        a, c_kv, k_rot = self.w_in(x).split(p.split, -1)
        q = a if self.w_q is None else self.w_q(_norm(a, p.q_norm, p.latent_eps))
        q_lat, q_rot = q.view(B * S, nh, dc + dr).split([dc, dr], -1)
        k_rot = torch.bmm(k_rot.reshape(B * S, 1, dr), rot).view(B, S, dr)
        latent = torch.cat((_norm(c_kv, p.kv_norm, p.latent_eps), k_rot), -1)
        latent, _ = cache.update(self.layer_idx, latent)  # [B, T, dc+dr]
        q = torch.cat((q_lat, torch.bmm(q_rot, rot)), -1).view(B, S * nh, dc + dr)
        # MQA over the latent: every head attends to the same [c_kv ; k_rot]; the value is c_kv itself. Queries
        # in blocks: block [s0, s1) sees no key past the latest start + s1 (causal), so a long prompt's blocks skip
        # the keys after them, and each block's scores stay in the CPU's caches
        if S <= ATTENTION_BLOCK:
            o = self._attend(q, latent, bias)
        else:
            past = latent.shape[1] - S  # the latest start of the batch's sequences
            o = torch.cat([self._attend(q[:, s0 * nh: s1 * nh], latent[:, : past + s1], bias[:, s0:s1, :, : past + s1])
                           for s0 in range(0, S, ATTENTION_BLOCK) for s1 in [min(S, s0 + ATTENTION_BLOCK)]], 1)
        return self.w_o(o.view(B, S, nh * dc))

    def _attend(self, q, latent, bias):
        """q [B, n*nh, dc+dr] for n queries, the latent keys [B, T, dc+dr] they may see and bias [B, n, 1, T]
        -> [B, n*nh, dc]."""
        B, n = bias.shape[:2]
        scores = torch.bmm(q, latent.transpose(1, 2)).view(B, n, self.p.nh, -1) + bias
        return torch.bmm(scores.softmax(-1).view(B, q.shape[1], -1), latent[..., : self.p.dc])

    def ffn(self, x):
        B, S, H = x.shape
        xf = x.view(B * S, H)
        y = self.dense(xf) if self.dense is not None else torch.zeros_like(xf)  # dense MLP or shared experts
        if self.p.router is not None:
            # the model's routing; fp32 without autocast, so a plain linear (no custom op's call overhead)
            weights, idx, _ = route(xf, self.p.router, self.p.bias, self.cfg, F.linear)
            if B * S == 1:  # one token: run its K experts directly
                for e, w in zip(idx[0].tolist(), weights[0]):
                    y = y + self.experts[e](xf) * w
            else:  # sort-based dispatch, as in the model
                K, E = idx.shape[1], len(self.experts)
                flat = idx.reshape(-1)
                order = flat.argsort(stable=True)
                token = order // K
                counts = torch.bincount(flat, minlength=E)
                if E <= flat.numel() <= PADDED_MOE_MAX:  # (fewer pairs than experts: most experts idle)
                    routed = self._padded_experts(xf[token], flat[order], counts)
                else:  # one matmul per expert over its tokens
                    routed = torch.cat([self.experts[e](xe) for e, xe in enumerate(xf[token].split(counts.tolist()))
                                        if len(xe)])
                y = y.index_add(0, token, routed * weights.reshape(-1)[order, None].to(routed.dtype))
        return y.view(B, S, H)


    def _padded_experts(self, xs: torch.Tensor, experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Tokens xs [n, H] sorted by expert -> expert outputs [n, H]: every expert's tokens padded to the
        busiest expert's count, all experts in two batched matmuls. In decoding steps each expert sees a few
        tokens, and two bmm calls cost far less than 2 x E small matmuls (the padding is a few rows)."""
        E, H = len(self.experts), xs.shape[-1]
        gate_up, down = self.stacked
        cap = int(counts.max())
        starts = counts.cumsum(0) - counts
        slot = experts * cap + torch.arange(len(xs), device=xs.device) - starts[experts]
        buf = xs.new_zeros(E * cap, H, dtype=gate_up.dtype)
        buf[slot] = xs.to(gate_up.dtype)
        gate, up = torch.bmm(buf.view(E, cap, H), gate_up).chunk(2, -1)
        return torch.bmm(F.silu(gate) * up, down).view(E * cap, H)[slot].to(xs.dtype)


class FastForward(_Forward):
    """The absorbed MLA forward (model.hidden(absorb=True)) with weights prepared for decoding.

    At batch 1 decoding is bound by per-op overhead and by reading weights, not by FLOPs, so: W_UK and the
    softmax scale are folded into the query projection, W_UV into o_proj, q_a and kv_a projections (or
    q_proj and kv_a) fused into one matmul, as are each SwiGLU's gate and up; weights are stored for fast
    matrix-vector products (_Weight), in float32 (the exact reference) or bfloat16; RoPE is one small matmul
    per position shared by all layers; a single token's experts run without the sort. Norms, the router and
    attention stay float32. Measured here on an 8M model at batch 1: ~1.6x the model's own absorbed forward
    in float32.

    The weights are copies (about one more model in memory), taken when built: `stale()` tells when the
    model's parameters changed since (RL updates them), and the Engine then rebuilds. compile: decode(),
    mtp_decode(), speculate() and short prefills run the same folded weights through decode.CompiledSteps (longer
    prefills stay here); if torch.compile fails (no C++ compiler, say), it says why once and decodes eagerly.
    """

    def __init__(self, model: NanoSeek, dtype: torch.dtype = torch.float32, compile: bool = False):
        self.model = model
        self.versions = self._versions()
        w = self.w = fold_model(model, dtype)
        L = len(w.layers)
        self.layers = [_FastLayer(p, i, dtype, model.config) for i, p in enumerate(w.layers)]
        self.mtp = _FastLayer(w.mtp.layer, L, dtype, model.config) if w.mtp else None
        self.head = _Weight(w.head, dtype)
        self.eh_proj = _Weight(w.mtp.eh_proj, dtype) if w.mtp else None
        self.compiled = CompiledSteps(w) if compile else None

    def _versions(self):
        """Of the parameters and of the experts' biases (buffers, moved by the balancing update; folded as fp32
        copies when the model is not fp32)."""
        return [t._version for t in (*self.model.parameters(),
                                     *(m.gate.e_score_correction_bias for m in self.model.moe_layers()))]

    def stale(self) -> bool:
        return self._versions() != self.versions

    def _rope(self, positions, cache):
        """RoPE as a matrix per position: x @ R == model.apply_rope(x) (adjacent pairs rotated, output
        de-interleaved). R [B*S, dr, dr]; and the additive attention mask [B, S, 1, T] from the cache's."""
        cos, sin = self.model.rope(positions)  # [B, 1, S, dr/2]
        cos, sin = cos.reshape(-1, cos.shape[-1]).float(), sin.reshape(-1, sin.shape[-1]).float()
        N, half = cos.shape
        j = torch.arange(half, device=cos.device)
        R = cos.new_zeros(N, 2 * half, 2 * half)
        R[:, 2 * j, j], R[:, 2 * j + 1, j] = cos, -sin
        R[:, 2 * j + 1, half + j], R[:, 2 * j, half + j] = cos, sin
        bias = torch.zeros(cache.mask.shape, device=cos.device).masked_fill_(~cache.mask, float("-inf"))
        return R, bias.transpose(1, 2)

    def hidden(self, ids, positions, cache):
        rot, bias = self._rope(positions, cache)
        h = self.w.embed[ids].float()  # the residual stream is float32 whatever the model's dtype
        for layer in self.layers:
            h = layer(h, rot, bias, cache)
        return _norm(h, self.w.norm, self.w.eps)

    def mtp_hidden(self, h_prev, next_ids, positions, cache):
        rot, bias = self._rope(positions, cache)
        m = self.w.mtp
        emb = _norm(self.w.embed[next_ids].float(), m.enorm, m.eps)
        x = self.eh_proj(torch.cat((emb, _norm(h_prev.float(), m.hnorm, m.eps)), -1))
        return self.mtp(x, rot, bias, cache)

    def logits(self, h):
        return self.head(h).float()

    def mtp_logits(self, h):
        return self.head(_norm(h, self.w.mtp.norm, self.w.mtp.eps)).float()

    def prefill(self, ids, positions, cache):
        """Prompts' final hidden states: through the compiled step up to COMPILED_PREFILL_TOKENS, else eagerly."""
        if self.compiled is not None and ids.numel() <= COMPILED_PREFILL_TOKENS:
            return self.decode(ids, positions, cache)[0]
        return self.hidden(ids, positions, cache)

    def decode(self, ids, positions, cache):
        return self._compiled("main", ids, cache) or super().decode(ids, positions, cache)

    def decode_sampled(self, ids, cache, temps, ks, top, u):
        return self._compiled("main_sampled", ids, cache, temps, ks, top, u)

    def mtp_decode(self, h_prev, next_ids, positions, cache):
        return self._compiled("mtp", h_prev, next_ids, cache) or super().mtp_decode(h_prev, next_ids, positions, cache)

    def speculate(self, h_prev, mtp_ids, last, ids, mtp_cache, cache):
        return (self._compiled("speculate", h_prev, mtp_ids, last, ids, mtp_cache, cache)
                or super().speculate(h_prev, mtp_ids, last, ids, mtp_cache, cache))

    def _compiled(self, step: str, *args):
        """The compiled step's outputs (a tuple), or None without compile or when it fails (then it says why once
        and decodes eagerly from now on)."""
        if self.compiled is not None:
            try:
                return getattr(self.compiled, step)(*args)
            except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler here
                self._without_compile(e)
        return None

    def _without_compile(self, error: Exception) -> None:
        """torch.compile failed (a graph writes the cache only for the positions the eager step rewrites): decode
        eagerly from now on."""
        print(f"nanoseek: torch.compile failed ({first_line(error)}); decoding without it", file=sys.stderr)
        self.compiled = None


@dataclass
class _Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[Top] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None = None
    outbox: deque[Event] | None = None  # stream()'s: this request's events, whoever ran the step
    error: str | None = None  # what ended it in a step that failed
    raised: BaseException | None = None  # what its stop_check raised (it ended with finish_reason "error")
    # speculative decoding: (hidden state at i, token i+1) pairs the MTP module has not seen yet
    mtp_h: torch.Tensor | None = None
    mtp_ids: list[int] = field(default_factory=list)

    @property
    def last(self) -> int:
        """The newest token: sampled, not yet fed to the model."""
        return self.tokens[-1]


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] (fp32) -> the sampling distribution after temperature, top-k and top-p."""
    # the best at 0, and a temperature below float32's range divides as the smallest float32 (as 0, it made every
    # probability NaN): no inf - inf or 0 / 0, the distribution is then greedy's
    logits = (logits - logits.max()) / max(p.temperature, torch.finfo(logits.dtype).tiny)
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if p.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # drop a token when the more likely ones already reach top_p (the most likely is always kept)
        drop = sorted_p.cumsum(-1) - sorted_p >= p.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum()
    return probs


def penalize(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """logits [V] (fp32) for the token after prompt + output -> with p's presence, frequency and repetition
    penalties applied (a new tensor)."""
    V = logits.shape[-1]
    logits = logits.clone()
    if p.repetition_penalty != 1:  # (first, as vLLM)
        seen = torch.tensor(sorted({*prompt, *output}), dtype=torch.long, device=logits.device)
        x = logits[seen]
        big = torch.finfo(logits.dtype).max  # a tiny penalty must not make a logit inf (then inf - inf is NaN)
        logits[seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty).clamp(-big, big)
    if p.presence_penalty or p.frequency_penalty:
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=V).to(logits)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits)
    return logits


def draw(probs: torch.Tensor, generators: list[torch.Generator], u: list[float] | None = None) -> torch.Tensor:
    """One token per row of probs [B, V], row b drawn with generators[b] (a seeded request draws the same random
    numbers whatever else is in the batch), or with u[b] already drawn from it: inverse CDF with one uniform number
    per row, batched (one torch.multinomial per row costs ~75 us at V=4096, which at batch 32 was a fifth of a
    decode step). decode.sample does the same inside the compiled graphs."""
    u = torch.stack([torch.rand((), generator=g) for g in generators]) if u is None else torch.tensor(u)
    u = u.to(probs.device)
    cdf = probs.float().cumsum(-1)
    # the first token whose cumulative probability exceeds u * total: zero-probability tokens are never drawn
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


def _top(logp: torch.Tensor, k: int) -> list[Top]:
    """logp [N, V] -> per row its k most likely (token, log-prob), most likely first (all V if k > V)."""
    values, ids = logp.topk(min(k, logp.shape[-1]), -1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


class Engine:
    """Batched, continuous generation over a fixed-slot KV cache.

    max_batch sequences run at once (more requests wait in a queue); max_len bounds prompt + generated
    tokens of one sequence (default: the model's max_position_embeddings). cache_dtype defaults to the
    model's dtype (torch.bfloat16 halves the cache). impl: "fast", "absorbed" or "naive" (see the module
    docstring; an MHA model always runs its own forward). dtype: the fast forward's matmul weights,
    torch.float32 (exact) or torch.bfloat16 (see _Weight). speculative: draft one token per step
    with the first MTP module and verify it with the main model in the same forward as the next token.
    max_prefill_tokens bounds one prefill (requests beyond it start at the next steps; a longer prompt alone
    still runs). compile: decode steps through torch.compile (decode.py; the "fast" impl of an MLA model only;
    each of its few graphs compiles on first use).
    """

    def __init__(self, model: NanoSeek, max_batch: int = 8, max_len: int | None = None, cache_dtype=None,
                 impl: str = "fast", speculative: bool = False, dtype: torch.dtype = torch.float32,
                 max_prefill_tokens: int = 4096, compile: bool = False):
        cfg = model.config
        if impl not in IMPLS:
            raise UserError(f"unknown engine impl {impl!r}; choose one of {', '.join(IMPLS)}")
        if speculative and not len(model.mtp):
            raise UserError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
        self.max_len = max_len or cfg.max_position_embeddings
        if not 1 < self.max_len <= cfg.max_position_embeddings:
            raise UserError(f"max_len={self.max_len} must be in 2..{cfg.max_position_embeddings} "
                            "(the model's max_position_embeddings)")
        if max_batch < 1:
            raise UserError(f"max_batch={max_batch} must be >= 1")
        if dtype not in (torch.float32, torch.bfloat16):
            raise UserError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
        if compile and (impl != "fast" or cfg.attention_type != "mla"):
            raise UserError('compile needs impl="fast" and an MLA model')
        self.model, self.impl, self.speculative, self.dtype, self.compile = model, impl, speculative, dtype, compile
        self.max_prefill_tokens = max_prefill_tokens
        device = model.lm_head.weight.device
        dtype = cache_dtype or model.lm_head.weight.dtype
        L = cfg.num_hidden_layers
        self.cache = KVCache(cfg, range(L), max_batch, self.max_len, dtype, device)
        # the MTP module's attention layer has its own cache; it runs one position behind the main model
        self.mtp_cache = KVCache(cfg, range(L, L + 1), max_batch, self.max_len, dtype, device) if speculative \
            else None
        self.forward = self._make_forward()
        self.waiting: list[_Sequence] = []
        self.running: list[_Sequence] = []
        self.sequences: dict[int, _Sequence] = {}
        self._ids = itertools.count()
        self._sampling_for: tuple = (None, None)  # (sequence ids, _sampling's tensors for them)
        self.stats = {"drafted": 0, "accepted": 0}

    def _make_forward(self):
        if self.impl == "fast" and self.model.config.attention_type == "mla":
            return FastForward(self.model, self.dtype, self.compile)
        return _ModelForward(self.model, absorb=self.impl != "naive")

    def warm_up(self, params: SamplingParams | None = None) -> None:
        """Prefill and decode a few tokens alone and in a batch, so that torch.compile builds its graphs now rather
        than during the first requests (a no-op cost without compile: a few milliseconds). The main model's graphs
        are for 1 token, 2 (see decode.gemm_from) and any other count: prompts of 1, 2 and 3 tokens alone prefill
        through them, so that one sequence at a time (a chat) meets no new graph either, and batches of 2 and 3
        decode through them. params: the sampling the requests will use (default: greedy and sampled): sampled
        decoding steps have graphs of their own (the tokens are drawn in them, decode.sample), and a speculative
        engine's greedy steps are one graph, its sampled or penalized steps draft through the MTP module's own
        graphs."""
        kinds = [params] if params is not None else [SamplingParams(temperature=0), SamplingParams()]
        kinds = [dataclasses.replace(p, max_new_tokens=4, stop_token_ids=(), stop_check=None, seed=0) for p in kinds]
        for n, length in ((1, 1), (1, 2), (1, 3), (2, 2), (3, 2)):
            if n <= self.cache.max_batch:
                for p in kinds:
                    self.generate([list(range(length))[: self.max_len - 1]] * n, p)  # (room for a token)
        self.stats = {"drafted": 0, "accepted": 0}

    # -- requests
    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a prompt (token ids); it joins the running batch at the next step() with a free slot."""
        params = params or SamplingParams()
        prompt = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)  # (a torch or numpy vector too)
        V = self.model.config.vocab_size
        if not prompt:
            raise UserError("empty prompt: give at least one token")
        if not all(isinstance(t, int) and 0 <= t < V for t in prompt):
            raise UserError(f"a prompt is a flat sequence of token ids, integers in 0..{V - 1} (the model's "
                            "vocabulary)")
        if len(prompt) >= self.max_len:
            raise UserError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} "
                            f"(prompt + generated tokens); shorten it")
        gen = torch.Generator()
        if params.seed is None:
            gen.seed()  # fresh entropy, without touching the global RNG
        else:
            gen.manual_seed(params.seed)
        seq = _Sequence(next(self._ids), prompt, params, gen)
        self.waiting.append(seq)
        self.sequences[seq.id] = seq
        return seq.id

    def abort(self, request_id: int) -> None:
        """Drop a request (e.g. its client went away); its slot is freed at once."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq: _Sequence) -> None:
        """Take seq out of the running batch and free its slot; safe to call again, or for a sequence that an
        interrupted step took from `waiting` but did not finish admitting."""
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            self.cache.free(seq.slot)
            if self.mtp_cache is not None:
                self.mtp_cache.free(seq.slot)
            seq.slot = -1
        seq.mtp_h = None

    # -- the step loop
    def step(self) -> list[Event]:
        """Admit waiting requests into free slots (one batched prefill, which yields their first token),
        then decode one token (speculative: one or two) for every sequence that was already running.

        A stop_check callback that raises ends its own request: its last event has finish_reason "error" and the
        exception (Event.error), which generate() and stream() raise for that request; the other sequences go on
        as if nothing happened. Any other exception (out of memory, an interrupt) may leave the step's sequences
        with caches half written: they end (finish_reason "error", slots freed) and the exception propagates; the
        engine serves later requests."""
        events = []
        decoding, admitted = list(self.running), []
        try:
            with torch.inference_mode(), _eval(self.model):
                admitted = self._admit()
                if admitted:
                    if self.forward.stale():  # the model was trained since the weights were folded: refold
                        self.forward = self._make_forward()
                    events += self._prefill(admitted)
                if decoding:
                    events += self._speculate(decoding) if self.speculative else self._decode(decoding)
        except BaseException as e:
            for seq in decoding + admitted:
                seq.finish_reason, seq.error = seq.finish_reason or "error", repr(e)  # (no traceback: no tensors held)
                self._release(seq)
                self.sequences.pop(seq.id, None)
            raise
        if self.compile and getattr(self.forward, "compiled", True) is None:  # it failed: do not retry at refolds
            self.compile = False
        for ev in events:
            seq = self.sequences.get(ev.request_id)
            if seq is not None and seq.outbox is not None:
                seq.outbox.append(ev)
            if ev.finish_reason is not None:
                self.sequences.pop(ev.request_id, None)
        return events

    def _admit(self) -> list[_Sequence]:
        """The waiting requests that start now: as many as there are free slots, while the right-padded prefill
        batch stays within max_prefill_tokens (its attention scores are batch x longest x heads x longest)."""
        n, longest = 0, 0
        for seq in self.waiting[: len(self.cache.free_slots)]:
            longest = max(longest, len(seq.prompt))
            if n and (n + 1) * longest > self.max_prefill_tokens:
                break
            n += 1
        admitted, self.waiting = self.waiting[:n], self.waiting[n:]
        return admitted

    def _prefill(self, seqs: list[_Sequence]) -> list[Event]:
        for seq in seqs:
            seq.slot = self.cache.allocate()
            if self.mtp_cache is not None:
                self.mtp_cache.allocate()  # both caches hand out the lowest free slot: the same one
            self.running.append(seq)
        slots, lens = [s.slot for s in seqs], [len(s.prompt) for s in seqs]
        ids = torch.zeros(len(seqs), max(lens), dtype=torch.long)  # right-padded; the mask hides the padding
        for b, s in enumerate(seqs):
            ids[b, : len(s.prompt)] = torch.tensor(s.prompt)
        ids = ids.to(self.cache.device)
        positions = self.cache.begin(slots, ids.shape[1])
        h = self.forward.prefill(ids, positions, self.cache)  # [B, S, H]
        self.cache.advance(slots, lens)
        last = torch.tensor(lens, device=h.device) - 1
        logits = self.forward.logits(h[torch.arange(len(seqs)), last])  # [B, V]: only the last position
        tokens, logprobs, tops = self._sample(logits, seqs)
        if self.speculative:
            self._mtp_prefill(seqs, h, lens, tokens)
        events = []
        for b, seq in enumerate(seqs):
            if seq.params.prompt_logprobs:
                seq.prompt_logprobs = self._score_prompt(seq, h[b, : lens[b] - 1])
            new = self._emit(seq, [tokens[b]], [logprobs[b]], [tops[b]])
            new[0].prompt_logprobs = seq.prompt_logprobs
            events += new
        return events

    def _score_prompt(self, seq: _Sequence, h: torch.Tensor) -> PromptLogprobs:
        """h [p - 1, H]: the final hidden states at the prompt's positions but its last -> how likely each next
        prompt token was (through the output head, a bounded number of positions at a time)."""
        logprobs, tops = [], []
        k = seq.params.top_logprobs
        rows = max(1, PROMPT_LOGPROBS_LOGITS // self.model.config.vocab_size)
        for start in range(0, h.shape[0], rows):
            logp = self.forward.logits(h[start: start + rows]).log_softmax(-1)
            targets = torch.tensor(seq.prompt[start + 1: start + 1 + logp.shape[0]], device=logp.device)
            logprobs += logp.gather(1, targets[:, None])[:, 0].tolist()
            tops += _top(logp, k) if k else []
        return PromptLogprobs(logprobs, tops if k else None)

    def _mtp_prefill(self, seqs: list[_Sequence], h: torch.Tensor, lens: list[int], tokens: list[int]) -> None:
        """The MTP module's cache gets the prompt's pairs (h_i, t_{i+1}), i < p-1, now, while every slot
        starts at 0; the last pair (h_{p-1}, first generated token) drafts at the next step."""
        n = [p - 1 for p in lens]
        if max(n) > 0:
            slots = [s.slot for s in seqs]
            ids = torch.zeros(len(seqs), max(n), dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, : n[b]] = torch.tensor(s.prompt[1:])
            positions = self.mtp_cache.begin(slots, max(n))
            self.forward.mtp_hidden(h[:, : max(n)], ids.to(h.device), positions, self.mtp_cache)
            self.mtp_cache.advance(slots, n)
        for b, s in enumerate(seqs):
            s.mtp_h, s.mtp_ids = h[b, lens[b] - 1: lens[b]], [tokens[b]]

    def _decode(self, seqs: list[_Sequence]) -> list[Event]:
        slots = [s.slot for s in seqs]
        ids = torch.tensor([[s.last] for s in seqs], device=self.cache.device)
        positions = self.cache.begin(slots, 1)
        u = out = None
        if self._sampled_in_graph(seqs):
            # sampled in the compiled graph when there is one (decode.sample): each row's uniform number is drawn
            # here from its own generator, and serves the eager draw as well when the graph is not there
            u = [0.0 if s.params.greedy else float(torch.rand((), generator=s.generator)) for s in seqs]
            out = self.forward.decode_sampled(ids, self.cache, *self._sampling(seqs),
                                              torch.tensor(u, device=ids.device))
        if out is None:
            _, logits, best, logp = self.forward.decode(ids, positions, self.cache)
            chosen = self._sample(logits[:, 0], seqs, (best[:, 0], logp[:, 0]), u)
        else:
            _, logits, tokens, logp = out
            chosen = tokens[:, 0].tolist(), logp[:, 0].tolist(), self._tops(logits[:, 0], seqs)
        self.cache.advance(slots, [1] * len(seqs))
        events = []
        for seq, t, lp, top in zip(seqs, *chosen):
            events += self._emit(seq, [t], [lp], [top])
        return events

    def _sampled_in_graph(self, seqs: list[_Sequence]) -> bool:
        """Whether decode.sample draws this step's tokens: some sequence samples, and none has a penalty, top-p or a
        top-k above SAMPLED_TOP_K (those steps sample eagerly)."""
        V = self.model.config.vocab_size
        return not all(s.params.greedy for s in seqs) and not any(
            s.params.penalized or s.params.top_p < 1 or SAMPLED_TOP_K < s.params.top_k < V for s in seqs)

    def _sampling(self, seqs: list[_Sequence]) -> tuple:
        """decode.sample's settings for seqs: temperatures (0: greedy) and top-k (0: off) [B], and the bound of the
        top-k (0: none); kept while the batch stays the same."""
        key = [s.id for s in seqs]
        if key != self._sampling_for[0]:
            V, device = self.model.config.vocab_size, self.cache.device
            ks = [s.params.top_k if s.params.top_k < V else 0 for s in seqs]
            self._sampling_for = key, (
                torch.tensor([0.0 if s.params.greedy else s.params.temperature for s in seqs], device=device),
                torch.tensor(ks, device=device), min(V, SAMPLED_TOP_K) if any(ks) else 0)
        return self._sampling_for[1]

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence], picked=None, u: list[float] | None = None):
        """logits [B, V] fp32 -> one token per row (argmax, or sampled with the row's own generator: a seeded
        request draws the same random numbers whatever else is in the batch; the logits themselves may differ in
        their last bits with the batch's size, which picks the kernels, so a near-tie can go either way), its
        log-prob, and the row's top_logprobs most likely tokens (None where not asked for). picked: the greedy
        choice and its log-prob [B] (decode.pick), taken as they are when every row is greedy without penalties. u:
        the rows' uniform numbers, if already drawn from their generators (0 for greedy rows)."""
        if picked is not None and all(s.params.greedy and not s.params.penalized for s in seqs):
            return picked[0].tolist(), picked[1].tolist(), self._tops(logits, seqs)
        choice = self._penalized(logits[:, None], seqs)[:, 0]
        tokens = choice.argmax(-1)
        rows = [b for b, seq in enumerate(seqs) if not seq.params.greedy]
        if rows:
            probs = torch.stack([filtered_probs(choice[b], seqs[b].params) for b in rows])
            tokens[rows] = draw(probs, [seqs[b].generator for b in rows], None if u is None else [u[b] for b in rows])
        logp = logits.log_softmax(-1)
        logprobs = logp.gather(1, tokens[:, None])[:, 0]
        return tokens.tolist(), logprobs.tolist(), self._tops(logits, seqs, logp)

    @staticmethod
    def _penalized(logits: torch.Tensor, seqs: list[_Sequence], drafts: list[int] | None = None) -> torch.Tensor:
        """logits [B, S, V]: position i of sequence b predicts the token after its output so far and the first
        i drafts -> the logits its choice is made from (the same tensor when no sequence has a penalty)."""
        rows = [b for b, s in enumerate(seqs) if s.params.penalized]
        if not rows:
            return logits
        out = logits.clone()
        for b in rows:
            s = seqs[b]
            for i in range(logits.shape[1]):
                out[b, i] = penalize(logits[b, i], s.params, s.prompt, s.tokens + ([drafts[b]] if i else []))
        return out

    @staticmethod
    def _tops(logits: torch.Tensor, seqs: list[_Sequence], logp: torch.Tensor | None = None) -> list[Top | None]:
        """logits [B, V], one row per sequence (and their log_softmax, if already computed) -> each sequence's
        top_logprobs alternatives (None: not asked)."""
        k = max(s.params.top_logprobs for s in seqs)
        if not k:
            return [None] * len(seqs)
        logp = logits.log_softmax(-1) if logp is None else logp
        return [top[: s.params.top_logprobs] if s.params.top_logprobs else None for s, top in zip(seqs, _top(logp, k))]

    def _emit(self, seq: _Sequence, tokens: list[int], logprobs: list[float], tops: list[Top | None]) -> list[Event]:
        """Append tokens one by one until the sequence finishes; a finished sequence frees its slot."""
        events = []
        p = seq.params
        for t, lp, top in zip(tokens, logprobs, tops):
            seq.tokens.append(t)
            seq.logprobs.append(lp)
            if top is not None:
                seq.top_logprobs.append(top)
            if t in p.stop_token_ids or (p.stop_check is not None and self._check(p.stop_check, seq)):
                seq.finish_reason = seq.finish_reason or "stop"
            elif len(seq.tokens) >= p.max_new_tokens or len(seq.prompt) + len(seq.tokens) >= self.max_len:
                seq.finish_reason = "length"
            events.append(Event(seq.id, t, lp, seq.finish_reason, top, error=seq.raised))
            if seq.finish_reason is not None:
                self._release(seq)
                break
        return events

    def _check(self, stop_check, seq: _Sequence) -> bool:
        try:
            return stop_check(seq.tokens)
        except Exception as e:  # noqa: BLE001 - the caller's code: end this request only
            seq.finish_reason, seq.raised = "error", e
            return True

    # -- MTP self-speculative decoding
    def _speculate(self, seqs: list[_Sequence]) -> list[Event]:
        """One step: the MTP module drafts token n+1 from (h_{n-1}, t_n); the main model runs [t_n, draft]
        in one forward, which verifies the draft and, if it holds, also gives token n+2. Greedy output is
        plain greedy decoding's (up to the last bits of the logits: a near-tie may break differently); sampled
        output keeps the model's distribution (speculative sampling: accept the draft with probability
        min(1, p/q), else sample from max(p - q, 0))."""
        B, slots = len(seqs), [s.slot for s in seqs]
        fwd, device = self.forward, self.cache.device
        # the MTP module takes the one or two (hidden, token) pairs it has not seen, padded to two (a padding
        # pair's cache entry is masked, then overwritten); the last one drafts
        n = [len(s.mtp_ids) for s in seqs]
        h_prev = torch.stack([F.pad(s.mtp_h, (0, 0, 0, 2 - k)) for s, k in zip(seqs, n)])
        mtp_ids = torch.tensor([s.mtp_ids + [0] * (2 - k) for s, k in zip(seqs, n)], device=device)
        last = torch.tensor([k - 1 for k in n], device=device)
        ids = torch.tensor([s.last for s in seqs], device=device)
        mtp_positions, positions = self.mtp_cache.begin(slots, 2), self.cache.begin(slots, 2)
        sampled = {b: s for b, s in enumerate(seqs) if not s.params.greedy}
        if sampled or any(s.params.penalized for s in seqs):
            _, q_logits = fwd.mtp_decode(h_prev, mtp_ids, mtp_positions, self.mtp_cache)
            q_logits = self._penalized(q_logits[torch.arange(B), last][:, None], seqs)[:, 0]
            drafts = q_logits.argmax(-1)
            q_probs = {b: filtered_probs(q_logits[b], s.params) for b, s in sampled.items()}
            for b, s in sampled.items():
                drafts[b] = draw(q_probs[b][None], [s.generator])[0]
            # the main model verifies: logits at [t_n, draft] predict tokens n+1 and n+2
            h, logits, best, best_lp = fwd.decode(torch.stack((ids, drafts), 1), positions, self.cache)  # [B, 2, ...]
            logp, drafts_l = logits.log_softmax(-1), drafts.tolist()
            if any(s.params.penalized for s in seqs):  # the choices come from the penalized logits
                logits = self._penalized(logits, seqs, drafts_l)
                best = logits.argmax(-1)
                best_lp = logp.gather(-1, best[..., None])[..., 0]
        else:  # all greedy: the same in one call (one compiled graph), which also picks the main model's choices
            drafts, h, logits, best, best_lp = fwd.speculate(h_prev, mtp_ids, last, ids, self.mtp_cache, self.cache)
            drafts_l = drafts.tolist()
            logp = logits.log_softmax(-1) if any(s.params.top_logprobs for s in seqs) else None
        self.mtp_cache.advance(slots, n)
        best_l, best_lp = best.tolist(), best_lp.tolist()
        # accept or reject per sequence
        events = []
        for b, s in enumerate(seqs):
            d = drafts_l[b]
            if b in sampled:
                ok, first, second = self._verify_sampled(s, d, q_probs[b], logits[b])
                new = [d, second] if ok else [first]
                lps = logp[b, torch.arange(len(new)), torch.tensor(new)].tolist()
            else:  # accepted: the draft was the main model's choice, and the next token comes with it
                ok = best_l[b][0] == d
                new, lps = best_l[b][: 1 + ok], best_lp[b][: 1 + ok]
            self.stats["drafted"] += 1
            self.stats["accepted"] += ok
            self.cache.advance([s.slot], [len(new)])  # a rejected draft's entry is stale: masked, overwritten
            s.mtp_h, s.mtp_ids = h[b, : len(new)], new
            k = s.params.top_logprobs
            events += self._emit(s, new, lps, _top(logp[b, : len(new)], k) if k else [None] * len(new))
        return events

    def _verify_sampled(self, s: _Sequence, d: int, q: torch.Tensor, logits: torch.Tensor):
        """Speculative sampling for one draft d ~ q: (accepted, replacement token, token after the draft)."""
        p0 = filtered_probs(logits[0], s.params)
        if torch.rand((), generator=s.generator) * q[d] < p0[d]:
            return True, d, int(draw(filtered_probs(logits[1], s.params)[None], [s.generator])[0])
        residual = (p0 - q).clamp(min=0)
        residual = residual / residual.sum() if residual.sum() > 0 else p0
        return False, int(draw(residual[None], [s.generator])[0]), None

    # -- conveniences on top of step()
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run prompts to completion (batched, max_batch at a time) and return them in order."""
        many = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(many) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(many)} sampling parameter sets")
        ids = []
        try:
            for p, sp in zip(prompts, many):
                ids.append(self.add_request(p, sp))
            seqs = [self.sequences[i] for i in ids]
            while any(s.finish_reason is None and s.id in self.sequences for s in seqs):  # (or aborted)
                self.step()
                for s in seqs:
                    if s.raised is not None:  # its stop_check raised: so does this call
                        raise s.raised
        except BaseException:  # a bad prompt among them, an interrupt: none of this call's requests stays queued
            for i in ids:
                self.abort(i)
            raise
        return [Completion(s.tokens, s.logprobs, s.finish_reason, s.top_logprobs if s.params.top_logprobs else None,
                           s.prompt_logprobs) for s in seqs]

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None) -> Iterator[Event]:
        """Yield the events of one request as they are generated (drives step() itself)."""
        rid = self.add_request(prompt, params)
        seq = self.sequences[rid]
        seq.outbox = deque()  # (another stream or generate() may run the step that makes our event)
        try:
            while seq.outbox or rid in self.sequences:
                if not seq.outbox:
                    self.step()
                    continue
                ev = seq.outbox.popleft()
                if ev.error is not None:  # its stop_check raised
                    raise ev.error
                yield ev
                if ev.finish_reason is not None:
                    return
            if seq.error is not None:  # another caller's step() failed and ended this request too
                raise RuntimeError(f"generation failed: {seq.error}")
        finally:
            self.abort(rid)  # the caller stopped iterating early: free the slot


class _eval:
    """Run the model in eval mode for the duration (MoE layers count expert load only in training)."""

    def __init__(self, model):
        self.model, self.was = model, model.training

    def __enter__(self):
        if self.was:
            self.model.eval()

    def __exit__(self, *exc):
        if self.was:
            self.model.train()
