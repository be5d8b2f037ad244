#!/usr/bin/env bash
# Prints the path of a Python with llmq and its dependencies installed.
# The virtualenv lives outside the clone, keyed by a hash of pyproject.toml, so repeated
# runs (and CI) reuse it; on a fresh machine it is built from nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
key="$( (cat "$root/pyproject.toml"; echo torch==2.13.0) | sha256sum | cut -c1-16)"
venv="${LLMQ_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/llmq/venv-$key}"
if [ ! -f "$venv/.llmq-complete" ]; then
  echo "llmq: building virtualenv $venv (first run only)" >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  # Pinned CPU build first: an unpinned torch would pull several GB of CUDA packages.
  "$venv/bin/python" -m pip install -q torch==2.13.0 >&2
  "$venv/bin/python" -m pip install -q -e "$root[test]" >&2
  touch "$venv/.llmq-complete"
fi
# The editable install must point at *this* checkout (CI clones elsewhere each time).
if ! (cd / && "$venv/bin/python" -c "import llmq, sys; sys.exit(0 if llmq.__file__.startswith('$root/') else 1)") 2>/dev/null; then
  "$venv/bin/python" -m pip install -q --no-deps -e "$root" >&2
fi
echo "$venv/bin/python"
