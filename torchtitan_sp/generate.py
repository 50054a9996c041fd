"""Sample text from the recipe's model on one process (CPU or one GPU), with a KV cache:

    python3 -m torchtitan_sp.generate --config debug_model.toml --checkpoint.initial_load_path PATH \\
        --prompt "def fib(n):" --max_new_tokens 64 [--temperature 0.8 --top_p 0.9 --seed 0]

PATH: a DCP checkpoint folder (step-N) or an exported model.pt. Temperature 0 (the default) is
greedy decoding. Tokens stream to stdout as they are decoded; generation stops at
<|end_of_text|> or <|eot_id|>. Every other --section.key sets the recipe as for training (the
model's flavor, n_layers and tokenizer matter here).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from torchtitan_sp.config import ConfigError, load_config, resolve_repo_path
from torchtitan_sp.data.text import load_tokenizer
from torchtitan_sp.hf_checkpoint import load_hf_weights
from torchtitan_sp.models.llama3 import ModelArgs, Transformer, apply_rope, rope_angles
from torchtitan_sp.models.shape import model_args

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys, values (B, Hkv, T, D)


def load_weights(model: Transformer, path: Path, args: ModelArgs) -> None:
    """Model weights from a DCP checkpoint folder, an exported model.pt or a Hugging Face folder."""
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    elif (path / ".metadata").is_file():
        import torch.distributed.checkpoint as dcp
        state = {"model": model.state_dict()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
        model.load_state_dict(state["model"])
    elif (path / "config.json").is_file():  # a Hugging Face folder (model.flavor hf names its shape)
        with warnings.catch_warnings():  # DCP's single-process note, as above
            warnings.simplefilter("ignore", UserWarning)
            load_hf_weights(model, path, args)
    else:
        raise ConfigError(f"checkpoint.initial_load_path: {path} is neither a DCP checkpoint folder (with .metadata), "
                          "a model.pt file nor a Hugging Face folder (with config.json)")


@torch.no_grad()
def forward_cached(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits of the last token of `tokens` (B, T), which follow the cache's tokens; appends their K/V."""
    start = cache[0][0].shape[2] if cache else 0
    t = tokens.shape[1]
    positions = torch.arange(start, start + t, device=tokens.device).expand(tokens.shape[0], -1)
    cos, sin = rope_angles(positions, model.args)
    # Query i (at start + i) sees keys 0 .. start + i; with T = 1 that is every key.
    mask = torch.ones(t, start + t, dtype=torch.bool, device=tokens.device).tril(start)
    h = model.tok_embeddings(tokens)
    for i, layer in enumerate(model.layers.values()):
        a, x = layer.attention, layer.attention_norm(h)
        q = apply_rope(a.wq(x).view(*tokens.shape, -1, a.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(a.wk(x).view(*tokens.shape, -1, a.head_dim), cos, sin).transpose(1, 2)
        v = a.wv(x).view(*tokens.shape, -1, a.head_dim).transpose(1, 2)
        if len(cache) > i:
            k, v = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], v], dim=2)
            cache[i] = (k, v)
        else:
            cache.append((k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        h = h + a.wo(out.transpose(1, 2).reshape(*tokens.shape, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h[:, -1:]))[:, -1]


@torch.no_grad()
def forward_full(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the last token, recomputing the whole sequence (the reference for the cache)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    return model(tokens, positions)[:, -1]


def pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0; else a sample from the smallest set of tokens holding top_p of the mass."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is full
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_p, 1, generator=gen)
    return order.gather(-1, choice)[:, 0]


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, stop: set[int], temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, use_cache: bool = True) -> Iterator[int]:
    """Yield up to max_new_tokens token ids after `prompt` (one sequence), ending after a stop token."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    tokens = torch.tensor([prompt], device=device)
    cache: KVCache = []
    step: Callable[[torch.Tensor], torch.Tensor] = (
        (lambda new: forward_cached(model, new, cache)) if use_cache else (lambda new: forward_full(model, tokens)))
    new = tokens
    for _ in range(max_new_tokens):
        nxt = pick(step(new), temperature, top_p, gen)
        yield int(nxt)
        if int(nxt) in stop:
            return
        new = nxt[:, None]
        tokens = torch.cat([tokens, new], dim=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args, overrides = ap.parse_known_args(argv)
    try:
        if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ConfigError("--max_new_tokens >= 1, --temperature >= 0 and --top_p in (0, 1] are required")
        cfg = load_config(overrides)
        path = cfg.checkpoint.initial_load_path
        if not path:
            raise ConfigError("checkpoint.initial_load_path: give the weights to sample from (a DCP step-N folder "
                              "or a model.pt)")
        tokenizer = load_tokenizer(cfg)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with torch.device("meta"):
            shape = model_args(cfg.model)
            model = Transformer(shape)
        model.to_empty(device="cpu")
        model.tie_weights()
        load_weights(model, resolve_repo_path(path), shape)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    model.to(device).eval()
    stop = {tokenizer.eos_id, tokenizer.special_tokens["<|eot_id|>"]}
    out: list[int] = []
    shown = ""
    sys.stdout.write(args.prompt)
    for tok in generate(model, tokenizer.encode(args.prompt, bos=True, eos=False), args.max_new_tokens, stop,
                        args.temperature, args.top_p, args.seed):
        if tok in stop:
            break
        out.append(tok)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # a character's bytes may span tokens: wait for the rest
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(out)[len(shown):] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
