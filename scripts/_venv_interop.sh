# Sourced by scripts/test after _venv.sh: create or reuse .venv-interop, where the interop
# tests (tests/interop/) run real Pipecat bots and clients as separate processes. It is
# kept apart from .venv so the core install stays light; it is (re)installed only when
# tests/interop/requirements.txt (the pin) differs from what was last installed.
INTEROP_VENV="$ROOT/.venv-interop"
INTEROP_PIN="$ROOT/tests/interop/requirements.txt"
if [ ! -x "$INTEROP_VENV/bin/python" ]; then
    "$PY" -m venv "$INTEROP_VENV"
fi
interop_stamp="$INTEROP_VENV/.relay-interop-installed"
if ! cmp -s "$INTEROP_PIN" "$interop_stamp"; then
    echo "== installing the interop venv (.venv-interop) from tests/interop/requirements.txt"
    interop_started=$SECONDS
    "$INTEROP_VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$INTEROP_VENV/bin/python" -m pip install --quiet -r "$INTEROP_PIN"
    cp "$INTEROP_PIN" "$interop_stamp"
    echo "   installed in $((SECONDS - interop_started)) s"
fi
export RELAY_INTEROP_PYTHON="$INTEROP_VENV/bin/python"
