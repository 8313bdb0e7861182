"""Parity with transformers' DeepseekV3ForCausalLM, export/import round trips, bad directories."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import peak_attention

import nanoseek
from nanoseek.checkpoint import CheckpointError, save_model
from nanoseek.config import preset
from nanoseek.hf import export, import_dir
from nanoseek.model import NanoSeek

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "q_lora+groups": dict(q_lora_rank=32, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "no_q_lora+4groups": dict(q_lora_rank=None, n_routed_experts=8, n_group=4, topk_group=2),
    "shared3+all_moe": dict(n_shared_experts=3, first_k_dense_replace=0, num_experts_per_tok=3, n_group=1,
                            topk_group=1, norm_topk_prob=False),
    "tied+3layers": dict(tie_word_embeddings=True, num_hidden_layers=3, num_nextn_predict_layers=2),
    "no_mtp+dense_first2+eps+theta": dict(num_nextn_predict_layers=0, first_k_dense_replace=2, num_hidden_layers=3,
                                          rms_norm_eps=1e-2, rope_theta=500.0),
}


def random_model(**overrides):
    model = NanoSeek(preset("tiny", **overrides)).eval()
    peak_attention(model)
    with torch.no_grad():  # make every weight matter: non-trivial norms and expert biases
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(-0.6, 0.3)  # biased scores below 0 too (group masking)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    model = random_model(**CONFIGS[name])
    export(model, tmp_path)
    ref, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    ref.eval()
    L = model.config.num_hidden_layers
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # only the MTP layers (which transformers never builds) are left over
    assert all(k.startswith(tuple(f"model.layers.{L + k}." for k in range(len(model.mtp))))
               for k in info["unexpected_keys"])
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_mtp_layers_are_exported_under_deepseek_v3s_names(tmp_path):
    """Layer L (the first MTP module) as in DeepSeek-V3's checkpoints, which vLLM and llama.cpp read: a decoder
    block named like the others plus enorm, hnorm, eh_proj, embed_tokens and shared_head.{norm,head}."""
    from safetensors import safe_open

    model = random_model()
    export(model, tmp_path)
    names = set()
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(f, "pt") as g:
            names |= set(g.keys())
    L = model.config.num_hidden_layers
    mtp = {n[len(f"model.layers.{L}."):] for n in names if n.startswith(f"model.layers.{L}.")}
    block = {n[len(f"model.layers.{L - 1}."):] for n in names if n.startswith(f"model.layers.{L - 1}.")}
    assert mtp - block == {"enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight",
                           "shared_head.norm.weight", "shared_head.head.weight"}
    assert block <= mtp


def test_export_import_round_trip_is_bit_identical(tmp_path):
    model = random_model(num_nextn_predict_layers=2, bias_update_speed=0.01, mtp_loss_weight=1.0)
    export(model, tmp_path / "hf")
    back = import_dir(tmp_path / "hf")
    assert back.config == model.config  # the training settings too
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["scoring_func"] == "sigmoid" and cfg["topk_method"] == "noaux_tc" and cfg["moe_layer_freq"] == 1
    assert cfg["num_nextn_predict_layers"] == 2 and cfg["model_type"] == "deepseek_v3"


@pytest.mark.parametrize("overrides", [{}, {"n_shared_experts": 0}])  # (transformers then saves empty tensors)
def test_load_reads_run_checkpoint_and_transformers_dirs(tmp_path, overrides):
    model = random_model(**overrides)
    save_model(model, tmp_path / "run" / "base")
    m1, tok = nanoseek.load(tmp_path / "run")
    assert tok is None and all(torch.equal(x, y) for x, y in zip(m1.state_dict().values(), model.state_dict().values()))
    assert not m1.training  # ready for inference
    if not overrides:  # a run with a later stage: load() takes the newest (sft over base)
        sft = random_model(**overrides)
        save_model(sft, tmp_path / "run" / "sft")
        m3, _ = nanoseek.load(tmp_path / "run")
        assert torch.equal(m3.lm_head.weight, sft.lm_head.weight)
    # a directory written by transformers itself (no MTP weights) loads without conversion
    export(model, tmp_path / "hf")
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf")
    ref.save_pretrained(tmp_path / "hf2")
    m2, _ = nanoseek.load(tmp_path / "hf2")
    assert len(m2.mtp) == 0
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert (m2(ids) - model(ids)).abs().max() < 1e-5


def test_bad_directories_fail_with_one_line(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a DeepseekV3 model"):
        import_dir(tmp_path / "llama")
    export(random_model(), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["kv_lora_rank"] = 48  # the tensors no longer fit the config
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.kv_a_proj_with_mqa\.weight"):
        import_dir(tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "nanoseek", "import", str(tmp_path / "hf"), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "kv_a_proj_with_mqa" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_dense_baseline_refuses_export(tmp_path):
    from nanoseek.config import ConfigError

    with pytest.raises(ConfigError, match="mha"):
        export(NanoSeek(preset("dense", vocab_size=64, hidden_size=32, num_hidden_layers=1)), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_cli_export_and_import_carry_the_tokenizer_and_the_dtype(tmp_path):
    """`nanoseek export RUN --dtype bfloat16` then `nanoseek import`: transformers' Auto classes load the export
    (its tokenizer encodes as ours), the weights are bf16 with the expert biases kept fp32, and the import brings
    the tokenizer back."""
    from helpers import corpus_text
    from safetensors import safe_open

    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(iter([corpus_text()]), vocab_size=512)
    # an API user's bf16 model (its biases must still export as fp32), with the token ids pretrain gives a model
    model = random_model(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id).to(torch.bfloat16)
    save_model(model, tmp_path / "run" / "base")
    tok.tk.post_processor = None  # as a run's tokenizer made before it had the <|bos|> template: the export adds it
    tok.save(tmp_path / "run" / "tokenizer")
    for verb, src, out, extra in (("export", "run", "hf", ["--dtype", "bfloat16"]), ("import", "hf", "back", [])):
        r = subprocess.run([sys.executable, "-m", "nanoseek", verb, str(tmp_path / src), "--out", str(tmp_path / out),
                            *extra], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if "e_score_correction_bias" in k} == {"F32"}
    assert {d for k, d in dtypes.items() if "e_score_correction_bias" not in k} == {"BF16"}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    text = "The king said: good night, 12 + 7 = 19 ünï"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(text).input_ids == tok.encode(text, bos=True)  # a prompt starts as every pretraining document
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_id, tok.bos_id]  # a text ends where the next document starts
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    back, back_tok = nanoseek.load(tmp_path / "back")
    assert back_tok is not None and back_tok.encode(text) == tok.encode(text)
    assert all(torch.equal(a.float(), b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (ref(ids).logits - back(ids)).abs().max() < 1e-4


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"type": "yarn", "factor": 40.0}}, "rope_type='yarn'"),  # DeepSeek-V3's own config.json
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0}}, "rope_type='yarn'"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ({"rope_interleave": False}, "rope_interleave=False"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_configs_nanoseek_would_compute_differently_are_refused(tmp_path, change, match):
    export(random_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if "rope_scaling" in change:  # the older spelling alone
        cfg.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=match):
        import_dir(tmp_path)


def test_tensors_the_config_has_no_place_for_are_refused(tmp_path):
    """E.g. an FP8 checkpoint's weight_scale_inv: ignored, the weights would be read unscaled."""
    from safetensors.torch import load_file, save_file

    export(random_model(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.mlp.down_proj.weight_scale_inv"):
        import_dir(tmp_path)
