"""Summary table of scripts/gpu_check.sh's results: python scripts/gpu_summary.py OUT_DIR LOG_DIR."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict | None:
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None


def main(out: Path, logs: Path) -> None:
    rows = []
    # ours vs the anchor, each pair from the same call: (our file, anchor folder, what)
    pairs = (("ours_s8192", "anchor_s8192", "S=8192, no AC"), ("ours_s16384_fullac", "anchor_s16384_fullac",
             "S=16384, full AC"), ("ours_s32768_fullac", "anchor_s32768_fullac", "S=32768, full AC"))
    for name, anchor, what in pairs:
        ours, tt = load(out, f"{name}.json"), load(out / anchor, "anchor_torchtitan.json")
        if ours:
            rows.append((f"train 8B/4 layers {what} (ours, compiled)",
                         f"{ours['tok_s']:,} tok/s, MFU {ours.get('mfu_causal_pct')}% (causal count), "
                         f"peak {ours.get('peak_mem_gib')} GiB (estimated {ours.get('estimated_peak_gib')})"))
        if tt:
            rows.append((f"train 8B/4 layers {what} (TorchTitan 0.2.2, compiled)",
                         f"{tt['tt_compiled_tok_s']:,} tok/s, peak {tt['tt_compiled_peak_gib']} GiB"))
        if ours and tt:
            rows.append((f"ratio ours / TorchTitan, {what} (same call)",
                         f"{ours['tok_s'] / tt['tt_compiled_tok_s']:.3f}"))
    base = load(out, "ours_s8192.json")
    for name, what in (("ablate_eager_loss", "eager cross-entropy"),
                       ("ablate_foreach", "foreach AdamW, clip then step"),
                       ("ablate_reshard", "reshard after forward always"),
                       ("ablate_host_syncs", "three extra host syncs per step")):
        r = load(out, f"{name}.json")
        if r and base:
            rows.append((f"train S=8192, {what} (undoing one change)",
                         f"{r['tok_s']:,} tok/s = {r['tok_s'] / base['tok_s']:.3f} of the default"))
    for f in sorted(out.glob("long_*.json")) + sorted(out.glob("whole_*.json")):
        r = json.loads(f.read_text())
        rows.append((f"{f.stem}: {r['flavor']} x {r['n_layers']} layers, S={r['seq_len']:,}",
                     f"{r['tok_s']:,} tok/s, peak {r.get('peak_mem_gib')} GiB (estimated "
                     f"{r.get('estimated_peak_gib')}), host RSS {r.get('host_rss_gib')} GiB, loss {r['loss']}"))
    for r in load(out, "block_mask.json") or []:
        rows.append((f"document BlockMask S={r['seq']:,} ({r['mode']} create_block_mask)",
                     r.get("error") or f"{r['first_s']} s first, {r['second_s']} s next, peak {r['peak_gib']} GiB"))
    mem = load(out, "memory.json")
    if mem:
        rows.append(("estimated vs measured peak memory", json.dumps(mem)[:300]))
    for r in load(out, "parity.json") or []:
        errors = r.get("error") or ", ".join(f"{k} {r[k]:.1e}" for k in ("out", "dq", "dk", "dv"))
        rows.append((f"parity {r['strategy']} {r['dtype']} documents={r['documents']}",
                     f"{'ok' if r['ok'] else 'FAILED'} ({errors})"))
    cp = load(out, "cp_attention.json")
    if cp and "full_sequence" in cp:
        full = cp["full_sequence"]["tflops_fwd_bwd"]
        for r in cp.get("ring", []):
            rows.append((f"ring attention S={cp['shape']['seq_len']:,} P={r['cp']} headtail={r['headtail']}",
                         f"{r['tflops_per_rank_fwd_bwd']:.0f} TFLOP/s per rank = "
                         f"{r['tflops_per_rank_fwd_bwd'] / full:.2f}"
                         f" of full attention ({full:.0f})"))
    for name in sorted(logs.glob("*.log")):
        text = name.read_text(errors="replace").strip()
        if "Traceback" in text:
            rows.append((f"{name.stem}: FAILED", text.splitlines()[-1][:200]))
    print("| check | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
