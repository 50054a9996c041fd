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
    ours, tt = load(out, "ours_s8192.json"), load(out, "anchor_torchtitan.json")
    if ours:
        rows.append(("train 8B/4 layers S=8192 (ours, compiled)",
                     f"{ours['tok_s']:,} tok/s, MFU {ours.get('mfu_causal_pct')}% (causal count), "
                     f"peak {ours.get('peak_mem_gib')} GiB"))
    if tt:
        key = "tt_compiled_tok_s" if "tt_compiled_tok_s" in tt else "tt_eager_tok_s"
        rows.append(("train 8B/4 layers S=8192 (TorchTitan 0.2.2)", f"{tt[key]:,} tok/s ({key})"))
        if ours:
            rows.append(("ratio ours / TorchTitan (same card, same call)", f"{ours['tok_s'] / tt[key]:.3f}"))
    noclip = load(out, "ours_s8192_noclip.json")
    if noclip:
        rows.append(("train 8B/4 layers S=8192 (ours, compiled, no clipping: the anchor's work)",
                     f"{noclip['tok_s']:,} tok/s, MFU {noclip.get('mfu_causal_pct')}%"
                     + (f", ratio to TorchTitan {noclip['tok_s'] / tt[key]:.3f}" if tt else "")))
    packed = load(out, "ours_packed_s131072.json")
    if packed:
        rows.append((f"packed text S={packed['seq_len']:,} (FlexAttention document mask, full AC)",
                     f"{packed['tok_s']:,} tok/s, peak {packed.get('peak_mem_gib')} GiB, loss {packed['loss']}"))
    long = load(out, "ours_s262144.json")
    if long:
        rows.append((f"longest run: S={long['seq_len']:,} full AC (ours)",
                     f"{long['tok_s']:,} tok/s, peak {long.get('peak_mem_gib')} GiB, loss {long['loss']}"))
    for name, what in (("ablate_reshard", "reshard after forward always"),
                       ("ablate_foreach", "foreach AdamW, clip then step")):
        r = load(out, f"{name}.json")
        if r and ours:
            rows.append((f"train S=8192, {what} (undoing one change)",
                         f"{r['tok_s']:,} tok/s = {r['tok_s'] / ours['tok_s']:.3f} of the default"))
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
