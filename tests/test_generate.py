"""Generation: the KV-cached decoder equals recomputing the whole sequence, token for token; the CLI
loads a DCP checkpoint and a model.pt alike and streams the text."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchtitan_sp.data.tokenizer import Tokenizer
from torchtitan_sp.generate import generate, main
from torchtitan_sp.models.llama3 import Transformer, init_weights, model_args

REPO = Path(__file__).resolve().parent.parent


def debug_model(seed: int = 3) -> Transformer:
    model = Transformer(model_args("debug"))
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
