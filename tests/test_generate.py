"""Generation: the KV-cached decoder equals recomputing the whole sequence, token for token; the CLI
loads a DCP checkpoint and a model.pt alike and streams the text."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchtitan_sp.config import load_config
from torchtitan_sp.data.text import load_tokenizer
from torchtitan_sp.data.tokenizer import Tokenizer
from torchtitan_sp.generate import generate, load_weights, main
from torchtitan_sp.models.llama3 import FLAVORS, Transformer, init_weights
from torchtitan_sp.models.shape import model_args

REPO = Path(__file__).resolve().parent.parent


def debug_model(seed: int = 3) -> Transformer:
    model = Transformer(FLAVORS["debug"])
    init_weights(model, seed)
    return model.eval()


def test_cache_equals_recomputation():
    """Greedy decoding with the cache and without it picks the same 40 tokens after a 13-token prompt
    (the logits agree to float rounding at every step); sampling with a seed repeats itself."""
    model = debug_model()
    prompt = list(range(100, 113))
    cached = list(generate(model, prompt, 40, stop=set()))
    full = list(generate(model, prompt, 40, stop=set(), use_cache=False))
    assert cached == full and len(cached) == 40 and len(set(cached)) > 3
    sampled = [list(generate(model, prompt, 20, set(), temperature=1.0, top_p=0.9, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert list(generate(model, prompt, 20, set(), temperature=1.0, top_p=1e-6, seed=1)) == cached[:20]


def test_cli_dcp_and_model_pt(tmp_path, capsys):
    model = debug_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    outputs = []
    for path in (tmp_path / "model.pt", tmp_path / "step-1"):
        assert main(["--config", "debug_model.toml", "--checkpoint.initial_load_path", str(path),
                     "--prompt", "def fib(n):", "--max_new_tokens", "12"]) == 0
        outputs.append(capsys.readouterr().out)
    tok = Tokenizer(REPO / "assets/tokenizer/tokenizer.model")
    ids = list(generate(model, tok.encode("def fib(n):", bos=True, eos=False), 12, stop={tok.eos_id}))
    assert outputs[0] == outputs[1] == "def fib(n):" + tok.decode([i for i in ids if i != tok.eos_id]) + "\n"
    assert main(["--config", "debug_model.toml", "--prompt", "x"]) == 2
    assert "checkpoint.initial_load_path: give the weights" in capsys.readouterr().err


def test_hf_folder_greedy_equals_transformers(tmp_path: Path, capsys) -> None:
    """A Hugging Face folder (flavor hf) loads into generate; its greedy continuation, token for token,
    is what transformers' own greedy `generate` gives for the same weights and prompt ids."""
    from transformers import LlamaForCausalLM

    from tests.test_hf_checkpoint import make_hf_folder
    folder = make_hf_folder(tmp_path / "hf", tied=True)
    argv = ["--model.flavor", "hf", "--model.hf_assets_path", str(folder), "--checkpoint.initial_load_path",
            str(folder), "--checkpoint.initial_load_in_hf", "true"]
    cfg = load_config(argv)
    ids = load_tokenizer(cfg).encode("the cat sat on", bos=True, eos=False)
    with torch.device("meta"):
        model = Transformer(model_args(cfg.model))
    model.to_empty(device="cpu")
    model.tie_weights()
    load_weights(model, folder, model_args(cfg.model))
    ours = list(generate(model.eval(), ids, 12, stop=set()))
    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                         pad_token_id=0)[0, len(ids):].tolist()
    assert ours == theirs, (ours, theirs)
    assert main([*argv, "--prompt", "the cat sat on", "--max_new_tokens", "4"]) == 0  # the CLI path too
    assert capsys.readouterr().out.startswith("the cat sat on")
