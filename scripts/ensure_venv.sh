#!/usr/bin/env bash
# ensure_venv.sh VENV PYTHON_VERSION CONSTRAINTS "PIP ARGS..."
# Creates VENV with Python PYTHON_VERSION (from $PYTHON, PATH or pyenv) when missing, and installs the pinned
# stack once: a stamp keyed on the constraints, setup.py and the pip arguments makes later runs skip pip
# entirely, so a second `make test` starts testing within seconds.
set -euo pipefail
venv=$1; want=$2; constraints=$3; pip_args=$4

find_python() {
  local c
  for c in "${PYTHON:-}" "python$want" "$(command -v pyenv >/dev/null 2>&1 && pyenv root || echo "$HOME/.pyenv")"/versions/"$want".*/bin/python"$want"; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$want'.split('.')))" 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

stamp="$venv/.gift_megatron_stamp"
key=$(cat "$constraints" setup.py <(echo "$pip_args") | sha256sum | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  py=$(find_python) || {
    echo "error: Python $want not found (looked at \$PYTHON, python$want on PATH and pyenv's versions)." >&2
    echo "       Install it (for example: pyenv install $want) or run with PYTHON=/path/to/python$want." >&2
    exit 1
  }
  echo "creating $venv with $py"
  "$py" -m venv "$venv"
fi
echo "installing the pinned stack into $venv (once)"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install --quiet -c "$constraints" $pip_args
echo "$key" > "$stamp"
