"""The model core: MoE dispatch, balancing, MTP, bf16, config validation."""

import pytest
import torch
from helpers import peak_attention

from nanoseek import model as model_module
from nanoseek.config import ConfigError, ModelConfig, preset
from nanoseek.model import MoE, NanoSeek


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("n", [37, 300])  # 300 tokens: blocks of several EXPERT_ROWS, and skewed loads
def test_sorted_dispatch_equals_per_expert_loop(monkeypatch, grouped, n):
    """Both expert kernels (one grouped matmul; one matmul per expert, for torch < 2.10) against the masked
    reference, outputs and gradients."""
    monkeypatch.setattr(model_module, "GROUPED_MM", grouped and model_module.GROUPED_MM)
    cfg = preset("tiny", n_routed_experts=8, num_experts_per_tok=3, n_group=1, topk_group=1)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.e_score_correction_bias[:2] = 0.5  # experts 0 and 1 take most tokens
    x = torch.randn(n, cfg.hidden_size)
    w, idx, _ = moe.gate(x)
    assert idx.shape == (n, 3) and w.shape == (n, 3)
    fast = moe.experts(x, idx, w)
    slow = moe.experts.forward_reference(x, idx, w)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    # and gradients agree too
    g1 = torch.autograd.grad(moe.experts(x, idx, w).square().sum(), moe.experts.gate_up_proj)[0]
    g2 = torch.autograd.grad(moe.experts.forward_reference(x, idx, w).square().sum(), moe.experts.gate_up_proj)[0]
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_group_limited_routing_only_picks_kept_groups():
    cfg = preset("tiny", n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    x = torch.randn(64, cfg.hidden_size)
    _, idx, scores = moe.gate(x)
    group_score = scores.view(64, 4, 2).sum(-1)  # 2 experts per group: top-2 sum is the sum
    kept = group_score.topk(2, -1).indices
    chosen_groups = idx // 2
    assert all(set(c.tolist()) <= set(k.tolist()) for c, k in zip(chosen_groups, kept))


def test_bias_steers_selection_not_weights():
    cfg = preset("tiny", n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(16, cfg.hidden_size)
    moe.gate.e_score_correction_bias[3] = 100.0  # expert 3 is always chosen ...
    w, idx, scores = moe.gate(x)
    assert (idx == 3).any(-1).all()
    slot = (idx == 3).int().argmax(-1)
    # ... but its weight is its raw sigmoid score, untouched by the bias
    torch.testing.assert_close(w[torch.arange(16), slot], scores[:, 3])


def test_model_bias_update_steps_every_layer_by_the_configured_speed():
    """NanoSeek.update_expert_bias (what the trainer calls each step): b_i += speed * sign(mean load - load_i)."""
    torch.manual_seed(0)
    model = NanoSeek(preset("tiny", bias_update_speed=0.01, n_group=1, topk_group=1)).train()
    moe = model.moe_layers()[0]
    moe.gate.e_score_correction_bias[0] = 10.0  # expert 0 is chosen by every token: overloaded
    before = moe.gate.e_score_correction_bias.clone()
    model(torch.randint(0, 512, (2, 16)))
    load = moe.load.clone()
    stats = model.update_expert_bias()
    delta = moe.gate.e_score_correction_bias - before
    torch.testing.assert_close(delta, 0.01 * torch.sign(load.mean() - load))
    assert delta[0] == pytest.approx(-0.01, abs=1e-5)
    assert stats["load_max_over_mean/1"] == float(load.max() / load.mean())  # layer 1: layer 0 is dense
    assert moe.load.sum() == 0  # counting starts again


def test_sequence_aux_loss_is_deepseek_v3s():
    """Eq. 17-20 of the V3 report, per sequence: f_i = E / (K T) * #tokens choosing i, P_i = mean over tokens of
    i's normalised score; loss = alpha * sum_i f_i P_i, averaged over the sequences."""
    torch.manual_seed(0)
    cfg = preset("tiny", n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, aux_loss_alpha=0.1)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.3)
    x = torch.randn(3, 10, cfg.hidden_size)
    moe(x)
    E, K, T = 8, 2, 10
    want = 0.0
    for seq in x:
        _, idx, scores = moe.gate(seq)
        for i in range(E):
            f = E / (K * T) * (idx == i).sum().item()
            P = (scores[:, i] / scores.sum(-1)).mean().item()
            want += 0.1 * f * P / 3
    assert moe.aux_loss.item() == pytest.approx(want, rel=1e-5)


def test_bias_update_moves_load_towards_balance():
    cfg = preset("tiny", n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=2, bias_update_speed=0.01)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.02)
    with torch.no_grad():
        moe.gate.weight[0] += 0.3  # expert 0 is favoured by every token of a biased input
    for p in moe.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(4, 64, cfg.hidden_size) + 1.0

    def imbalance():
        with torch.no_grad():
            moe(x)
        r = float(moe.load.max() / moe.load.mean())
        return r

    before = imbalance()
    for _ in range(200):
        moe.update_bias(cfg.bias_update_speed)
        after = imbalance()
    assert before > 2.0
    assert after < before / 2, (before, after)
    assert moe.gate.e_score_correction_bias[0] < 0  # the overloaded expert was pushed down


def test_mtp_loss_finite_and_reaches_mtp_weights():
    model = NanoSeek(preset("tiny", num_nextn_predict_layers=2, aux_loss_alpha=1e-4, mtp_loss_weight=0.5)).train()
    ids = torch.randint(0, 512, (2, 32))
    x, y = ids[:, :-1], ids[:, 1:]
    out = model(x, y)
    assert torch.isfinite(out.loss) and torch.isfinite(out.mtp_loss) and out.aux_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.mtp_loss + out.aux_loss)
    # the mean over depths of each module's cross-entropy: module k (depth d = k+1) reads token i+d with the previous
    # depth's state at i and predicts token i+d+1
    S, losses, h = x.shape[1], [], model.hidden(x)
    for k in range(2):
        d = k + 1
        h = model.mtp_hidden(k, h[:, : S - d], x[:, d:], torch.arange(S - d).expand(2, S - d))
        logits = model.lm_head(model.mtp[k].norm(h))
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, d:].flatten()))
    torch.testing.assert_close(out.mtp_loss, sum(losses) / 2)
    out.loss.backward()
    for k in range(2):
        for name in ("eh_proj.weight", "enorm.weight", "block.self_attn.kv_b_proj.weight"):
            g = model.mtp[k].get_parameter(name).grad
            assert g is not None and g.abs().sum() > 0, (k, name)
    assert model.mtp[0].block.mlp.gate.weight.grad.abs().sum() > 0  # aux loss and routing reach the router
    # a sequence of one token: no MTP module runs, and the auxiliary loss is this forward's only (was the MTP
    # layers' from the step before, whose graph was freed: backward failed)
    short = model(ids[:, :1], ids[:, 1:2])
    assert short.mtp_loss is None
    moe = [m for m in model.model.layers if hasattr(m.mlp, "gate")]
    torch.testing.assert_close(short.aux_loss, sum(m.mlp.aux_loss for m in moe))
    short.loss.backward()


def test_targets_minus_one_are_ignored():
    model = NanoSeek(preset("tiny", num_nextn_predict_layers=0))
    ids = torch.randint(0, 512, (1, 16))
    t = ids.clone()
    t[:, :8] = -1
    full = torch.nn.functional.cross_entropy(model(ids)[0, 8:], ids[0, 8:])
    torch.testing.assert_close(model(ids, t).lm_loss, full)


def test_bf16_autocast_forward_close_to_fp32():
    model = NanoSeek(preset("tiny")).eval()
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids)
            assert model.moe_layers()[0].gate(torch.randn(3, 64))[0].dtype == torch.float32  # router stays fp32
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.nn.functional.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_scaled_masked_softmax(dtype):
    """Both of attention()'s paths (bf16 on CPU: two matmuls; else SDPA with padded head dims) against the formula
    in fp32, on q and k of unit size: at init the scores are ~0, and a lost scale or mask would hardly show."""
    from nanoseek.model import attention

    q, k, v = torch.randn(2, 4, 12, 24), torch.randn(2, 4, 12, 24), torch.randn(2, 4, 12, 16)
    scale = 24 ** -0.5
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    padded = causal.clone()
    padded[:, :3] = False  # e.g. a shorter sequence's left padding in a batch
    padded[:3, :3] = torch.eye(3, dtype=torch.bool)
    for mask in (None, padded[None, None].expand(2, 1, 12, 12)):
        allowed = causal if mask is None else mask
        want = ((q @ k.mT) * scale).masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        got = attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale).float()
        torch.testing.assert_close(got, want, atol=3e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "dense"])
def test_attention_is_causal_and_sees_only_relative_positions(name):
    """The logits before a changed token do not move (causality), and shifting every position by the same amount
    changes nothing (RoPE on both q and k rotates by relative position only)."""
    model = peak_attention(NanoSeek(preset(name, vocab_size=512)).eval())
    ids = torch.randint(0, 512, (2, 24))
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        base = model(ids, positions=pos)
        other = ids.clone()
        other[:, 15] = (other[:, 15] + 1) % 512
        changed = model(other, positions=pos)
        shifted = model(ids, positions=pos + 37)
        implicit = model(ids)  # no positions: 0..S-1, taken from the RoPE tables without indexing
        without_rope = model.rope  # a model that ignored positions would pass the shift: they must matter
        model.rope = lambda p, length=0: without_rope(torch.zeros_like(p))
        unrotated = model(ids, positions=pos)
    torch.testing.assert_close(changed[:, :15], base[:, :15], atol=1e-5, rtol=0)
    assert (changed[:, 15:] - base[:, 15:]).abs().max() > 1e-2
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=0)
    torch.testing.assert_close(implicit, base, atol=0, rtol=0)
    assert (unrotated - base).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["tiny", "dense"])
def test_train_step_reduces_loss(name):
    cfg = preset(name, vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)
    model = NanoSeek(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 33))
    losses = []
    for _ in range(30):
        out = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_expert_bias()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("field,value", [
    ("num_experts_per_tok", 9),  # > n_routed_experts=8
    ("topk_group", 3),  # > n_group=2
    ("qk_rope_head_dim", 7),  # odd
    ("n_group", 3),  # does not divide 8 experts
    ("attention_type", "gqa"),
    ("hidden_size", 0),
    ("rms_norm_eps", "abc"),  # the wrong type: an error naming the field, not a TypeError
    ("num_experts_per_tok", None),  # (DeepseekV3Config types it int | None)
    ("routed_scaling_factor", 0),
])
def test_inconsistent_config_is_rejected_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        preset("tiny", **{field: value})


def test_config_json_round_trip(tmp_path):
    cfg = preset("tiny", q_lora_rank=None, extra={"note": "kept"})
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    for bad in ("no_such_field=1", "extra=5"):
        with pytest.raises(ConfigError, match="unknown config field"):
            cfg.with_overrides([bad])
    # a file's kind is not a model field: a transformers config.json's must not turn a nanoseek run into one
    assert "model_type" not in ModelConfig.from_dict({**cfg.to_dict(), "model_type": "deepseek_v3"}).extra
    assert cfg.with_overrides(["num_hidden_layers=3", "q_lora_rank=null"]).num_hidden_layers == 3


def test_presets_sizes():
    assert NanoSeek(preset("tiny")).num_params() < 1_000_000
    gpu = NanoSeek(preset("gpu"))
    assert gpu.num_params() > 100_000_000
    dense, cpu = preset("dense"), preset("cpu")
    assert dense.hidden_size == cpu.hidden_size and dense.num_hidden_layers == cpu.num_hidden_layers
    assert dense.n_routed_experts == 0 and dense.num_nextn_predict_layers == 0 and dense.attention_type == "mha"


def test_positions_beyond_the_rope_tables_are_refused():
    model = NanoSeek(preset("tiny", max_position_embeddings=16)).eval()
    model(torch.zeros(1, 16, dtype=torch.long))  # the last position is 15
    with pytest.raises(ValueError, match="position 16 exceeds max_position_embeddings=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="position 20 exceeds max_position_embeddings=16"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.tensor([[3, 20]]))
