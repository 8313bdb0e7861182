"""DeepSeek-V3 in one file, single-device: RMSNorm, interleaved RoPE, MLA, sigmoid-routed MoE with
auxiliary-loss-free balancing, multi-token prediction. Names and math follow transformers'
`modeling_deepseek_v3.py`, so `hf.py` can export with a key map and the logits match.

Shapes: B batch, S query length, T key length (S plus cached tokens), H hidden_size, nh heads,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, dc kv_lora_rank, E routed experts, K experts
per token, N = B*S tokens flattened.

Parallelism is applied from outside (parallel.py); nothing here touches torch.distributed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek.config import ModelConfig

EXPERT_ROWS = 32
"""Each expert's block of tokens is padded to a multiple of this many rows (see Experts.forward)."""

GROUPED_MM = hasattr(torch, "_grouped_mm") and torch.torch_version.TorchVersion(torch.__version__) >= "2.10"
"""All experts in one grouped matmul (torch._grouped_mm: on every device and dtype since torch 2.10);
otherwise one matmul per expert (Experts.forward)."""


@torch.library.custom_op("nanoseek::linear_fp32", mutates_args=())
def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T in float32 also under autocast (the router's precision, as in DeepSeek-V3).
    An op of its own, not an autocast-disabled block in the forward: torch.compile cannot cache a compiled backward
    whose graph holds such a block (AOTAutograd: "Unsupported call_function target _enter_autocast"), so every run
    compiled the training step's backward again (cpu preset, first compiled step with warm caches: 14.4 -> 5.0 s).
    Inside the op the block is out of the traced graph."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


@linear_fp32.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


def _linear_fp32_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    g = grad.reshape(-1, grad.shape[-1])
    return (linear_fp32(grad, weight.t()).to(x.dtype) if ctx.needs_input_grad[0] else None,
            linear_fp32(g.t(), x.reshape(-1, x.shape[-1]).t()).to(weight.dtype) if ctx.needs_input_grad[1] else None)


linear_fp32.register_autograd(_linear_fp32_backward,
                              setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back to the input dtype, then scale (transformers' order of operations)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_tables(dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_len, dim/2] (fp32): pair j of each vector turns at theta^(-2j/dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) by angle j (DeepSeek's complex RoPE, llama.cpp's "norm" type).

    x: [..., S, dr]; cos/sin broadcastable to [..., S, dr/2]. The output is de-interleaved
    (first the rotated even elements, then the odd ones), as in transformers: q and k get the same
    permutation, so q.k is unchanged.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attention(q, k, v, mask, scale):
    """softmax(q k^T * scale + mask) v; mask None means causal. q/k [B, h, S|T, dqk], v [B, h, T, dv]."""
    S, T = q.shape[-2], k.shape[-2]
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and S * T <= 1 << 20:
        # Measured on this CPU: two bf16 matmuls around a softmax are ~3x faster, forward+backward, than
        # PyTorch's fused flash kernel in bf16; the S x T scores are small at training lengths.
        scores = (q * scale) @ k.transpose(-1, -2)
        if mask is None:
            mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    # The fused kernel needs equal q/k and v head dims, else SDPA takes an unfused path ~1.6x slower;
    # zero-padding the smaller side changes neither the scores nor the output.
    dq, dv = q.shape[-1], v.shape[-1]
    if dv < dq:
        v = F.pad(v, (0, dq - dv))
    elif dq < dv:
        q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return out[..., :dv]


class MLA(nn.Module):
    """Multi-head latent attention.

    Keys and values of all heads are decompressed from one latent c_kv (dc wide, normalised) plus one
    RoPE key shared by all heads (dr wide); a cache holds only those dc+dr numbers per token.
    Two equivalent forms:
      naive    - expand K and V per head with kv_b_proj, then attention (training: full sequences);
      absorbed - fold W_UK into the query and W_UV into the output and attend over the latent directly,
                 MQA-style (decoding: never materialises per-head K/V of the cached tokens).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.dn, self.dr, self.dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                              cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.dc = cfg.kv_lora_rank
        self.scale = cfg.qk_head_dim ** -0.5
        H = cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, self.nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps fixed at 1e-6, as in transformers
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, self.dc + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.dc)
        # rows are head-major: for each head its dn key rows, then its dv value rows
        self.kv_b_proj = nn.Linear(self.dc, self.nh * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.nh * self.dv, H, bias=False)

    def forward(self, x, cos, sin, cache=None, layer_idx: int = 0, absorb: bool = False):
        B, S, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.nh, self.dn + self.dr).transpose(1, 2)  # [B, nh, S, dn+dr]
        q_nope, q_rot = q.split([self.dn, self.dr], dim=-1)
        q_rot = apply_rope(q_rot, cos, sin)
        c_kv, k_rot = self.kv_a_proj_with_mqa(x).split([self.dc, self.dr], dim=-1)
        latent = torch.cat((self.kv_a_layernorm(c_kv), apply_rope(k_rot, cos[:, 0], sin[:, 0])), -1)  # [B,S,dc+dr]
        mask = None
        if cache is not None:
            latent, mask = cache.update(layer_idx, latent)  # [B, T, dc+dr], bool [B, 1, S, T]
        if absorb:
            out = self._attend_absorbed(q_nope, q_rot, latent, mask)
        else:
            out = self._attend_naive(q_nope, q_rot, latent, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.nh * self.dv))

    def _attend_naive(self, q_nope, q_rot, latent, mask):
        B, T, _ = latent.shape
        c_kv, k_rot = latent.split([self.dc, self.dr], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, T, self.nh, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # [B, nh, T, dn], [B, nh, T, dv]
        k = torch.cat((k_nope, k_rot[:, None].expand(B, self.nh, T, self.dr).to(k_nope.dtype)), -1)
        q = torch.cat((q_nope, q_rot.to(q_nope.dtype)), -1)
        return attention(q, k, v.to(q.dtype), mask, self.scale)

    def _attend_absorbed(self, q_nope, q_rot, latent, mask):
        B, T, _ = latent.shape
        w = self.kv_b_proj.weight.view(self.nh, self.dn + self.dv, self.dc)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]  # [nh, dn, dc], [nh, dv, dc]
        q_lat = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)  # W_UK folded into the query
        q = torch.cat((q_lat, q_rot.to(q_lat.dtype)), -1)  # [B, nh, S, dc+dr]
        k = latent[:, None].expand(B, self.nh, T, self.dc + self.dr).to(q.dtype)
        v = k[..., : self.dc]  # the normalised latent is the value, before W_UV
        o_lat = attention(q, k, v, mask, self.scale)
        return torch.einsum("bhsc,hdc->bhsd", o_lat, w_uv)  # W_UV folded into the output


class MHA(nn.Module):
    """Standard multi-head attention with (partial) RoPE: the dense baseline's attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.dn, self.dr, self.dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                              cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.scale = cfg.qk_head_dim ** -0.5
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, self.nh * cfg.qk_head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.nh * cfg.qk_head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.nh * self.dv, bias=False)
        self.o_proj = nn.Linear(self.nh * self.dv, H, bias=False)

    def _heads(self, t, cos, sin):  # [B, S, nh*(dn+dr)] -> [B, S, nh, dn+dr] with RoPE on the last dr
        B, S, _ = t.shape
        t = t.view(B, S, self.nh, self.dn + self.dr)
        nope, rot = t.split([self.dn, self.dr], dim=-1)
        rot = apply_rope(rot.transpose(1, 2), cos, sin).transpose(1, 2)
        return torch.cat((nope, rot.to(nope.dtype)), -1)

    def forward(self, x, cos, sin, cache=None, layer_idx: int = 0, absorb: bool = False):
        B, S, _ = x.shape
        q = self._heads(self.q_proj(x), cos, sin)
        k = self._heads(self.k_proj(x), cos, sin)
        v = self.v_proj(x).view(B, S, self.nh, self.dv)
        mask = None
        if cache is not None:
            k, v, mask = cache.update(layer_idx, k, v)
        out = attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype), mask,
                        self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.nh * self.dv))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores in fp32; e_score_correction_bias steers the choice of experts but not their weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # not trained by gradient: nudged by update_bias() towards balanced load; always fp32
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor):
        """x [N, H] -> weights [N, K] fp32, expert ids [N, K], scores [N, E] fp32."""
        return route(x, self.weight, self.e_score_correction_bias, self.cfg)


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.topk(k, dim=-1, sorted=False).indices


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig, linear=linear_fp32,
          top=topk_indices):
    """The router's math: sigmoid scores in fp32, the bias added for the choice only, group-limited top-k,
    normalised and scaled weights. `linear` gives fp32 scores (linear_fp32: also under autocast); the engine, which
    never autocasts, passes F.linear, and its compiled decode steps (decode.py) trace it with their own `linear` and
    `top` (indices [..., k] of the k largest entries along the last dimension), which inductor fuses."""
    N = x.shape[0]
    scores = linear(x.float(), weight.float()).sigmoid()
    choice = scores + bias.float()
    if cfg.n_group > 1:  # keep the topk_group groups whose two best experts score highest
        groups = choice.view(N, cfg.n_group, -1)
        group_score = groups.gather(-1, top(groups, 2)).sum(-1)  # [N, n_group]
        kept = top(group_score, cfg.topk_group)[..., None] == torch.arange(cfg.n_group, device=x.device)
        choice = groups.masked_fill(~kept.any(-2)[..., None], float("-inf")).view(N, -1)
    idx = top(choice, cfg.num_experts_per_tok)
    weights = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx, scores


class Experts(nn.Module):
    """E SwiGLU experts stored stacked (transformers 5's in-memory layout; hf.py exports them per expert).

    gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].
    """

    def __init__(self, n: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inter))

    @staticmethod
    def gated(x, gate_up, ends=None):
        """silu(x gate^T) * (x up^T): the SwiGLU before its down projection. With `ends`, gate_up is [E, 2I, H] and
        x's rows up to ends[e] belong to expert e."""
        gate, up = (F.linear(x, gate_up) if ends is None else _grouped_linear(x, gate_up, ends)).chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sort-based dispatch: the N*K (token, expert) pairs are sorted by expert, so that every expert's tokens
        form one contiguous block and all experts run as one grouped matmul; no loop over tokens, no expert sees a
        token it was not chosen for. x [N, H] (already in the matmul dtype), idx/weights [N, K] -> [N, H] in x's
        dtype.

        Each expert's block is padded to a multiple of EXPERT_ROWS rows, and the last one up to a fixed total of
        N*K + E*(EXPERT_ROWS-1) rows. On CPU, bf16 matmuls run in oneDNN, which builds (JIT-compiles) a kernel for
        every new shape, ~0.5 ms each; the number of tokens per expert changes at every training step, so
        unpadded nearly every expert matmul paid that (measured: fixed vs varying block sizes, forward+backward of
        the cpu preset's 16 experts on 8192 rows in bf16, 12 vs 25 ms). Padded, a few dozen shapes recur and stay
        in oneDNN's cache. The fixed total keeps every shape independent of the routing, so `torch.compile`
        traces the whole layer once, without a graph break (a compiled training step of the cpu preset: 12.7k ->
        14.2k tokens/s). A padding row repeats token 0 with routing weight 0, so it adds nothing to the output or
        to any gradient.

        The routing weight scales each row between the two matmuls (I wide, not H) and the K rows of a token
        are summed by one index_add in the matmul dtype: no fp32 copy of the [N*K, H] outputs (measured on
        the cpu preset, forward+backward of an MoE layer on 4096 tokens in bf16: 43.9 -> 39.7 ms)."""
        N, K = idx.shape
        E = self.gate_up_proj.shape[0]
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # [N*K] pair ids grouped by expert
        counts = expert_counts(flat, E)
        padded = (counts + EXPERT_ROWS - 1) // EXPERT_ROWS * EXPERT_ROWS
        ends = padded.cumsum(0)
        # row of each sorted pair in the padded blocks: its rank within its expert + that expert's first row
        row = torch.arange(N * K, device=x.device) + (ends - padded - counts.cumsum(0) + counts)[
            flat.index_select(0, order)]
        rows = N * K + E * (EXPERT_ROWS - 1)  # >= ends[-1]; the last expert's block takes the rest
        ends = torch.cat((ends[:-1], ends.new_full((1,), rows)))
        token = torch.zeros(rows, dtype=order.dtype, device=x.device).index_copy(0, row, order // K)
        w = weights.new_zeros(rows).index_copy(0, row, weights.reshape(-1).index_select(0, order)).to(x.dtype)
        # index_select/index_add, not indexing: their backwards are an index_add and an index_select, ~10x
        # faster on CPU than indexing's accumulating index_put (measured: 0.27 vs 3.0 ms for 8192 rows of 256)
        xs = x.index_select(0, token)
        h = self.gated(xs, self.gate_up_proj.to(x.dtype), ends) * w[:, None]
        y = _grouped_linear(h, self.down_proj.to(x.dtype), ends)
        return torch.zeros(N, x.shape[1], dtype=y.dtype, device=x.device).index_add_(0, token, y)

    def forward_reference(self, x, idx, weights):
        """Slow reference: for every expert, mask the tokens that chose it."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.gate_up_proj.shape[0]):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if len(tok):
                y = F.linear(self.gated(x[tok], self.gate_up_proj[e]), self.down_proj[e])
                out[tok] += y.float() * weights[tok, slot, None]
        return out


def expert_counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    """How many times each of n experts occurs in idx (bincount, with a shape torch.compile can trace: bincount's
    output size depends on the data, which splits the compiled graph at every MoE layer)."""
    return torch.zeros(n, dtype=torch.long, device=idx.device).index_add_(0, idx, torch.ones_like(idx))


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [R, in] in blocks, w [E, out, in], ends [E] the end row of each block (the last is R) -> [R, out]:
    block e times w[e]^T."""
    if GROUPED_MM:
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=ends.to(torch.int32))
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    # unbind, not w[e]: its backward writes the weight gradient once instead of E zero-filled copies
    return torch.cat([F.linear(xe, we) for xe, we in zip(x.split(sizes), w.unbind(0))])


class MoE(nn.Module):
    """Shared experts (always on) + K of E routed experts per token, with load statistics for balancing."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        # tokens routed to each expert since the last bias update (training forwards only)
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        xf = x.reshape(-1, H)
        weights, idx, scores = self.gate(xf)  # fp32 scores from the fp32 input
        if torch.is_autocast_enabled(x.device.type):  # one cast for the routed and the shared experts
            xf = xf.to(torch.get_autocast_dtype(x.device.type))
        if self.training:
            self.load += expert_counts(idx.reshape(-1), self.load.numel()).to(self.load.dtype)
            self.aux_loss = self._sequence_aux_loss(idx, scores, B, S) if self.cfg.aux_loss_alpha > 0 else None
        y = self.experts(xf, idx, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        return y.view(B, S, H).to(x.dtype)

    def _sequence_aux_loss(self, idx, scores, B, S):
        """DeepSeek-V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over sequences."""
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        chosen = torch.zeros(B * S, E, device=idx.device).scatter_(1, idx, 1.0).view(B, S, E)
        f = chosen.sum(1) * (E / (K * S))  # [B, E]
        p = (scores / scores.sum(-1, keepdim=True)).view(B, S, E).mean(1)  # [B, E]
        return self.cfg.aux_loss_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, gamma: float) -> None:
        """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i), then reset the counts."""
        if self.load.sum() > 0:
            self.gate.e_score_correction_bias += gamma * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.attention_type == "mla" else MHA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, cache=None, absorb=False):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, self.layer_idx, absorb)
        return h + self.mlp(self.post_attention_layernorm(h))


class MTPModule(nn.Module):
    """Multi-token prediction module k (DeepSeek-V3 eq. 21-23): combines the previous depth's hidden
    state at position i with the embedding of token i+k, runs one decoder layer, and predicts token
    i+k+1 through the shared output head. Exported as layer num_hidden_layers + k - 1."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)  # columns: [normed embedding ; normed hidden]
        self.block = DecoderLayer(cfg, layer_idx)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)  # shared_head.norm in DeepSeek's checkpoints

    def forward(self, h_prev, emb, cos, sin, cache=None, absorb=False):
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))
        return self.block(x, cos, sin, cache, absorb)


class DecoderModel(nn.Module):
    """transformers' DeepseekV3Model: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class LossOutput:
    loss: torch.Tensor
    """What to backpropagate: lm_loss + mtp_loss_weight * mtp_loss + aux_loss."""
    lm_loss: torch.Tensor
    """Next-token cross-entropy (nats per token) of the main model."""
    mtp_loss: torch.Tensor | None
    """Mean over MTP depths of their cross-entropy, unweighted."""
    aux_loss: torch.Tensor | None
    """Sum over MoE layers of the sequence-wise balance loss (already times alpha)."""


class NanoSeek(nn.Module):
    """The causal LM: `model(ids)` -> logits [B, S, V]; `model(ids, targets)` -> LossOutput.

    targets are the next tokens (targets[:, i] = ids[:, i+1]); -1 marks positions without loss.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        cos, sin = rope_tables(cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.initializer_range
        # residual-branch outputs are scaled down by depth (GPT-2) so the stream starts near unit scale
        out_std = std / math.sqrt(2 * (self.config.num_hidden_layers + len(self.mtp)))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)
        for m in self.moe_layers():
            m.gate.e_score_correction_bias.zero_()
            m.load.zero_()

    # -- pieces the engine composes
    def rope(self, positions: torch.Tensor | None, length: int = 0):
        """positions [B, S] -> cos, sin [B, 1, S, dr/2] (broadcast over heads). None means positions 0..length-1
        (-> [1, 1, length, dr/2]), checked without reading a tensor: a compiled training step has no graph break."""
        last = length - 1 if positions is None else int(positions.max())
        if last >= self.rope_cos.shape[0]:
            raise ValueError(f"position {last} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if positions is None:
            return self.rope_cos[None, None, :length], self.rope_sin[None, None, :length]
        return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]

    def hidden(self, input_ids, positions=None, cache=None, absorb=False):
        """Final-normed hidden states [B, S, H] of the main model."""
        cos, sin = self.rope(positions, input_ids.shape[1])
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin, cache, absorb)
        return self.model.norm(h)

    def mtp_hidden(self, k, h_prev, next_ids, positions, cache=None, absorb=False):
        """MTP module k: h_prev [B, S, H] at positions i (None: 0..S-1), next_ids [B, S] the tokens i+k+1 -> [B, S, H]
        (pre-norm; logits = lm_head(mtp[k].norm(h)))."""
        cos, sin = self.rope(positions, next_ids.shape[1])
        return self.mtp[k](h_prev, self.model.embed_tokens(next_ids), cos, sin, cache, absorb)

    def forward(self, input_ids, targets=None, *, positions=None, cache=None, absorb=False):
        if targets is not None:  # the auxiliary losses of this forward only (an MTP module may not run: S <= depth)
            for m in self.moe_layers():
                m.aux_loss = None
        h = self.hidden(input_ids, positions, cache, absorb)
        if targets is None:
            return self.lm_head(h)
        lm_loss = self._ce(self.lm_head(h), targets)
        mtp_loss = None
        if len(self.mtp) and self.config.mtp_loss_weight > 0:
            B, S = input_ids.shape
            losses, h_prev = [], h
            for k in range(len(self.mtp)):
                d = k + 1  # depth: module k sees token i+d and predicts token i+d+1
                if S - d <= 0:
                    break
                h_prev = self.mtp_hidden(k, h_prev[:, : S - d], input_ids[:, d:], None)
                losses.append(self._ce(self.lm_head(self.mtp[k].norm(h_prev)), targets[:, d:]))
            mtp_loss = torch.stack(losses).mean() if losses else None
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        aux_loss = torch.stack(aux).sum() if aux and self.training else None
        loss = lm_loss
        if mtp_loss is not None:
            loss = loss + self.config.mtp_loss_weight * mtp_loss
        if aux_loss is not None:
            loss = loss + aux_loss
        return LossOutput(loss, lm_loss, mtp_loss, aux_loss)

    @staticmethod
    def _ce(logits, targets):
        """Mean next-token cross-entropy over targets != -1. bf16 logits stay bf16 (the softmax accumulates in
        fp32 inside; a per-token loss rounded to bf16 is plenty for a gradient, and it halves the cost of the
        largest elementwise op of a small model); the mean is taken in fp32."""
        t = targets.reshape(-1)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t, ignore_index=-1, reduction="none")
        return nll.float().sum() / (t != -1).sum().clamp(min=1)

    # -- load balancing, called by the trainer after each optimizer step
    def moe_layers(self) -> list[MoE]:
        """The MoE blocks of the main layers, then of the MTP modules."""
        return [moe for _, moe in self.named_moe_layers()]

    def named_moe_layers(self) -> list[tuple[str, MoE]]:
        """(name, MoE block) of the main layers, named by layer index, then of the MTP modules, "mtp<k>". (From the
        layer lists, not self.modules(): torch.compile breaks the graph at a walk over modules that the forward has
        changed, here at the loss.)"""
        blocks = [*((str(i), layer) for i, layer in enumerate(self.model.layers)),
                  *((f"mtp{k}", m.block) for k, m in enumerate(self.mtp))]
        return [(name, block.mlp) for name, block in blocks if isinstance(block.mlp, MoE)]

    def update_expert_bias(self, gamma: float | None = None) -> dict:
        """Apply the aux-loss-free bias update to every MoE layer; returns load stats (max/mean per layer)
        of the tokens routed since the previous call. With DDP, all-reduce the `load` buffers first."""
        gamma = self.config.bias_update_speed if gamma is None else gamma
        stats = {}
        for name, m in self.named_moe_layers():
            if m.load.sum() > 0:
                stats[f"load_max_over_mean/{name}"] = float(m.load.max() / m.load.mean())
            m.update_bias(gamma)
        return stats

    # -- sizes
    def num_params(self, active: bool = False) -> int:
        """Parameters (tied weights once); active=True counts only K of E routed experts."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            idle = 1 - self.config.num_experts_per_tok / max(self.config.n_routed_experts, 1)
            for m in self.moe_layers():
                n -= sum(p.numel() for p in m.experts.parameters()) * idle
        return int(n)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 per active matmul weight plus
        causal attention, main model and MTP modules."""
        cfg = self.config
        matmul = self.num_params(active=True) - self.model.embed_tokens.weight.numel()
        if cfg.tie_word_embeddings:
            matmul += self.lm_head.weight.numel()
        matmul += len(self.mtp) * self.lm_head.weight.numel()  # the shared head runs once per depth
        attn_dim = cfg.qk_head_dim + cfg.v_head_dim  # QK^T and PV per head
        n_layers = cfg.num_hidden_layers + len(self.mtp)
        attention = 2 * cfg.num_attention_heads * attn_dim * (seq_len / 2) * n_layers
        return 6 * matmul + 3 * attention
