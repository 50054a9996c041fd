"""Validation and the passkey probe: one process against cp 2 (every strategy), dp 2 and tp 2 on packed
documents; training unchanged by validation; a passkey probe that reports success for a model that
solves it and failure for a random one; bad input."""

from __future__ import annotations

import json
import math
import random
import struct
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.tensor import DTensor

from tests.dist_utils import run_distributed
from tests.trainer_utils import read_metrics
from torchtitan_sp.config import load_config
from torchtitan_sp.data.tokenizer import Tokenizer
from torchtitan_sp.evaluate import batches, position_buckets, validation_samples
from torchtitan_sp.models.llama3 import FLAVORS, Transformer, init_weights
from torchtitan_sp.passkey import filler_tokens, make_trial
from torchtitan_sp.rules import load_and_validate, validate
from torchtitan_sp.train import Trainer

REPO = Path(__file__).resolve().parent.parent
WORDS = "the of and to in is for on with as by at from this that which be or are".split()


def corpus(folder: Path) -> Path:
    """Held-out documents from 20 to ~700 tokens: packed windows of 256 hold several, and positions
    reach every bucket (0, 128)."""
    docs = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(5 + (97 * i) % 400)) for i in range(15)]
    path = folder / "heldout.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def passkey_model(path: Path) -> None:
    """The debug model trained briefly (60 steps, ~6 s) on passkey haystacks of 48 and 64 tokens with a
    one-digit key: a model that can solve the probe. Loss on the key's tokens only."""
    torch.manual_seed(0)
    tok = Tokenizer(REPO / "assets/tokenizer/tokenizer.model")
    filler = filler_tokens(tok, None, 0)
    model = Transformer(FLAVORS["debug"])
    init_weights(model, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    rng = random.Random(1)
    for _ in range(60):
        n = rng.choice([48, 64])
        trials = [make_trial(tok, filler, n, rng.random(), str(rng.randrange(10)), rng.randrange(len(filler)))
                  for _ in range(16)]
        b = {k: torch.stack([t[k] for t in trials]) for k in trials[0]}
        scored = b["labels"] != -100
        h = model.hidden_states(b["tokens"], b["positions"])[scored]
        loss = F.cross_entropy(model.output(h), b["labels"][scored])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), path)


def common(tmp: Path, validation: bool = True) -> list[str]:
    """Every run's keys; without validation none of its keys (set alone, they are rejected)."""
    train = ["--training.seq_len", "64", "--training.local_batch_size", "2", "--metrics.log_freq", "1",
             "--metrics.enable_tensorboard", "false"]
    return train + validation * [
        "--validation.enable", "true", "--validation.dataset_path", str(tmp / "heldout.jsonl"),
        "--validation.seq_len", "256", "--validation.local_batch_size", "2", "--passkey.lengths", "48,64",
        "--passkey.depths", "0,0.5,1", "--passkey.digits", "1", "--passkey.trials", "4"]


def run_all(rank: int, world: int, tmp: str, runs: dict[str, list[str]]) -> dict[str, list[dict]]:
    """Each run's Trainer in turn on this process group; rank 0 returns each run's metrics rows, and
    under "kept" the runs after which some parameter was left gathered (not FSDP's sharded DTensor)
    or holding a gradient."""
    out: dict = {"kept": []}
    for name, argv in runs.items():
        cfg = load_config([*common(Path(tmp), validation=name != "train_off"), "--job.dump_folder", f"{tmp}/{name}",
                           *argv])
        trainer = Trainer(cfg, validate(cfg, world))
        trainer.train()
        if any(not isinstance(p, DTensor) or p.grad is not None for p in trainer.model.parameters()):
            out["kept"].append(name)
        dist.barrier()
        out[name] = read_metrics(cfg.job.dump_folder) if rank == 0 else None
    return out


def direct_validation(tmp: str) -> dict:
    """val_loss and loss by position computed without the trainer: plain model, every batch whole."""
    cfg = load_config([*common(Path(tmp)), "--job.dump_folder", f"{tmp}/direct"])
    model = Transformer(FLAVORS["debug"])
    model.load_state_dict(torch.load(f"{tmp}/passkey.pt", weights_only=True))
    starts = position_buckets(256)
    sums, counts = [0.0] * len(starts), [0] * len(starts)
    with torch.no_grad():
        for b in batches(validation_samples(cfg, 2048, 0, 1), 2, -1):
            logits = model(b["tokens"], b["positions"], b["document_ids"])
            loss = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none").view_as(b["labels"])
            for lab, pos, x in zip(b["labels"].flatten(), b["positions"].flatten(), loss.flatten()):
                if lab != -100:
                    i = max(j for j, s in enumerate(starts) if s <= pos)
                    sums[i] += x.item()
                    counts[i] += 1
    return {"val_loss": sum(sums) / sum(counts),
            "by_position": {str(s): x / c for s, x, c in zip(starts, sums, counts)}}


def train_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "loss" in r]


def val_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "val_loss" in r]


def close(a: float, b: float, rtol: float = 1e-5) -> bool:
    return abs(a - b) <= rtol * abs(b)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("eval")
    corpus(tmp)
    passkey_model(tmp / "passkey.pt")
    load = ["--validation.eval_only", "true", "--checkpoint.initial_load_path", str(tmp / "passkey.pt")]
    ref = run_distributed(run_all, 1, str(tmp), {"ref": [*load, "--metrics.enable_tensorboard", "true"],
                                                 "random": ["--validation.eval_only", "true"]})[0]
    return tmp, ref


def test_reference_and_passkey(setup):
    """One process: the trainer's validation equals a direct computation; the trained model passes the
    probe, the random one does not; passkey.json and a valid PNG are written."""
    tmp, ref = setup
    (row,) = ref["ref"]
    assert row["step"] == 0
    direct = direct_validation(str(tmp))
    assert close(row["val_loss"], direct["val_loss"]) and close(row["val_ppl"], math.exp(direct["val_loss"]))
    assert row["val_loss_by_position"].keys() == direct["by_position"].keys() == {"0", "128"}
    for k, x in direct["by_position"].items():
        assert close(row["val_loss_by_position"][k], x)
    trained = [x for cell in row["passkey_accuracy"].values() for x in cell.values()]
    random_ = [x for cell in ref["random"][0]["passkey_accuracy"].values() for x in cell.values()]
    assert row["passkey_accuracy"].keys() == {"48", "64"} and len(trained) == 6
    assert sum(trained) / 6 >= 0.75 and max(random_) <= 0.25, (trained, random_)
    saved = json.loads((tmp / "ref/passkey/passkey.json").read_text())
    assert saved["accuracy"] == row["passkey_accuracy"] and saved["step"] == 0
    check_png((tmp / "ref/passkey/passkey.png").read_bytes())
    (run,) = (tmp / "ref/tb").iterdir()  # one run subfolder per fresh start
    events = EventAccumulator(str(run), size_guidance={"images": 1})
    events.Reload()
    assert {"val/loss", "val/ppl", "val/loss_by_position/0000128"} <= set(events.Tags()["scalars"])
    assert events.Images("val/passkey")[0].encoded_image_string == (tmp / "ref/passkey/passkey.png").read_bytes()


def check_png(png: bytes) -> None:
    """Signature, every chunk's CRC, and IDAT inflating to height rows of 1 + 3 x width bytes."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    i, chunks = 8, {}
    while i < len(png):
        (n,) = struct.unpack(">I", png[i:i + 4])
        kind, data = png[i + 4:i + 8], png[i + 8:i + 8 + n]
        assert struct.unpack(">I", png[i + 8 + n:i + 12 + n])[0] == zlib.crc32(kind + data)
        chunks[kind] = chunks.get(kind, b"") + data
        i += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and colour == 2 and w > 50 and h > 30
    assert len(zlib.decompress(chunks[b"IDAT"])) == h * (1 + 3 * w) and b"IEND" in chunks


def test_parallel_equals_one_process(setup):
    """cp 2 under every strategy (head-tail), dp 2 (uneven shares of the set) and tp 2: the same
    val_loss, loss by position and passkey accuracy as one process, evaluating a loaded model
    (eval_only); and training with validation every 2 steps logs exactly the losses of training without."""
    tmp, ref = setup
    load = ["--validation.eval_only", "true", "--checkpoint.initial_load_path", str(tmp / "passkey.pt")]
    cp = ["--parallelism.context_parallel_degree", "2", "--parallelism.context_parallel_strategy"]
    runs = {"ring": [*load, *cp, "ring"], "ulysses": [*load, *cp, "ulysses"], "allgather": [*load, *cp, "allgather"],
            "usp": [*load, *cp, "usp", "--parallelism.context_parallel_ulysses_degree", "2"],
            "dp2": load, "tp2": [*load, "--parallelism.tensor_parallel_degree", "2"]}
    train = ["--training.steps", "4", "--parallelism.context_parallel_degree", "2", "--training.dataset", "files",
             "--training.dataset_path", str(tmp / "heldout.jsonl")]
    runs["train_off"] = train  # run_all leaves the validation keys out
    runs["train_on"] = [*train, "--passkey.lengths", "", "--passkey.depths", "0,0.25,0.5,0.75,1",
                        "--passkey.digits", "5", "--passkey.trials", "4", "--validation.freq", "2",
                        "--validation.steps", "2"]
    got = run_distributed(run_all, 2, str(tmp), runs)[0]
    assert got["kept"] == [], got["kept"]  # nothing of an evaluation stays in memory
    (want,) = ref["ref"]
    for name in ("ring", "ulysses", "allgather", "usp", "dp2", "tp2"):
        (row,) = got[name]
        assert close(row["val_loss"], want["val_loss"]), (name, row["val_loss"], want["val_loss"])
        assert row["val_loss_by_position"].keys() == want["val_loss_by_position"].keys()
        for k, x in want["val_loss_by_position"].items():
            assert close(row["val_loss_by_position"][k], x), (name, k)
        assert row["passkey_accuracy"] == want["passkey_accuracy"], name
    on, off = got["train_on"], got["train_off"]
    assert [r["loss"] for r in train_rows(on)] == [r["loss"] for r in train_rows(off)]
    assert [r["step"] for r in val_rows(on)] == [2, 4] and not val_rows(off)


@pytest.mark.parametrize("extra, message", [
    (["--validation.dataset_path", "/nonexistent/heldout"], "validation.dataset_path: no such file or folder"),
    (["--validation.dataset_path", ""], "validation.dataset_path: required"),
    (["--passkey.lengths", "50"], "passkey.lengths: 50 is not divisible by 2 x cp x tp = 4"),
    (["--passkey.depths", "0,1.5"], "passkey.depths: 1.5 is outside 0..1"),
    (["--passkey.lengths", "16"], "passkey.lengths: 16 tokens cannot hold the key"),
    (["--validation.enable", "false", "--validation.eval_only", "true"],
     "validation.eval_only = true has no effect without validation.enable = true"),
    (["--validation.dataset", "synthetic", "--validation.dataset_path", ""],
     "validation.steps: -1 (the whole set) needs a finite dataset"),
])
def test_bad_input(tmp_path, capsys, extra, message):
    corpus(tmp_path)
    argv = [*common(tmp_path), "--job.dump_folder", str(tmp_path / "d"), "--parallelism.context_parallel_degree",
            "2", *extra]
    with pytest.raises(SystemExit) as e:
        load_and_validate(argv, world_size=2)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
