# Sourced by run_train.sh and .ci/run (REPO set): which Python to use, and installing into it.
#
# PYTHON, if set, is used as it is. Otherwise python3: an active virtual environment's or conda
# environment's (VIRTUAL_ENV / CONDA_PREFIX), else the project's own $REPO/.venv if an earlier run created
# it, else the one on PATH. A distribution's own Python is often "externally managed" (PEP 668: on
# Debian and Ubuntu pip refuses to install into it): pip_install then creates $REPO/.venv once, with the
# system's packages visible (--system-site-packages), and installs there; later runs reuse it.

VENV="$REPO/.venv"
say() { echo "[$(basename "$0")] $*" >&2; }

if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -x "$VENV/bin/python" ]; then
        PYTHON="$VENV/bin/python"
        say "using $VENV (made because the system's Python is externally managed; to use another environment," \
            "activate it or set PYTHON=/path/to/python)"
    fi
fi

# pip_install IMPORTS WHY PIP_ARGS...: install PIP_ARGS into $PYTHON, saying what and why. IMPORTS (module
# names, or "" for always) are what the install is for: in a new $REPO/.venv, they may already be there.
pip_install() {
    local imports=$1 why=$2 log status
    shift 2
    say "installing $* into $("$PYTHON" -c 'import sys; print(sys.prefix)') ($why)"
    log=$(mktemp)
    set +e
    "$PYTHON" -m pip install --progress-bar off "$@" 2>&1 | tee "$log" >&2
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" -ne 0 ] && grep -qE "externally-managed-environment|No module named pip" "$log" &&
            [ "$PYTHON" != "$VENV/bin/python" ]; then
        # Normally without a pip of its own: the system's pip (it just answered) is visible there and installs
        # into it; this also works where the distribution splits ensurepip off (Debian's python3-venv).
        local why_venv="is externally managed (PEP 668)" venv_args=(--system-site-packages --without-pip)
        if grep -q "No module named pip" "$log"; then
            why_venv="has no pip" venv_args=(--system-site-packages)  # the venv brings its own (ensurepip)
        fi
        say "$PYTHON $why_venv: creating $VENV (the system's packages stay visible) and" \
            "installing there; later runs reuse it. To use an environment of your own, activate it or set PYTHON."
        "$PYTHON" -m venv "${venv_args[@]}" "$VENV"
        PYTHON="$VENV/bin/python"
        if [ -n "$imports" ] && "$PYTHON" -c "import $imports" 2>/dev/null; then
            status=0  # the system's packages already provide them
        else
            say "installing $* into $VENV ($why)"
            "$PYTHON" -m pip install --progress-bar off "$@" >&2 && status=0
        fi
    fi
    rm -f "$log"
    return "$status"
}
