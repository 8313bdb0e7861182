"""Model configuration.

Field names and meanings follow transformers' `DeepseekV3Config`, so that export to a transformers
directory is a key map, not a translation. The few fields DeepSeek's config.json has but transformers
lacks (`scoring_func`, `topk_method`, `moe_layer_freq`) are written by `hf.py` at export time. Fields
below `# training` are nanoseek's own (loss weights, balancing speed, the dense baseline switch).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from nanoseek.errors import UserError


class ConfigError(UserError, ValueError):
    """An inconsistent or unknown configuration field; the message names the field."""


@dataclass
class ModelConfig:
    # --- size
    vocab_size: int = 4096
    """Number of token ids the embedding and the output head cover."""
    hidden_size: int = 256
    """Width of the residual stream (d_model)."""
    num_hidden_layers: int = 4
    """Main decoder layers (MTP modules are extra and not counted here, as in DeepSeek-V3)."""
    max_position_embeddings: int = 2048
    """Longest sequence the RoPE tables are built for."""
    # --- attention (MLA)
    attention_type: str = "mla"
    """"mla" (DeepSeek multi-head latent attention) or "mha" (standard multi-head attention, the dense
    baseline only; an MHA model cannot be exported to transformers' DeepseekV3)."""
    num_attention_heads: int = 8
    """n_h, number of query heads (MLA: every head shares one latent K/V)."""
    q_lora_rank: int | None = None
    """d_c', rank of the query down-projection; None means a plain full-rank q_proj."""
    kv_lora_rank: int = 64
    """d_c, width of the compressed KV latent c_kv: with qk_rope_head_dim, all MLA caches per token."""
    qk_nope_head_dim: int = 32
    """Per-head query/key dimension without rotary embedding (0 for a fully rotary MHA baseline)."""
    qk_rope_head_dim: int = 16
    """d_h^R, per-head decoupled RoPE dimension (the RoPE key is shared by all heads). Must be even."""
    v_head_dim: int = 32
    """Per-head value dimension."""
    rope_theta: float = 10000.0
    """RoPE base. RoPE is applied to adjacent pairs (interleaved), as DeepSeek and llama.cpp do."""
    # --- feed-forward and MoE
    intermediate_size: int = 768
    """Width of the SwiGLU MLP in dense layers (layer index < first_k_dense_replace)."""
    moe_intermediate_size: int = 128
    """Width of each routed expert; the shared expert block is n_shared_experts times as wide."""
    n_routed_experts: int = 16
    """N_r, routed experts per MoE layer. 0 makes every layer dense."""
    num_experts_per_tok: int = 2
    """K_r, routed experts chosen per token."""
    n_shared_experts: int = 1
    """Shared experts, always applied, fused into one SwiGLU MLP of width n_shared * moe_intermediate."""
    n_group: int = 1
    """Expert groups for group-limited routing (DeepSeek-V3's node-limited routing)."""
    topk_group: int = 1
    """Groups kept per token; only experts of those groups can be chosen."""
    norm_topk_prob: bool = True
    """Renormalise the chosen sigmoid scores to sum 1 before routed_scaling_factor."""
    routed_scaling_factor: float = 1.0
    """Multiplies the routed expert weights (2.5 in DeepSeek-V3)."""
    first_k_dense_replace: int = 1
    """Layers with index < k use a dense MLP; the others use MoE. num_hidden_layers makes all dense."""
    # --- multi-token prediction
    num_nextn_predict_layers: int = 1
    """D, the MTP depth: module k predicts the token k+1 positions ahead. 0 disables MTP."""
    # --- misc
    rms_norm_eps: float = 1e-6
    """Epsilon of the input, post-attention and final norms (the latent norms always use 1e-6)."""
    tie_word_embeddings: bool = False
    """Share the output head's weight with the input embedding."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    hidden_act: str = "silu"
    """Activation of the SwiGLU MLPs; only silu is supported (as in vLLM)."""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # --- training (nanoseek's own)
    mtp_loss_weight: float = 0.3
    """lambda: the MTP loss, averaged over depths, is added with this weight (0.3 then 0.1 in V3)."""
    aux_loss_alpha: float = 0.0
    """alpha of the sequence-wise balance loss (1e-4 in V3; 0 disables it)."""
    bias_update_speed: float = 0.001
    """gamma of the auxiliary-loss-free balancing: the expert bias moves by this after each step. V3's 0.001
    suits its ~10^5 steps; the cpu preset's runs of a few hundred steps need 0.01 (see PRESETS)."""
    extra: dict = field(default_factory=dict)
    """Unknown keys read from a JSON file, kept so that a round trip loses nothing."""

    def __post_init__(self):
        self.validate()

    # -- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    def validate(self) -> None:
        def fail(name, why):
            raise ConfigError(f"config field {name}={getattr(self, name)!r}: {why}")

        def number(name, low, above):  # a finite real number, > low (above) or >= low
            v = getattr(self, name)
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                    or v < low or (above and v == low)):
                fail(name, f"must be a number {'>' if above else '>='} {low}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "v_head_dim", "intermediate_size", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(name, "must be a positive integer")
        for name in ("qk_nope_head_dim", "qk_rope_head_dim", "n_routed_experts", "n_shared_experts",
                     "first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(name, "must be a non-negative integer")
        if self.attention_type not in ("mla", "mha"):
            fail("attention_type", 'must be "mla" or "mha"')
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.qk_head_dim == 0:
            fail("qk_nope_head_dim", "qk_nope_head_dim + qk_rope_head_dim must be > 0")
        if self.attention_type == "mla":
            if self.qk_nope_head_dim == 0:
                fail("qk_nope_head_dim", "must be > 0 for MLA")
            if self.qk_rope_head_dim == 0:
                fail("qk_rope_head_dim", "must be > 0 for MLA (it carries the position information)")
            if not isinstance(self.kv_lora_rank, int) or self.kv_lora_rank <= 0:
                fail("kv_lora_rank", "must be a positive integer")
            if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
                fail("q_lora_rank", "must be a positive integer or None")
        if self.hidden_act != "silu":
            fail("hidden_act", 'only "silu" (SwiGLU) is supported')
        if self.n_routed_experts > 0:
            for name in ("moe_intermediate_size", "num_experts_per_tok"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    fail(name, "must be a positive integer")
            if self.num_experts_per_tok > self.n_routed_experts:
                fail("num_experts_per_tok", f"must be between 1 and n_routed_experts={self.n_routed_experts}")
            if not isinstance(self.n_group, int) or self.n_group < 1 or self.n_routed_experts % self.n_group:
                fail("n_group", f"must be a positive divisor of n_routed_experts={self.n_routed_experts}")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                fail("n_group", "each group needs at least 2 experts (groups are scored by their top-2)")
            if not isinstance(self.topk_group, int) or not 1 <= self.topk_group <= self.n_group:
                fail("topk_group", f"must be between 1 and n_group={self.n_group}")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                fail("num_experts_per_tok", "exceeds the experts available in topk_group groups")
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            number(name, 0, above=True)
        for name in ("initializer_range", "mtp_loss_weight", "aux_loss_alpha", "bias_update_speed"):
            number(name, 0, above=False)

    # -- serialisation
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """model_type names a file's kind (a nanoseek or a transformers config.json), not the model: not kept."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k != "model_type"}
        return cls(**kwargs, extra=extra)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_fields(path))

    def replace(self, **overrides) -> ModelConfig:
        unknown = set(overrides) - {f.name for f in fields(self) if f.name != "extra"}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)

    def with_overrides(self, items: list[str]) -> ModelConfig:
        """Apply `key=value` strings (values parsed as JSON, else taken as strings)."""
        overrides = {}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"override {item!r} is not key=value")
            try:
                overrides[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                overrides[key.strip()] = raw
        return self.replace(**overrides)


def read_fields(path: str | Path) -> dict:
    """The fields a JSON config file gives (only those: over a preset, the others keep the preset's values)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config {path} is not a JSON object")
    return d


# Presets. `cpu` is the speedrun model, `dense` the same width and depth with standard MHA and one dense
# SwiGLU MLP per layer (the ablation baseline); `tiny` is for tests.
# cpu's bias_update_speed: in the 240 s race (bench/pretrain.py's P2), V3's 0.001 left the busiest expert of
# a layer with 3-5x the mean load throughout (1.4-1.9x with 0.01 or 0.03) and val bits per byte 1.1457 vs
# 1.1384 (0.01) and 1.1371 (0.03).
# cpu has no MTP module (num_nextn_predict_layers=0; add one with --set for speculative decoding): in a model of
# four layers the module is a fifth layer plus a second pass through the 4096-token head and cross-entropy,
# +42% time per training step (849 vs 597 ms) for 0.5% lower val bits per byte at equal steps (150 steps:
# 1.3027 vs 1.3091); in the 240 s race it lost 4-5% (1.138-1.148 with it, 1.081-1.092 without). DeepSeek-V3's
# one MTP module is a small part of a 61-layer model; the gpu preset keeps one.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
        topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=256,
    ),
    "cpu": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, q_lora_rank=None,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=768,
        moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=1024,
        bias_update_speed=0.01,
    ),
    "dense": dict(
        vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, attention_type="mha",
        qk_nope_head_dim=0, qk_rope_head_dim=32, v_head_dim=32, intermediate_size=768, n_routed_experts=0,
        num_nextn_predict_layers=0, max_position_embeddings=1024,
    ),
    "gpu": dict(
        vocab_size=32768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=3072,
        moe_intermediate_size=384, n_routed_experts=16, num_experts_per_tok=2, n_shared_experts=1, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=2048,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
