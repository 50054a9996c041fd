"""The model against transformers: RoPE tables per scaling type, logits of a converted tiny
LlamaForCausalLM (tied and untied), config.json in both layouts and its bad inputs, the [model]
rope keys' precedence, the dry run and estimator with flavor hf, the published flavors.
(Tied embeddings under FSDP2 and TP: test_tied_embeddings.py, whose processes need no transformers.)"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from torchtitan_sp.config import ConfigError, load_config
from torchtitan_sp.models.hf import (
    hf_config,
    hf_key,
    hf_to_ours,
    our_key,
    ours_to_hf,
    permute_rows,
    read_hf_config,
    unpermute_rows,
)
from torchtitan_sp.models.llama3 import FLAVORS, ModelArgs, Transformer, rope_inv_freq
from torchtitan_sp.models.shape import context_warning, model_args
from torchtitan_sp.rules import load_and_validate

# rope_parameters of each type, at a tiny shape where each one changes the logits at 64 tokens
ROPE = {
    "none": {"rope_type": "default"},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
             "beta_slow": 2.0},
    "linear": {"rope_type": "linear", "factor": 2.0},
}
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
            vocab_size=256, rms_norm_eps=1e-5, max_position_embeddings=128, initializer_range=0.2)


def _hf_config(rope: str, tied: bool = False, theta: float = 10000.0, **kw) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **kw}, tie_word_embeddings=tied,
                       rope_parameters={**ROPE[rope], "rope_theta": theta})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("rope", ["none", "llama3", "yarn", "yarn_attention", "linear"])
def test_rope_tables_match_transformers(tmp_path: Path, rope: str) -> None:
    """inv_freq and the cos/sin scale, at Llama-3-8B's head_dim and theta (llama3: 3.1's 8x over 8192)."""
    params = {"none": {"rope_type": "default"},
              "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
              "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
              "yarn_attention": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192,
                                 "beta_fast": 24.0, "beta_slow": 2.0, "attention_factor": 1.5},
              "linear": {"rope_type": "linear", "factor": 4.0}}[rope]
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                      rope_parameters={**params, "rope_theta": 500000.0})
    theirs = LlamaRotaryEmbedding(cfg)
    args = read_hf_config(_write_config(cfg.to_dict(), tmp_path / "c"))
    inv_freq, scale = rope_inv_freq(args)
    assert args.rope_scaling == rope.split("_")[0]
    assert ((inv_freq - theirs.inv_freq) / theirs.inv_freq).abs().max() <= 1e-6  # every frequency, relative
    assert scale == pytest.approx(theirs.attention_scaling, rel=1e-12)
    plain = rope_inv_freq(ModelArgs(dim=4096, n_heads=32))[0]
    assert (((plain - inv_freq) / inv_freq).abs().max() > 0.5) == (rope != "none")  # the test can fail


def _write_config(d: dict, folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(d))
    return folder


def _convert(folder: Path, args: ModelArgs) -> Transformer:
    sd = hf_to_ours(load_file(str(folder / "model.safetensors")), args)
    model = Transformer(args)
    model.load_state_dict(sd)
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers(tmp_path: Path, tied: bool) -> None:
    """Each rope type: transformers' model saved with save_pretrained, read back through config.json and the
    name/row mapping, gives the same fp32 logits; without the scaling (or the q/k permutation) they differ."""
    torch.manual_seed(0)
    B, S = 2, 64
    tokens = torch.randint(0, TINY["vocab_size"], (B, S))
    positions = torch.arange(S).expand(B, -1)
    for rope in ROPE:
        folder = tmp_path / f"{rope}-{tied}"
        hf = LlamaForCausalLM(_hf_config(rope, tied)).eval()
        hf.save_pretrained(folder)
        args = read_hf_config(folder)
        assert (args.tie_word_embeddings, args.rope_scaling, args.ffn_hidden) == (tied, rope, 160)
        hf_sd = load_file(str(folder / "model.safetensors"))
        assert ("lm_head.weight" in hf_sd) != tied
        model = _convert(folder, args)
        assert (model.output.weight is model.tok_embeddings.weight) == tied
        with torch.no_grad():
            theirs = hf(tokens, position_ids=positions).logits
            ours = model(tokens, positions)
            assert _rel(ours, theirs) <= 1e-5, (rope, _rel(ours, theirs))
            # back to HF names and rows, bit for bit
            back = ours_to_hf(model.state_dict(), args)
            assert back.keys() == hf_sd.keys() and all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
            if rope != "none":  # the scaling is visible in the logits
                plain = Transformer(ModelArgs(**{**args.__dict__, "rope_scaling": "none"}))
                plain.load_state_dict(model.state_dict())
                assert _rel(plain(tokens, positions), theirs) > 1e-3, rope
    # without undoing HF's q/k row order the logits are far off
    sd = {our_key(k): v for k, v in hf_sd.items()}
    model.load_state_dict(sd if not tied else {**sd, "output.weight": sd["tok_embeddings.weight"]})
    with torch.no_grad():
        assert _rel(model(tokens, positions), theirs) > 1e-3


def test_mapping_both_ways() -> None:
    for ours, theirs in [("tok_embeddings.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight"),
                         ("norm.weight", "model.norm.weight"),
                         ("layers.3.attention.wq.weight", "model.layers.3.self_attn.q_proj.weight"),
                         ("layers.0.feed_forward.w3.weight", "model.layers.0.mlp.up_proj.weight"),
                         ("layers.12.ffn_norm.weight", "model.layers.12.post_attention_layernorm.weight")]:
        assert hf_key(ours) == theirs and our_key(theirs) == ours
    for bad in ("model.layers.0.self_attn.rotary_emb.inv_freq", "lm_head.bias"):
        with pytest.raises(KeyError):
            our_key(bad)
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)  # 2 heads of head_dim 8
    assert torch.equal(unpermute_rows(permute_rows(w, 2), 2), w)
    # our row 2i+j of a head is HF's row j*hd/2 + i
    hf_rows = permute_rows(w, 2)
    assert torch.equal(hf_rows[8 + 0 * 4 + 1], w[8 + 2 * 1 + 0]) and torch.equal(hf_rows[1 * 4 + 3], w[2 * 3 + 1])


def test_both_config_layouts_and_hf_config_round_trip(tmp_path: Path) -> None:
    """Llama 3.1's config.json as shipped (top-level rope_theta + rope_scaling) and as transformers 5 writes
    it (rope_parameters) read the same; hf_config writes what reads back equal and what transformers reads
    to the same tables."""
    classic = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "rms_norm_eps": 1e-5,
               "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    newer = {k: v for k, v in classic.items() if k not in ("rope_theta", "rope_scaling")}
    newer["rope_parameters"] = {**classic["rope_scaling"], "rope_theta": 500000.0}
    a, b = read_hf_config(_write_config(classic, tmp_path / "a")), read_hf_config(_write_config(newer, tmp_path / "b"))
    assert a == b == FLAVORS["8B"].__class__(**{**FLAVORS["8B"].__dict__, "ffn_dim": 14336})
    for args in (a, FLAVORS["1B"], model_args(load_config(["--config", "", "--model.flavor", "debug",
                                                           "--model.rope_scaling", "yarn", "--model.rope_factor", "4",
                                                           "--model.rope_attention_factor", "1.25"]).model)):
        d = hf_config(args)
        again = read_hf_config(_write_config(d, tmp_path / f"x{len(list(tmp_path.iterdir()))}"))
        assert again == dataclasses.replace(args, ffn_dim=args.ffn_hidden, multiple_of=again.multiple_of,
                                            ffn_dim_multiplier=again.ffn_dim_multiplier), args
        theirs = LlamaRotaryEmbedding(LlamaConfig(**d))
        inv_freq, scale = rope_inv_freq(args)
        assert torch.allclose(inv_freq, theirs.inv_freq, rtol=1e-6, atol=0) and scale == theirs.attention_scaling


BASE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 160, "vocab_size": 256, "rope_theta": 10000.0}


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type 'mistral': only Llama \\(model_type 'llama'\\) is supported"),
    ({"hidden_size": None}, "hidden_size must be a positive integer, got None"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "rope_theta": 500000.0}},
     "rope_theta 10000.0 vs rope_parameters.rope_theta 500000.0: the RoPE base must be given once"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_type": "linear", "factor": 4.0}},
     "rope_scaling and rope_parameters contradict each other \\(factor: 2.0 vs 4.0\\)"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported; valid: default"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_type 'llama3': low_freq_factor must be a positive number, got None"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, "rope_type 'yarn': factor must be a positive number"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a positive number, got '1e-5'"),
    ({"rope_scaling": {"type": "linear", "rope_type": "yarn", "factor": 2.0}},
     "rope type 'linear' and rope_type 'yarn'"),
    ({"head_dim": 32}, "head_dim 32 != hidden_size / num_attention_heads = 16 is not supported"),
    ({"attention_bias": True}, "attention_bias True is not supported"),
])
def test_bad_config_json(tmp_path: Path, change: dict, message: str) -> None:
    folder = _write_config({**BASE, **change}, tmp_path / "c")
    with pytest.raises(ConfigError, match=f"^{folder / 'config.json'}: {message}"):
        read_hf_config(folder)


def test_bad_hf_folder_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Through the launcher's validation: a folder without config.json, a non-Llama model, a bad JSON file,
    hf_assets_path where nothing reads it."""
    (tmp_path / "empty").mkdir()
    qwen = _write_config({**BASE, "model_type": "qwen2"}, tmp_path / "qwen")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    hf = ["--model.flavor", "hf", "--model.hf_assets_path"]
    for argv, message in [([*hf, str(tmp_path / "missing")], f"model.hf_assets_path: {tmp_path / 'missing'} is not a"),
                          ([*hf, str(tmp_path / "empty")], f"model.hf_assets_path: {tmp_path / 'empty'} has no config"),
                          ([*hf, str(qwen)], f"{qwen / 'config.json'}: model_type 'qwen2': only Llama"),
                          ([*hf, str(tmp_path / "broken")], f"{tmp_path / 'broken' / 'config.json'}: not valid JSON"),
                          (["--model.hf_assets_path", str(qwen)], "model.hf_assets_path: nothing reads it here")]:
        with pytest.raises(SystemExit) as exit_info:
            load_and_validate(["--config", "", *argv], world_size=1)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_rope_keys_override_and_reject_what_does_nothing(tmp_path: Path) -> None:
    """command line > TOML > flavor / config.json; 0 or "" keeps the flavor's; a key the type ignores is an error."""
    def args(*argv: str) -> ModelArgs:
        return model_args(load_config(["--config", "", *argv]).model)

    assert args("--model.flavor", "8B") == FLAVORS["8B"]
    a = args("--model.flavor", "8B", "--model.rope_factor", "16", "--model.rope_theta", "1e6")
    assert (a.rope_scaling, a.rope_factor, a.rope_theta, a.rope_original_max_position) == ("llama3", 16, 1e6, 8192)
    a = args("--model.flavor", "debug", "--model.rope_scaling", "llama3", "--model.rope_factor", "4")
    assert (a.rope_low_freq_factor, a.rope_high_freq_factor, a.rope_original_max_position) == (1.0, 4.0, 8192)
    a = args("--model.flavor", "8B", "--model.rope_scaling", "none")
    assert a.rope_scaling == "none" and a.rope_factor == 1.0
    hf = tmp_path / "hf"
    LlamaConfig(**TINY, rope_parameters={**ROPE["yarn"], "rope_theta": 10000.0}).save_pretrained(hf)
    toml = tmp_path / "r.toml"
    toml.write_text(f'[model]\nflavor = "hf"\nhf_assets_path = "{hf}"\nrope_theta = 20000.0\nrope_factor = 6.0\n')
    a = model_args(load_config(["--config", str(toml), "--model.rope_factor", "8", "--model.n_layers", "1"]).model)
    assert (a.dim, a.n_layers, a.rope_scaling, a.rope_theta, a.rope_factor, a.rope_yarn_beta_fast) == (
        64, 1, "yarn", 20000.0, 8.0, 16.0)
    for argv, message in [
        (("--model.flavor", "debug", "--model.rope_factor", "4"),
         "model.rope_factor: has no effect with rope_scaling 'none' \\(the flavor debug's\\); it applies to llama3"),
        (("--model.flavor", "8B", "--model.rope_scaling", "yarn"),
         "model.rope_scaling yarn: set model.rope_factor \\(the flavor 8B uses 'llama3' scaling\\)"),
        (("--model.flavor", "8B", "--model.rope_scaling", "yarn", "--model.rope_factor", "4",
          "--model.rope_low_freq_factor", "2"), "model.rope_low_freq_factor: has no effect with rope_scaling 'yarn';"),
        (("--model.flavor", "8B", "--model.rope_yarn_beta_fast", "8"), "model.rope_yarn_beta_fast: has no effect"),
        (("--model.flavor", "8B", "--model.rope_scaling", "ntk"), "model.rope_scaling: 'ntk' is not valid; choose one"),
        (("--model.flavor", "8B", "--model.rope_factor", "0.5"), "model.rope_factor: must be >= 1"),
        (("--model.flavor", "8B", "--model.rope_high_freq_factor", "0.5"), "model.rope_high_freq_factor 0.5 must"),
        (("--model.flavor", "hf",), "model.flavor hf: set model.hf_assets_path"),
    ]:
        with pytest.raises(ConfigError, match="^" + message):
            args(*argv)


def test_dry_run_estimator_and_context_warning_with_flavor_hf(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The shape, the RoPE override and the tied parameter count reach the dry run and the estimator; seq_len past
    max_position_embeddings of loaded weights is a warning only while the RoPE is unchanged."""
    from torchtitan_sp.estimate import main as estimate_main
    from torchtitan_sp.validate import main as validate_main
    hf = tmp_path / "hf"
    LlamaConfig(**TINY, tie_word_embeddings=True, rope_parameters={**ROPE["llama3"], "rope_theta": 10000.0},
                ).save_pretrained(hf)
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(read_hf_config(hf)).parameters())
    argv = ["--config", "", "--model.flavor", "hf", "--model.hf_assets_path", str(hf), "--model.rope_factor", "16",
            "--training.seq_len", "256"]
    monkeypatch.setattr(sys, "argv", ["validate", *argv, "--job.dry_run"])
    with pytest.raises(SystemExit, match="3"):
        validate_main()
    out = capsys.readouterr()
    assert (f"model: Llama 3 hf, 2 layers, dim 64, 4 heads (2 KV), ffn 160, vocab 256, RoPE theta 10000, llama3 x16 "
            f"from 32, tied embeddings\n  parameters {n:,}") in out.out and "warning" not in out.err
    estimate_main([*argv, "--world_size", "1"])
    assert f"Llama 3 hf: {n:,} parameters" in capsys.readouterr().out
    load = ["--checkpoint.initial_load_path", str(hf), "--checkpoint.initial_load_in_hf", "true"]
    warned = context_warning(load_config([*argv[:-4], *load, "--training.seq_len", "256"]), read_hf_config(hf))
    assert warned == ("training.seq_len 256 exceeds the model's max_position_embeddings 128 with its RoPE unchanged "
                      "(model.rope_theta / rope_scaling / rope_factor extend it)")
    assert context_warning(load_config([*argv, *load]), read_hf_config(hf)) is None


def test_published_flavors() -> None:
    """Shape constants and parameter counts of the published models (Llama 3.2 1B/3B tied, Llama 3.1)."""
    published = {  # dim, layers, heads, kv heads, ffn, tied, rope factor, parameters
        "1B": (2048, 16, 32, 8, 8192, True, 32.0, 1_235_814_400),
        "3B": (3072, 28, 24, 8, 8192, True, 32.0, 3_212_749_824),
        "8B": (4096, 32, 32, 8, 14336, False, 8.0, 8_030_261_248),
        "70B": (8192, 80, 64, 8, 28672, False, 8.0, 70_553_706_496),
        "405B": (16384, 126, 128, 8, 53248, False, 8.0, 405_853_388_800),
    }
    from torchtitan_sp.memory_model import param_counts
    for flavor, (dim, layers, heads, kv, ffn, tied, factor, n) in published.items():
        a = FLAVORS[flavor]
        assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden, a.tie_word_embeddings) == (
            dim, layers, heads, kv, ffn, tied), flavor
        assert (a.vocab_size, a.rope_theta, a.norm_eps, a.max_position_embeddings) == (128256, 500000.0, 1e-5, 131072)
        assert (a.rope_scaling, a.rope_factor, a.rope_low_freq_factor, a.rope_high_freq_factor,
                a.rope_original_max_position) == ("llama3", factor, 1.0, 4.0, 8192)
        with torch.device("meta"):
            assert sum(p.numel() for p in Transformer(a).parameters()) == n == param_counts(a)[0], flavor
