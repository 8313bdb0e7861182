"""Export to, and import from, a transformers `DeepseekV3ForCausalLM` directory.

One key map (`key_map`) serves both directions. Our module names already are transformers' names, so
the map is the identity except for:
  - routed experts, stored stacked here ([E, 2I, H] / [E, H, I]) and per expert in checkpoints
    (`mlp.experts.{e}.{gate,up,down}_proj.weight`, which transformers 4.x/5.x, vLLM and llama.cpp read);
  - MTP module k, stored as `mtp.{k}.*` here and as the extra layer `model.layers.{L+k}.*` in DeepSeek's
    checkpoints (`shared_head.norm` is our `mtp.{k}.norm`; the block's keys sit directly in the layer).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from nanoseek.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_model_state,
    load_tensors,
    read_config,
    save_tensors,
)
from nanoseek.config import ConfigError, ModelConfig

# ModelConfig fields written to / read from config.json under the same name
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank",
    "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
    "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "num_nextn_predict_layers",
    # training settings (transformers keeps unknown keys; DeepSeek's own config.json has aux_loss_alpha)
    "mtp_loss_weight", "aux_loss_alpha", "bias_update_speed",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _param_names(cfg: ModelConfig) -> list[str]:
    from nanoseek.model import NanoSeek

    with torch.device("meta"):
        model = NanoSeek(cfg)
    names = list(model.state_dict())
    return [n for n in names if not (cfg.tie_word_embeddings and n == "lm_head.weight")]


def _hf_name(name: str, cfg: ModelConfig) -> str:
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if not m:
        return name
    layer, rest = cfg.num_hidden_layers + int(m.group(1)), m.group(2)
    if rest.startswith("block."):
        rest = rest[len("block."):]
    elif rest == "norm.weight":
        rest = "shared_head.norm.weight"
    return f"model.layers.{layer}.{rest}"


def key_map(cfg: ModelConfig) -> list[tuple[str, list[str], str]]:
    """(our name, transformers names, how): how is "same", "gate_up" ([E,2I,H] <-> E gate + E up
    matrices, gate rows first) or "stack" ([E,...] <-> E matrices)."""
    E = cfg.n_routed_experts
    out = []
    for name in _param_names(cfg):
        hf = _hf_name(name, cfg)
        if hf.endswith("mlp.experts.gate_up_proj"):
            base = hf[: -len("gate_up_proj")]
            out.append((name, [f"{base}{e}.gate_proj.weight" for e in range(E)]
                        + [f"{base}{e}.up_proj.weight" for e in range(E)], "gate_up"))
        elif hf.endswith("mlp.experts.down_proj"):
            base = hf[: -len("down_proj")]
            out.append((name, [f"{base}{e}.down_proj.weight" for e in range(E)], "stack"))
        else:
            out.append((name, [hf], "same"))
    return out


def to_hf_state(model) -> dict[str, torch.Tensor]:
    cfg, sd = model.config, model.state_dict()
    out = {}
    for name, hf_names, how in key_map(cfg):
        t = sd[name]
        if how == "same":
            out[hf_names[0]] = t
        elif how == "gate_up":
            parts = list(t[:, : t.shape[1] // 2]) + list(t[:, t.shape[1] // 2:])
            out.update(zip(hf_names, parts))
        else:
            out.update(zip(hf_names, list(t)))
    for k in range(cfg.num_nextn_predict_layers):  # DeepSeek's MTP layers carry copies of the shared weights
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{layer}.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
        out[f"{layer}.shared_head.head.weight"] = sd["lm_head.weight"]
    return {k: v.clone() for k, v in out.items()}  # own storage each: safetensors refuses shared tensors


def from_hf_state(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out, used = {}, set()

    def get(name):
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name}")
        used.add(name)
        return tensors[name]

    for name, hf_names, how in key_map(cfg):
        if how == "same":
            out[name] = get(hf_names[0])
        elif how == "gate_up":
            E = len(hf_names) // 2
            gates, ups = [get(n) for n in hf_names[:E]], [get(n) for n in hf_names[E:]]
            out[name] = torch.cat((torch.stack(gates), torch.stack(ups)), dim=1)
        else:
            out[name] = torch.stack([get(n) for n in hf_names])
    copies = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight")
    # transformers builds (and saves) shared experts of width 0 for n_shared_experts=0: empty tensors, ignored
    extra = sorted(k for k in set(tensors) - used if not copies.fullmatch(k) and tensors[k].numel()
                   and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]} (the config has no such weight)")
    return out


def hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    if cfg.attention_type != "mla":
        raise ConfigError("attention_type='mha' (the dense baseline) is not a DeepseekV3 architecture; "
                          "only MLA models can be exported")
    d = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    d.update({f: getattr(cfg, f) for f in SHARED_FIELDS})
    d.update(
        num_key_value_heads=cfg.num_attention_heads,  # MLA: transformers must not repeat K/V
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_interleave=True, attention_bias=False, attention_dropout=0.0, use_cache=True,
        # read by vLLM and llama.cpp, which default to softmax scoring otherwise
        scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1,
        dtype=str(dtype).removeprefix("torch."),
    )
    if cfg.n_routed_experts == 0:  # all dense: express it with first_k_dense_replace
        d["first_k_dense_replace"] = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    return d


def config_from_hf(d: dict, source: str) -> ModelConfig:
    if d.get("model_type") != "deepseek_v3":
        raise CheckpointError(f"{source}: not a DeepseekV3 model (model_type={d.get('model_type')!r})")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    checks = [
        ("rope_type", rope.get("rope_type", rope.get("type", "default")), "default"),
        ("rope_interleave", d.get("rope_interleave", True), True),
        ("scoring_func", d.get("scoring_func", "sigmoid"), "sigmoid"),
        ("attention_bias", d.get("attention_bias", False), False),
        ("moe_layer_freq", d.get("moe_layer_freq", 1), 1),
        ("hidden_act", d.get("hidden_act", "silu"), "silu"),
    ]
    for key, got, want in checks:
        if got != want:
            raise CheckpointError(f"{source}: {key}={got!r} is not supported (nanoseek needs {want!r})")
    nh = d.get("num_attention_heads")
    if d.get("num_key_value_heads", nh) != nh:
        raise CheckpointError(f"{source}: num_key_value_heads must equal num_attention_heads for MLA")
    kw = {f: d[f] for f in SHARED_FIELDS if f in d}
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    kw.setdefault("num_nextn_predict_layers", 1)  # transformers' default
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def export(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
           dtype: torch.dtype = torch.float32) -> Path:
    """Write a directory that transformers.DeepseekV3ForCausalLM.from_pretrained loads."""
    config = hf_config(model.config, dtype)  # refuses what is not a DeepseekV3 before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf_state(model)
    bias = re.compile(r".*e_score_correction_bias")  # fp32 whatever the model's dtype, as transformers keeps it
    state = {k: v.float() if bias.fullmatch(k) else v.to(dtype) for k, v in state.items()}
    save_tensors(out / "model.safetensors", state, metadata={"format": "pt"})
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    gen = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(model.config, k) is not None}
    if gen.get("bos_token_id") not in (None, gen.get("eos_token_id")):  # a text ends where the next document starts
        gen["eos_token_id"] = [gen["eos_token_id"], gen["bos_token_id"]]  # (as nanoseek's generate: chat.text_end_ids)
    atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        _export_tokenizer(Path(tokenizer_dir), out)
    return out


def _export_tokenizer(src: Path, out: Path) -> None:
    """The tokenizer files; nanoseek's own tokenizer made before it had one gets the <|bos|> post-processor
    (tokenizer.add_bos_template), so that transformers' tokenizer(text) starts as nanoseek's prompts do."""
    from nanoseek.tokenizer import Tokenizer, add_bos_template

    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    tok = Tokenizer.load(src)
    if tok.native and tok.tk.post_processor is None:
        add_bos_template(tok.tk)
        tok.save(out)


def _read_hf_tensors(d: Path) -> dict[str, torch.Tensor]:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d}: no *.safetensors weights (only safetensors is read, never pickles)")
    tensors = {}
    for f in files:
        tensors.update(load_tensors(f))
    return tensors


def import_dir(hf_dir: str | Path, device: str | torch.device = "cpu"):
    """Load a transformers DeepseekV3 directory into a NanoSeek model (no conversion step needed).

    A directory saved by transformers itself has no MTP weights; it then loads with no MTP modules."""
    from nanoseek.model import NanoSeek

    d = Path(hf_dir)
    cfg = config_from_hf(read_config(d / "config.json"), str(d))
    tensors = _read_hf_tensors(d)
    L = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in tensors):
        cfg = cfg.replace(num_nextn_predict_layers=0)
    model = NanoSeek(cfg)
    load_model_state(model, from_hf_state(cfg, tensors, str(d)), str(d))
    return model.to(device).eval()
