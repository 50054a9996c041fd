"""The README's first command on a distribution's externally managed Python (PEP 668): pip refuses to
install, so run_train.sh makes a project-local .venv (the system's packages visible), says so, trains,
and later runs reuse it. Simulated without downloading anything: a python3 first on PATH whose
`pip install` fails with pip's PEP 668 error and which lacks one dependency (tiktoken)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PEP_668 = """error: externally-managed-environment

x This environment is externally managed
-> To install Python packages system-wide, try apt install
   python3-xyz, where xyz is the package you are trying to
   install.
"""


def test_externally_managed_python_gets_a_project_venv(tmp_path: Path) -> None:
    repo = tmp_path / "repo"  # a fresh clone's files
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(".git", "outputs", ".venv", "__pycache__",
                                                              "*.egg-info", ".pytest_cache"))
    hide, bin_dir = tmp_path / "hide", tmp_path / "bin"
    hide.mkdir()
    bin_dir.mkdir()
    (hide / "tiktoken.py").write_text('raise ImportError("not installed for this system Python")\n')
    (tmp_path / "pep668.txt").write_text(PEP_668)
    wrapper = bin_dir / "python3"
    wrapper.write_text(f"""#!/bin/bash
if [ "$1 $2 $3" = "-m pip install" ]; then cat {tmp_path / "pep668.txt"} >&2; exit 1; fi
PYTHONPATH="{hide}${{PYTHONPATH:+:$PYTHONPATH}}" exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    drop = ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "PYTHONPATH", "NGPU", "LOG_RANK", "SHUTDOWN_TIMEOUT")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "NGPU": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(repo / "run_train.sh"), "--training.steps", "2", "--metrics.enable_tensorboard", "false"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"is externally managed (PEP 668): creating {repo / '.venv'}" in r.stderr, r.stderr[-3000:]
    assert "installing -e" in r.stderr and "missing: tiktoken; this package's dependencies" in r.stderr
    assert "step     2/2" in r.stdout
    assert (tmp_path / "outputs" / "debug" / "metrics.jsonl").exists()  # the recipe's ./outputs/debug

    # the next run reuses it (what run_train.sh and .ci/run source to pick their Python)
    r = subprocess.run(["bash", "-c", f'REPO={repo}; source {repo}/scripts/python_env.sh; echo "$PYTHON"'],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout == f"{repo / '.venv'}/bin/python\n" and r.stderr.startswith("[bash] using "), r.stderr
    # ... unless another environment is active
    r = subprocess.run(["bash", "-c", f'REPO={repo}; source {repo}/scripts/python_env.sh; echo "$PYTHON"'],
                       env={**env, "VIRTUAL_ENV": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert r.stdout == "python3\n" and r.stderr == ""
