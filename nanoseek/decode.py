"""Decode steps compiled with torch.compile: `Engine(model, compile=True)`, `--compile` on the CLI.

At one or two tokens per step, decoding is bound neither by FLOPs nor by memory bandwidth but by per-operator
overhead: the engine's eager fast path (engine.FastForward) issues ~1900 ATen calls per token for the 8M benchmark
model. Compiled, a step is one graph: inductor fuses the norms, RoPE, the latent attention and the SwiGLUs'
elementwise work into a handful of C++ loops around the linears (generation end to end: 4.1 -> ~1.3 ms per token on
this 2-core CPU). For one token a linear is a fused reduction that streams its weight once, in the weight's dtype;
for more tokens a reduction reads the weight once per token, and a GEMM call (a few microseconds from the graph)
reads it once for all, so from two tokens the linears are GEMMs (the Intel Xeon with AMX, 8M benchmark model, one
compiled step of N tokens, GEMM vs reductions, float32 weights: N=1 1.01 vs 0.99 ms, 2: 1.26 vs 1.52, 4: 1.49 vs
1.98, 8: 1.79 vs 2.66). On x86 CPUs the GEMMs are oneDNN's on a packed copy of each weight (pack()): MKL's, which
F.linear calls, is 2-3x slower for few rows on AMD's CPUs (see packs()). bfloat16 weights halve the bytes a reduction
streams but make GEMMs of few rows slow (N=2: 1.74 vs 1.08 ms; 4: 1.86 vs 1.49), so with them two tokens are
reductions too; and so are two tokens on CPUs without AMX, where oneDNN's float32 GEMM of two rows is slower than the
reductions (see gemm_from()). The routed experts are fused reductions at every count, each token-expert pair reading
its expert's weights: the exact FLOPs. Two batched matmuls over all experts and all tokens (weighted by the router,
zero for the experts a token did not choose) do E/K times the FLOPs and were slower (4 tokens 1.86 vs 1.57 ms, 32
sequences 4.0 vs 3.5). Attention over the latent cache (products and sums instead of einsums) and the router (its
scores a reduction at every count: a GEMM call of E outputs costs more than it computes, ~0.15 ms per layer at 32
tokens on the AMD CPU; its top-k as argmax passes) are fused loops as well, so a one-token step is a single C++
kernel; and the graphs' wrappers do not re-check their inputs' sizes (dynamo's guards have). Against batched matmuls,
a matmul and a topk library call per layer and those checks (bench/infer.py's model, in one process, interleaved,
median of 9): batch 1 793.6 -> 888.5 tokens/s, 32 sequences 4912 -> 5652.
Where two tokens are reductions, they load each weight element once for both (see _reduce).

Shapes are static except the key length and the number of tokens: two graphs per step function and weight dtype serve
a whole session, one for a single token (torch specialises size 1) and one for any other count (bfloat16 weights, and
CPUs without AMX: a third for two); each compiles on first use or in Engine.warm_up() (~10-30 s on two cores, a few
seconds once torch's on-disk cache has it). The step functions: the main model (decoding, and prefilling short
prompts; greedy, or drawing sampled tokens in the graph: sample()), the MTP module (speculative sampling), and a
whole greedy speculative step, the MTP module's draft and the main model's verification in one graph (one sequence
or any other count). One graph call instead of two, and no eager argmax between them: on bench/infer.py's P7
checkpoint, batch 1, 1.92 -> 1.65 ms per step, 978 -> 1139 tokens/s against plain decoding's 1028. The weights
are folded once for absorbed MLA (the same folding as the eager fast path) and passed to the graphs as inputs, so
refolded weights after training reuse the compiled graphs.

Shapes: N tokens (a batch's sequences times the new tokens of each, flattened), T key length, H hidden,
E routed experts, K experts per token.
"""

from __future__ import annotations

import inspect
import platform
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.model import MoE, NanoSeek, apply_rope, route


class LayerWeights(NamedTuple):
    """One decoder layer folded for absorbed-MLA decoding. Matrices are [out, in] in the decode dtype; norm
    gains and the router stay fp32."""

    nh: int
    dc: int
    dr: int
    eps: float  # input / post-attention norms
    latent_eps: float  # c_q and c_kv norms
    norm1: torch.Tensor
    norm2: torch.Tensor
    w_in: torch.Tensor  # x -> [q (no q LoRA) or c_q ; c_kv ; k_rot]
    split: tuple[int, int, int]
    q_norm: torch.Tensor | None  # q LoRA only
    w_q: torch.Tensor | None  # q LoRA only: c_q -> q
    kv_norm: torch.Tensor
    w_o: torch.Tensor  # W_o W_UV [H, nh * dc]
    gate_up: torch.Tensor | None  # dense MLP or shared experts [2I, H] (gate rows first)
    down: torch.Tensor | None  # [H, I]
    router: torch.Tensor | None  # [E, H]
    bias: torch.Tensor | None  # [E] e_score_correction_bias
    experts_gate_up: torch.Tensor | None  # [E, 2I, H]
    experts_down: torch.Tensor | None  # [E, H, I]


def fold_layer(layer, dtype: torch.dtype) -> LayerWeights:
    """Fold a model's DecoderLayer (MLA) for decoding: per head, q_lat = W_UK^T q_nope = (W_UK^T W_q_nope) x is
    one projection straight into latent space, the softmax scale folded in (-> [dc + dr] query rows per head);
    out = o_proj(W_UV o_lat) = (W_o W_UV) o_lat; the first projections of the query and of the latent, which
    read the same x, are one matrix."""
    a = layer.self_attn
    nh, dn, dr, dv, dc = a.nh, a.dn, a.dr, a.dv, a.dc
    w = a.kv_b_proj.weight.detach().view(nh, dn + dv, dc)
    w_uk, w_uv = w[:, :dn], w[:, dn:]  # [nh, dn, dc], [nh, dv, dc]
    lora = not hasattr(a, "q_proj")
    wq = (a.q_b_proj if lora else a.q_proj).weight.detach().view(nh, dn + dr, -1)  # [nh, dn+dr, q_in]
    wq_lat = torch.einsum("hdc,hdi->hci", w_uk, wq[:, :dn])
    wq = (torch.cat((wq_lat, wq[:, dn:]), 1) * a.scale).reshape(nh * (dc + dr), -1)
    w_o = torch.einsum("ohd,hdc->ohc", a.o_proj.weight.detach().view(-1, nh, dv), w_uv).reshape(-1, nh * dc)
    kv_a = a.kv_a_proj_with_mqa.weight.detach()
    w_in = torch.cat((a.q_a_proj.weight.detach() if lora else wq, kv_a))
    mlp = layer.mlp
    moe = mlp if isinstance(mlp, MoE) else None
    dense = moe.shared_experts if moe is not None else mlp

    def mat(t):
        return t.detach().to(dtype).contiguous() if t is not None else None

    def gain(norm):
        return norm.weight.detach().float()

    return LayerWeights(
        nh=nh, dc=dc, dr=dr, eps=layer.input_layernorm.eps, latent_eps=a.kv_a_layernorm.eps,
        norm1=gain(layer.input_layernorm), norm2=gain(layer.post_attention_layernorm),
        w_in=mat(w_in), split=(w_in.shape[0] - dc - dr, dc, dr),
        q_norm=gain(a.q_a_layernorm) if lora else None, w_q=mat(wq) if lora else None,
        kv_norm=gain(a.kv_a_layernorm), w_o=mat(w_o),
        gate_up=mat(torch.cat((dense.gate_proj.weight, dense.up_proj.weight))) if dense is not None else None,
        down=mat(dense.down_proj.weight) if dense is not None else None,
        router=moe.gate.weight.detach().float() if moe else None,
        bias=moe.gate.e_score_correction_bias.detach().float() if moe else None,
        experts_gate_up=mat(moe.experts.gate_up_proj) if moe else None,
        experts_down=mat(moe.experts.down_proj) if moe else None,
    )


class MTPWeights(NamedTuple):
    enorm: torch.Tensor
    hnorm: torch.Tensor
    eps: float
    eh_proj: torch.Tensor  # [H, 2H]: [normed embedding ; normed hidden] -> H
    layer: LayerWeights
    norm: torch.Tensor  # the shared head's norm


class ModelWeights(NamedTuple):
    cfg: ModelConfig  # routing settings
    embed: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # the final norm
    eps: float
    head: torch.Tensor  # [V, H]
    mtp: MTPWeights | None


def fold_model(model: NanoSeek, dtype: torch.dtype) -> ModelWeights:
    # always inference tensors (the engine refolds inside inference mode): the graphs' guards see the same kind
    with torch.inference_mode():
        mtp = None
        if len(model.mtp):
            m = model.mtp[0]
            mtp = MTPWeights(enorm=m.enorm.weight.detach().float(), hnorm=m.hnorm.weight.detach().float(),
                             eps=m.enorm.eps, eh_proj=m.eh_proj.weight.detach().to(dtype).contiguous(),
                             layer=fold_layer(m.block, dtype), norm=m.norm.weight.detach().float())
        return ModelWeights(cfg=model.config, embed=model.model.embed_tokens.weight.detach(),
                            cos=model.rope_cos, sin=model.rope_sin,
                            layers=tuple(fold_layer(layer, dtype) for layer in model.model.layers),
                            norm=model.model.norm.weight.detach().float(), eps=model.model.norm.eps,
                            head=model.lm_head.weight.detach().to(dtype).contiguous(), mtp=mtp)


class Packed(NamedTuple):
    """A matrix [out, in] with a copy in oneDNN's blocked layout, for the GEMM calls of the compiled graphs."""

    w: torch.Tensor
    packed: torch.Tensor


def packs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the compiled graphs' GEMMs run on oneDNN's packed weights: on x86 CPUs (bfloat16: with bf16 units).
    torch.compile's own lowering of oneDNN's linear wants the weights as constants of the graph (freezing); the
    graphs take them as inputs, so that refolded weights reuse them, so the call is a custom op (packed_linear).
    Measured on the AMD EPYC (Zen 4) of this project's machines, float32, compiled chains of 12 linears 768x256 and
    the 4096x256 head: N=2 / 8 / 32 tokens, MKL's GEMM 1443 / 3016 / 3223 us, oneDNN's 581 / 869 / 1752 (MKL, which
    F.linear calls, is slow there for few rows; fused reductions 341 / 1400 / 4778)."""
    return (device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.mkldnn.is_available()
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())))


_LIB = torch.library.Library("nanoseek", "FRAGMENT")
_LIB.define("packed_linear(Tensor x, Tensor packed, SymInt out_features) -> Tensor")


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [N, in] @ the packed weight's [out, in]^T -> [N, out], in x's dtype (the weight's)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


for _key in ("CPU", "MkldnnCPU"):  # (the packed weight is an opaque oneDNN tensor: MkldnnCPU)
    _LIB.impl("packed_linear", _packed_linear, _key)


@torch.library.register_fake("nanoseek::packed_linear")
def _packed_linear_shape(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def pack(w: ModelWeights) -> ModelWeights:
    """The folded weights with every matrix the graphs may multiply as a GEMM also packed (see packs()): one more
    copy of them in memory. Unchanged where oneDNN is not used."""
    if not packs(w.head.dtype, w.head.device):
        return w

    def layer(p: LayerWeights) -> LayerWeights:
        return p._replace(**{k: pack_matrix(getattr(p, k)) for k in ("w_in", "w_q", "w_o", "gate_up", "down")})

    with torch.inference_mode():
        mtp = w.mtp._replace(eh_proj=pack_matrix(w.mtp.eh_proj), layer=layer(w.mtp.layer)) if w.mtp else None
        return w._replace(layers=tuple(layer(p) for p in w.layers), head=pack_matrix(w.head), mtp=mtp)


def pack_matrix(w: torch.Tensor | None) -> Packed | None:
    return Packed(w, torch.ops.mkldnn._reorder_linear_weight(w)) if w is not None else None


# --- the graphs (traced by torch.compile; also runnable eagerly) ------------------------------------------

def _reduce(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, in] fp32, w [out, in] -> [N, out] fp32 as a fused reduction (a loop inductor fuses with its neighbours,
    streaming the weight in its own dtype once per token). Two tokens, a size fixed in the graphs that take them (see
    gemm_from), are two reductions that inductor writes as one loop, each weight element loaded once for both: on the
    AMD EPYC, a compiled chain of 12 linears 768x256 took 181-199 us for two tokens this way against 212-263 us as
    [2, out, in] products (one token: 115 us); bench/infer.py's P7 checkpoint (one process, both variants interleaved,
    medians of 10) decoded 2 sequences at 1545 -> 2075 tokens/s and one speculatively at 984 -> 1326."""
    if type(x.shape[0]) is int and x.shape[0] == 2:
        w = w.float()
        return torch.stack(((x[0] * w).sum(-1), (x[1] * w).sum(-1)))
    return (x.unsqueeze(-2) * w.float()).sum(-1)


AMX = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
"""Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), whose oneDNN GEMMs are fast at few rows."""


def gemm_from(w: torch.Tensor) -> int:
    """The fewest tokens whose linears with weight w are GEMM calls rather than fused reductions: 2, but 3 for
    bfloat16 weights (see the module docstring) and on CPUs without AMX. Measured on the AMD EPYC (Zen 4, no AMX),
    float32, compiled chains of 12 linears 768x256 and the 4096x256 head, two tokens: reductions 341 / 469 us,
    oneDNN's GEMM 581 / 1157 us (two runs; four tokens: 907 vs 949); and bench/infer.py's P7 checkpoint, 2 sequences
    decoding together, in one process, interleaved, best / median of 6: 1475 / 964 -> 1798 / 1389 tokens/s;
    speculative decoding of one sequence (two tokens per step) 955 / 703 -> 1009 / 900."""
    return 3 if w.dtype == torch.bfloat16 or (w.device.type == "cpu" and not AMX) else 2


def _linear(x: torch.Tensor, w) -> torch.Tensor:
    """x [N, in] fp32, w [out, in] (or its Packed pair) -> [N, out] fp32. Fewer tokens than gemm_from(): a fused
    reduction; more: a GEMM call, which reads the weight once for all (see the module docstring), oneDNN's on
    packed weights."""
    plain = w.w if isinstance(w, Packed) else w
    if x.shape[0] < gemm_from(plain):
        return _reduce(x, plain)
    if isinstance(w, Packed):
        return torch.ops.nanoseek.packed_linear(x.to(plain.dtype), w.packed, plain.shape[0]).float()
    return F.linear(x.to(plain.dtype), plain).float()


def _top(x: torch.Tensor, k: int) -> torch.Tensor:
    """model.route's top-k for the graphs: indices [..., k] of the k largest entries along the last dimension,
    largest first, as k argmax passes (inductor fuses them with the router; topk is a library call)."""
    cols = torch.arange(x.shape[-1], device=x.device)
    idx = []
    for _ in range(k):
        i = x.argmax(-1, keepdim=True)
        idx.append(i)
        x = x.masked_fill(cols == i, float("-inf"))
    return torch.cat(idx, -1)


def _swiglu(x, gate_up, down):
    gate, up = _linear(x, gate_up).chunk(2, -1)
    return _linear(F.silu(gate) * up, down)


def _experts(x, weights, idx, gate_up, down):
    """Routed experts: x [N, H], weights/idx [N, K] -> [N, H]. Fused reductions at every token count: each
    token-expert pair reads its expert's weights, gathered inside the loop (the exact FLOPs, no data-dependent
    shapes)."""
    N, K = idx.shape
    flat = idx.reshape(-1)
    xk = x.repeat_interleave(K, 0)  # [N*K, H]
    gate, up = (xk.unsqueeze(-2) * gate_up[flat].float()).sum(-1).chunk(2, -1)
    y = ((F.silu(gate) * up).unsqueeze(-2) * down[flat].float()).sum(-1)  # [N*K, H]
    return (y.view(N, K, -1) * weights.unsqueeze(-1)).sum(1)


def _layer(p: LayerWeights, cfg, h, cos, sin, rows, pos, visible, cache, keep=None):
    """One decoder layer for N new tokens: token n is at position pos[n] of cache row rows[n] and sees the keys
    visible[n] [T]. Writes the tokens' latents into the cache first, so tokens of one sequence see each other.
    keep: the tokens whose outputs are wanted (the others only write their cache entries), default all."""
    N = h.shape[0]
    x = F.rms_norm(h, h.shape[-1:], p.norm1, p.eps)
    a, c_kv, k_rot = _linear(x, p.w_in).split(p.split, -1)
    if p.w_q is not None:
        a = _linear(F.rms_norm(a, a.shape[-1:], p.q_norm, p.latent_eps), p.w_q)
    q = a.view(N, p.nh, p.dc + p.dr)
    q = torch.cat((q[..., : p.dc], apply_rope(q[..., p.dc:], cos[:, None], sin[:, None])), -1)
    latent = torch.cat((F.rms_norm(c_kv, c_kv.shape[-1:], p.kv_norm, p.latent_eps), apply_rope(k_rot, cos, sin)), -1)
    cache[rows, pos] = latent.to(cache.dtype)
    if keep is not None:
        h, q, rows, visible = h[keep], q[keep], rows[keep], visible[keep]
        N = h.shape[0]
    kv = cache[rows, : visible.shape[1]].unsqueeze(1).float()  # [N, 1, T, dc + dr]
    # MQA over the latent: every head attends to the same [c_kv ; k_rot]; the value is c_kv itself. Products
    # and sums rather than einsums: fused reductions reading the cache in place (batched matmuls are library
    # calls on a gathered copy)
    scores = (q.unsqueeze(2) * kv).sum(-1).masked_fill(~visible[:, None], float("-inf"))  # [N, nh, T]
    o = (scores.softmax(-1).unsqueeze(-1) * kv[..., : p.dc]).sum(-2)  # [N, nh, dc]
    h = h + _linear(o.reshape(N, -1), p.w_o)
    x = F.rms_norm(h, h.shape[-1:], p.norm2, p.eps)
    y = _swiglu(x, p.gate_up, p.down) if p.gate_up is not None else torch.zeros_like(x)
    if p.router is not None:
        weights, idx, _ = route(x, p.router, p.bias, cfg, _reduce, _top)
        y = y + _experts(x, weights, idx, p.experts_gate_up, p.experts_down)
    return h + y


def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> the greedy choice [...] and its log-probability. Inside the graphs it fuses into one pass
    over the logits; as three eager calls after a compiled step (argmax, log_softmax, gather) it cost ~100 us per
    step on this 2-core CPU (their threads wake up): bench/infer.py's P7 checkpoint decoding one sequence, 1522 ->
    1577 and 786 -> 892 tokens/s in two runs on a noisy host (medians of 4 in one process, interleaved)."""
    best = logits.argmax(-1)
    return best, logits.log_softmax(-1).gather(-1, best.unsqueeze(-1)).squeeze(-1)


SAMPLED_TOP_K = 64
"""The largest top-k that sample() draws from in the graphs (the engine samples larger ones eagerly): one bound for
all, so that the sampled graphs do not multiply (each takes seconds to compile, and in a server blocks the engine
thread meanwhile). transformers' default is 50."""


def sample(logits: torch.Tensor, temps: torch.Tensor, ks: torch.Tensor, u: torch.Tensor,
           top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """engine.filtered_probs (without top-p) and engine.draw for the rows of logits [N, V] at once, inside the
    graphs: row n's temperature temps[n] (0: greedy, its argmax), top-k ks[n] (0: off) and uniform number u[n]
    (drawn from its own generator by the engine) -> the tokens [N] and their log-probabilities under the raw logits.
    top: a static bound on the ks (0 when none is set; else SAMPLED_TOP_K, or the vocabulary if smaller). The same
    arithmetic as the eager functions: the same tokens but for last-bit differences at a boundary of the CDF.
    Eager, these ~15 small operations after a compiled step took a third of the step; top-p needs a sort of the
    vocabulary (aten::sort took ~250 us for 4096 in a graph here), so it stays eager."""
    V = logits.shape[-1]
    x = (logits - logits.amax(-1, keepdim=True)) / temps.clamp(min=torch.finfo(logits.dtype).tiny)[:, None]
    if top:  # below the k-th largest is out
        kth = x.topk(top, -1).values.gather(1, (ks.clamp(min=1) - 1)[:, None])
        x = x.masked_fill((ks > 0)[:, None] & (x < kth), float("-inf"))
    cdf = x.softmax(-1).cumsum(-1)
    # the first token whose cumulative probability exceeds u * total (searchsorted, right=True, as a count)
    drawn = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1).clamp(max=V - 1)
    tokens = torch.where(temps > 0, drawn, logits.argmax(-1))
    return tokens, logits.log_softmax(-1).gather(1, tokens[:, None])[:, 0]


def _visible(keys, pos):
    """Which of the keys 0..T-1 (keys: that arange) each new token at position pos [N] sees: [N, T] (causal over
    its own sequence's history; the keys beyond a shorter sequence's are masked)."""
    return keys <= pos[:, None]


def _main(w: ModelWeights, ids, rows, pos, keys, caches):
    """-> final-normed hidden states [N, H], logits [N, V] (fp32), and pick(logits)."""
    cos, sin, visible = w.cos[pos], w.sin[pos], _visible(keys, pos)
    h = w.embed[ids].float()
    for p, cache in zip(w.layers, caches):
        h = _layer(p, w.cfg, h, cos, sin, rows, pos, visible, cache)
    h = F.rms_norm(h, h.shape[-1:], w.norm, w.eps)
    logits = _linear(h, w.head)
    return h, logits, *pick(logits)


def _main_sampled(w: ModelWeights, ids, temps, ks, u, rows, pos, keys, caches, top):
    """_main with sample() instead of pick(): -> hidden states [N, H], logits [N, V], tokens [N], their log-probs."""
    h, logits, _, _ = _main(w, ids, rows, pos, keys, caches)
    return h, logits, *sample(logits, temps, ks, u, top)


def _mtp_hidden(w: ModelWeights, h_prev, ids, rows, pos, keys, cache, keep=None):
    """The MTP module on pairs (h_prev[n], token ids[n]) -> its hidden states [N, H] (before its norm); with keep,
    those of the pairs keep only (all pairs write their cache entries)."""
    m = w.mtp
    cos, sin, visible = w.cos[pos], w.sin[pos], _visible(keys, pos)
    emb = F.rms_norm(w.embed[ids].float(), h_prev.shape[-1:], m.enorm, m.eps)
    x = _linear(torch.cat((emb, F.rms_norm(h_prev.float(), h_prev.shape[-1:], m.hnorm, m.eps)), -1), m.eh_proj)
    return _layer(m.layer, w.cfg, x, cos, sin, rows, pos, visible, cache, keep)


def _mtp_logits(w: ModelWeights, h):
    return _linear(F.rms_norm(h, h.shape[-1:], w.mtp.norm, w.mtp.eps), w.head)


def _mtp(w: ModelWeights, h_prev, ids, rows, pos, keys, cache):
    """-> the MTP module's hidden states [N, H] and the logits of its drafts [N, V]."""
    h = _mtp_hidden(w, h_prev, ids, rows, pos, keys, cache)
    return h, _mtp_logits(w, h)


def _speculate(w: ModelWeights, h_prev, mtp_ids, last, ids, mtp_rows, mtp_pos, rows, pos, keys, mtp_cache, caches):
    """A greedy speculative step (engine.Engine._speculate) as one graph: the MTP module takes two (hidden, token)
    pairs per sequence (h_prev [2B, H], mtp_ids [2B]) and drafts the argmax at each sequence's pair last[b]; the
    main model runs [ids[b], draft[b]]. -> the drafts [B], the main model's hidden states [2B, H], logits [2B, V]
    and pick(logits)."""
    B = ids.shape[0]
    # past their cache entries, only the drafting pairs go through the MTP layer
    keep = torch.arange(B, device=ids.device) * 2 + last
    drafts = _mtp_logits(w, _mtp_hidden(w, h_prev, mtp_ids, mtp_rows, mtp_pos, keys, mtp_cache, keep)).argmax(-1)
    return drafts, *_main(w, torch.stack((ids, drafts), 1).reshape(-1), rows, pos, keys, caches)


_GRAPHS: dict = {}  # compiled once per process: refolded weights (new tensors, same shapes) reuse the graphs


def _graph(fn, device: torch.device):
    key = (fn, device.type)
    if key not in _GRAPHS:
        # graphs per weight dtype, cache dtype and one/many tokens: more than dynamo's default limit of 8 per
        # function (named cache_size_limit before torch 2.7) in a process that runs several engines
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 32))
        # no runtime checks of the inputs' sizes in the graph's wrapper: dynamo's guards have checked them
        options = {k: False for k in ("size_asserts", "alignment_asserts", "scalar_asserts")
                   if hasattr(torch._inductor.config, k)}
        if device.type == "cpu":
            # an intermediate that several loops use is written once, not recomputed in each, when computing it reads
            # more than two tensors (inductor's default: more than four). An rms-normed input (the input, its mean
            # square, the gain) that feeds a linear is otherwise recomputed in the linear's inner loop, for every
            # output, beside the weight; in the routed experts' loops, for every token-expert pair. On the AMD EPYC, in
            # one process, interleaved: one compiled call, bench/infer.py's P7 checkpoint, batch 1, plain 541 / 561 ->
            # 510 / 519 us, speculative 1068 / 1039 -> 936 / 924 us (two runs); bench/infer.py's P5 model, 32 sequences,
            # bf16 weights, 4087 -> 5021 tokens/s (fp32 3813 -> 3941). The same tokens. (On a GPU, where a step's cost
            # is its kernel launches, more buffers would split kernels: not measured, not applied.)
            options["realize_reads_threshold"] = 2
        _GRAPHS[key] = DirectCalls(fn, torch.compile(fn, dynamic=False, fullgraph=True, options=options))
    return _GRAPHS[key]


class DirectCalls:
    """A compiled step function, called past dynamo's per-call machinery once dynamo has compiled it: each of the
    function's compiled variants (dynamo's cache entries: its graph for one token, for several, ...) is tried with
    the variant's own guards, which dynamo would check, and the first that passes runs its code (dynamo's rewrite of
    the function, which calls the compiled graph) as a plain Python call. Inputs that no variant's guards accept go
    through torch.compile, which compiles a new variant. The same idea as vLLM's dispatcher (which also skips the
    guards). On the AMD EPYC, bench/infer.py's P7 checkpoint, batch 1, engines interleaved in one process (medians
    of 8): plain decoding 1582 -> 1750 tokens/s, speculative 1573 -> 1686; in a tight loop a speculative step took
    727 -> 616 us. The guards stay: 12 us warm, but ~60 us after a one-token step and ~200 us after a 32-sequence
    one (their tensors' metadata is out of the CPU's caches by then). Dynamo's cache entries are not public API: if
    this torch does not have them, every call goes through torch.compile."""

    def __init__(self, fn, compiled):
        self.fn, self.compiled = fn, compiled
        self.names = tuple(inspect.signature(fn).parameters)
        self.variants: tuple = ()

    def __call__(self, *args):
        frame = dict(zip(self.names, args))
        for i, (check, run) in enumerate(self.variants):
            if check(frame):
                if i:  # the variant that served last is tried first next time
                    self.variants = (self.variants[i], *self.variants[:i], *self.variants[i + 1:])
                return run(*args)
        out = self.compiled(*args)
        self.variants = self._variants()
        return out

    def _variants(self) -> tuple:
        fn = self.fn
        try:
            entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__)
            return tuple((e.guard_manager.check, types.FunctionType(e.code, fn.__globals__, fn.__name__))
                         for e in entries if not e.code.co_freevars)  # (the step functions have no closures)
        except Exception:  # (private API: absent or changed in this torch)
            return ()


class CompiledSteps:
    """The engine's decode steps through torch.compile, over folded weights. `main(ids, cache)` and
    `mtp(h_prev, ids, cache)` take a KVCache after its begin() for ids [B, S]; they return hidden states
    [B, S, H] and logits [B, S, V] (fp32), main() also pick(logits) [B, S]. `speculate` is a whole greedy
    speculative step."""

    def __init__(self, weights: ModelWeights):
        # a graph of fewer tokens than gemm_from() multiplies no GEMM: it takes the weights without their packed
        # copies (with them, batch 1 measured ~5% slower in one A/B: twice the tensors for dynamo's guards to check)
        self.weights, self.packed = weights, pack(weights)

    def main(self, ids: torch.Tensor, cache):
        B, S = ids.shape
        h, logits, best, logp = self._call(_main, (ids.reshape(-1),), (cache,), B * S > 1, B * S,
                                           [b[0] for b in cache.buffers])
        return h.view(B, S, -1), logits.view(B, S, -1), best.view(B, S), logp.view(B, S)

    def main_sampled(self, ids: torch.Tensor, cache, temps, ks, top: int, u):
        """main() for ids [B, 1], its tokens drawn by sample() with the per-sequence temps, ks and u [B] and the
        top-k bound top."""
        B = ids.shape[0]
        h, logits, tokens, logp = self._call(_main_sampled, (ids.reshape(-1), temps, ks, u), (cache,), B > 1, B,
                                             [b[0] for b in cache.buffers], top)
        return h.view(B, 1, -1), logits.view(B, 1, -1), tokens.view(B, 1), logp.view(B, 1)

    def mtp(self, h_prev: torch.Tensor, ids: torch.Tensor, cache):
        B, S = ids.shape
        h, logits = self._call(_mtp, (h_prev.reshape(B * S, -1), ids.reshape(-1)), (cache,), B * S > 1, B * S,
                               cache.buffers[0][0])
        return h.view(B, S, -1), logits.view(B, S, -1)

    def speculate(self, h_prev: torch.Tensor, mtp_ids: torch.Tensor, last: torch.Tensor, ids: torch.Tensor,
                  mtp_cache, cache):
        """h_prev [B, 2, H], mtp_ids [B, 2] for mtp_cache, last [B], ids [B] for cache, both caches begun for two
        tokens per sequence -> drafts [B], hidden states [B, 2, H], logits [B, 2, V], and pick(logits) [B, 2] (see
        _speculate)."""
        B = ids.shape[0]
        drafts, h, logits, best, logp = self._call(
            _speculate, (h_prev.reshape(2 * B, -1), mtp_ids.reshape(-1), last, ids), (mtp_cache, cache), B > 1,
            2 * B, mtp_cache.buffers[0][0], [b[0] for b in cache.buffers])
        return drafts, h.view(B, 2, -1), logits.view(B, 2, -1), best.view(B, 2), logp.view(B, 2)

    @staticmethod
    def _keys(caches) -> torch.Tensor:
        """0..T-1 for the longest of the begun caches' key lengths T: the graphs compute which keys each token
        sees from it (_visible), rather than taking the caches' masks (a few tensor operations fewer per step,
        each ~10 us right after a step, whose weights have evicted the interpreter from the CPU's caches). At
        least two keys: a one-key graph would be compiled apart (size 1 is specialised); the keys beyond a
        cache's own length are masked."""
        keys = torch.arange(max(2, *(c.T for c in caches)), device=caches[0].device)
        torch._dynamo.maybe_mark_dynamic(keys, 0)
        return keys

    def _call(self, fn, inputs, caches, dynamic: bool, tokens: int, *buffers):
        """fn(weights, *inputs, *where each begun cache's new tokens are (their rows and positions), keys,
        *buffers); dynamic: one graph for every token count but 1 (every sequence count but 1 for _speculate);
        tokens: how many the main model or the MTP module takes (the packed weights go with the graphs that
        multiply GEMMs)."""
        where = [t for c in caches for t in (c.token_rows, c.positions.reshape(-1))]
        inputs = (*inputs, *where, self._keys(caches))
        if dynamic:
            for t in inputs:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        gemms = tokens >= gemm_from(self.weights.head)
        return _graph(fn, self.weights.head.device)(self.packed if gemms else self.weights, *inputs, *buffers)
