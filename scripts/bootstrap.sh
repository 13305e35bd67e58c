#!/usr/bin/env bash
# Prepare this checkout on Debian/Ubuntu: the system packages pyfuse3 and the tests need, then
# .venv with cssfs (editable) and its dev tools. Idempotent: a second run installs nothing new.
#
#   bash scripts/bootstrap.sh        # as root, or as a user with sudo
#
# PYTHON=/path/to/python3.12 picks the interpreter (default: the newest python3 >= 3.11 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'bootstrap: %s\n' "$*" >&2; }

# -- system packages ------------------------------------------------------------------------
packages=(fuse3 libfuse3-dev pkg-config python3-venv python3-dev gcc rsync attr)
if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for pkg in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [ "$(id -u)" -eq 0 ]; then
            sudo=()
        elif command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            say "need root or sudo to install: ${missing[*]}"
            exit 1
        fi
        say "installing ${missing[*]}"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    fi
else
    say "not a Debian system: make sure these (or their equivalents) are installed: ${packages[*]}"
fi

# -- python and the virtualenv --------------------------------------------------------------
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

python=${PYTHON:-}
if [ -z "$python" ]; then
    for candidate in python3.14 python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && new_enough "$candidate"; then
            python=$candidate
            break
        fi
    done
fi
if [ -z "$python" ] || ! new_enough "$python"; then
    say "cssfs needs Python >= 3.11; none found on PATH (set PYTHON=...)"
    exit 1
fi

if [ ! -x .venv/bin/python ] || ! new_enough .venv/bin/python; then
    say "creating .venv with $("$python" --version 2>&1)"
    rm -rf .venv
    "$python" -m venv .venv
fi

# Reinstall only when the dependencies or the interpreter changed since the last run.
stamp=.venv/.cssfs-bootstrap
want=$( { cat pyproject.toml; .venv/bin/python --version; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c 'import cssfs' 2>/dev/null; then
    say "installing cssfs and its dev tools into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    echo "$want" >"$stamp"
fi
# An editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE set (as in some CI
# images) every `cssfs` command would compile its modules again: ~0.1 s per command. pip does
# this for a normal install.
PYTHONDONTWRITEBYTECODE= .venv/bin/python -m compileall -q cssfs >/dev/null
say "ready: .venv/bin/cssfs"
