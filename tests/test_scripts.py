"""The benchmark and GPU-check scripts run (CPU sizes) and their outputs feed gpu_summary.py: a script
that broke would otherwise first show on the day a GPU is lent, when device minutes are scarce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def script(*args: str, timeout: int = 300) -> str:
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_benchmarks_and_summary(tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    script("scripts/bench_train.py", "--steps", "2", "--warmup", "1", "--out", str(out / "ours_s8192.json"),
           "--job.dump_folder", str(tmp_path / "dump"))
    ours = json.loads((out / "ours_s8192.json").read_text())
    assert ours["tok_s"] > 0 and ours["step_s"] > 0 and ours["device"] == "cpu"
    for ablate in ("eager_loss", "host_syncs"):  # gpu_check.sh's ablations without a config key
        script("scripts/bench_train.py", "--steps", "1", "--warmup", "0", "--ablate", ablate, "--out",
               str(out / f"ablate_{ablate}.json"), "--job.dump_folder", str(tmp_path / "dump"))
    (out / "anchor_s8192").mkdir()  # what the anchor writes there
    (out / "anchor_s8192" / "anchor_torchtitan.json").write_text(json.dumps(
        {"tt_compiled_tok_s": ours["tok_s"] // 2, "tt_compiled_peak_gib": 1.0}))

    script("scripts/bench_eval.py", "--steps", "1", "--warmup", "1", "--out", str(out / "eval.json"),
           "--job.dump_folder", str(tmp_path / "dump_eval"))
    ev = json.loads((out / "eval.json").read_text())
    assert ev["val_tok_s"] > 0 and ev["train_tok_s"] > 0 and ev["device"] == "cpu"

    script("scripts/bench_cp_attention.py", "--small", "--cpu", "--out", str(out / "cp_attention.json"))
    assert json.loads((out / "cp_attention.json").read_text())["ring"]

    script("scripts/bench_block_mask.py", "--seq", "512", "--out", str(out / "block_mask.json"))
    eager, compiled = json.loads((out / "block_mask.json").read_text())
    assert eager["blocks"] == compiled["blocks"] > 0, (eager, compiled)

    table = script("scripts/comm_bytes.py", "--cp", "2", "--measure-seq-len", "64", "--seq-len", "1024")
    assert "ring (allgather rotate)" in table and "ulysses" in table

    (logs / "parity.log").write_text("Traceback (most recent call last):\nRuntimeError: no kernel\n")
    (out / "parity.json").write_text(json.dumps([  # what gpu_attention_parity.py writes, one case passed, one failed
        {"strategy": "allgather", "dtype": "torch.bfloat16", "documents": True, "out": 0.004, "dq": 0.005,
         "dk": 0.006, "dv": 0.004, "ok": True},
        {"strategy": "local", "dtype": "torch.float32", "documents": True, "ok": False, "error": "RuntimeError('x')"}]))
    summary = script("scripts/gpu_summary.py", str(out), str(logs))
    assert "parity allgather torch.bfloat16 documents=True | ok (out 4.0e-03, dq 5.0e-03" in summary
    assert "parity local torch.float32 documents=True | FAILED (RuntimeError('x'))" in summary
    assert f"{ours['tok_s']:,} tok/s" in summary
    ratio = ours["tok_s"] / (ours["tok_s"] // 2)
    assert f"| ratio ours / TorchTitan, S=8192, no AC (same call) | {ratio:.3f} |" in summary
    assert "train S=8192, eager cross-entropy (undoing one change)" in summary
    assert "train S=8192, three extra host syncs per step (undoing one change)" in summary
    assert "ring attention" in summary and "document BlockMask S=512" in summary
    assert "parity: FAILED | RuntimeError: no kernel" in summary
