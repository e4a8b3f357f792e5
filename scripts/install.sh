#!/usr/bin/env bash
# Install fairseq_ext and its pinned dependencies into ./.venv (or $VENV) from nothing.
# torch first (the CPU wheel on disk here), then the pins (constraints.txt fixes every transitive
# dependency too), then fairseq without its torchaudio
# requirement (see requirements.txt), then this package in editable mode.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -r requirements.txt -c constraints.txt
"${PIP[@]}" --no-deps ve-fairseq==0.12.3
"${PIP[@]}" --no-deps -e .
# the package's bytecode written once: with PYTHONDONTWRITEBYTECODE=1 every process would compile it again
"$VENV/bin/python" -m compileall -q fairseq_ext scripts
"$VENV/bin/python" -c "import fairseq, fairseq_ext, transformers, torch; print('installed: torch', torch.__version__, \
'| transformers', transformers.__version__, '| fairseq', fairseq.__version__)"
