"""PNG plots of training runs and of the memory estimator (needs matplotlib: pip install -e ".[plot]").

    python scripts/plot_metrics.py RUN [RUN ...] [--out plots]
        RUN: a dump folder (its metrics.jsonl) or a metrics.jsonl; writes loss.png, tps.png and,
        when the runs logged them, mfu.png and mem.png, one line per run.
    python scripts/plot_metrics.py --max_seq [--config llama8b_cp4.toml --section.key value ...]
        [--gpu_mem_gib 79] [--out plots]
        writes max_seq_vs_cp.png: the longest sequence the estimator fits per GPU against the cp
        degree (FSDP over max(8, cp) GPUs), one line per cp strategy and memory option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

try:
    import matplotlib
except ImportError:
    sys.exit('error: plot_metrics.py needs matplotlib, an optional extra: pip install -e ".[plot]" '
             "(or pip install matplotlib)")
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from torchtitan_sp.config import ConfigError, load_config  # noqa: E402

# torchtitan_sp.estimate (and torch) are imported for --max_seq only: plotting runs needs neither.

# metrics.jsonl key -> (file name, y-axis label)
PLOTS = {"loss": ("loss.png", "loss"), "tps": ("tps.png", "tokens/s per device"),
         "mfu": ("mfu.png", "MFU (%)"), "mem_gib": ("mem.png", "peak memory (GiB)")}
CP_DEGREES = (1, 2, 4, 8, 16, 32, 64)


def read_run(path: Path) -> tuple[str, list[dict]]:
    jsonl = path / "metrics.jsonl" if path.is_dir() else path
    name = jsonl.parent.name if jsonl.name == "metrics.jsonl" else jsonl.stem
    return name, [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]


def plot_runs(paths: list[Path], out: Path) -> list[Path]:
    """One PNG per metric that at least one run logged; returns the files written."""
    runs = [read_run(p) for p in paths]
    written = []
    for key, (fname, label) in PLOTS.items():
        series = [(name, [r["step"] for r in rows if r.get(key) is not None],
                   [r[key] for r in rows if r.get(key) is not None]) for name, rows in runs]
        if not any(steps for _, steps, _ in series):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, steps, values in series:
            if steps:
                ax.plot(steps, values, label=name)
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)
    return written


def plot_max_seq(s: Setup, gpu_mem_gib: float, out: Path) -> Path:  # noqa: F821 (imported lazily)
    """Estimated longest seq_len vs cp degree, per strategy (colour) and memory option (style)."""
    from torchtitan_sp.memory_model import max_seq_len
    from torchtitan_sp.memory_report import cp_strategies, memory_options
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["-", "--", ":", "-."]
    colours = {"ring": "tab:blue", "ulysses": "tab:orange", "usp": "tab:green",
               "allgather": "tab:red"}
    lines: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for cp in CP_DEGREES:
        world = max(8, cp)
        at_cp = dataclasses.replace(s, cp=cp, dp_shard=world // (cp * s.tp * s.dp_replicate) or 1, strategy="ring")
        for row in cp_strategies(at_cp):
            names = tuple(colours) if cp == 1 else (row.strategy,)  # cp 1 starts every line
            for option, col in memory_options(row).items():
                seq = max_seq_len(dataclasses.replace(row, ac_mode=col.ac_mode, tiles=col.tiles,
                                                      offload=col.offload), gpu_mem_gib)
                for name in names:
                    xs, ys = lines.setdefault((name, option), ([], []))
                    xs.append(cp)
                    ys.append(seq)
    options = list(dict.fromkeys(option for _, option in lines))
    for (strategy, option), (xs, ys) in lines.items():
        ax.plot(xs, [y / 1024 for y in ys], styles[options.index(option) % len(styles)], marker="o", ms=3,
                color=colours[strategy], label=f"{strategy}, {option}")
    ax.set(xscale="log", yscale="log", xlabel="context-parallel degree", ylabel="longest seq_len (K tokens)",
           title=f"Llama 3 ({s.args.n_layers} layers, dim {s.args.dim}) within {gpu_mem_gib:g} GiB per GPU")
    ax.set_xticks(CP_DEGREES, [str(c) for c in CP_DEGREES])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "max_seq_vs_cp.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=Path("plots"))
    ap.add_argument("--max_seq", action="store_true")
    ap.add_argument("--gpu_mem_gib", type=float, default=None, help="default: the estimator's (79)")
    args, overrides = ap.parse_known_args()
    for run in args.runs:
        jsonl = run / "metrics.jsonl" if run.is_dir() else run
        if not jsonl.is_file():
            print(f"error: {run}: no such {'metrics.jsonl in that folder' if run.is_dir() else 'file or folder'} "
                  "(give a run's dump folder or its metrics.jsonl)", file=sys.stderr)
            sys.exit(2)
    if args.max_seq:
        from torchtitan_sp.estimate import default_world_size
        from torchtitan_sp.memory_model import Setup
        from torchtitan_sp.memory_report import DEFAULT_GPU_MEM_GIB
        from torchtitan_sp.rules import validate
        if args.gpu_mem_gib is None:
            args.gpu_mem_gib = DEFAULT_GPU_MEM_GIB
        try:
            cfg = load_config(overrides or ["--config", "llama8b_cp4.toml"])
            setup = Setup.from_config(cfg, validate(cfg, default_world_size(cfg)))
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    written = plot_runs(args.runs, args.out) if args.runs else []
    if args.max_seq:
        written.append(plot_max_seq(setup, args.gpu_mem_gib, args.out))
    if not written:
        sys.exit("nothing to plot: give runs (dump folders or metrics.jsonl files) and/or --max_seq")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
