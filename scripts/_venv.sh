# Sourced by scripts/*: create or reuse .venv and install the project into it, with the
# versions pinned in constraints.txt. RELAY_EXTRAS (set before sourcing) picks the extras:
# "" installs what serving needs (scripts/serve), "dev" adds the test tools (the default).
# Does not change directory: paths the user gives a script resolve where the user stands.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
EXTRAS="${RELAY_EXTRAS-dev}"
_relay_fresh() {  # the stamp exists and is newer than what the install depends on
    [ -f "$1" ] && [ "$1" -nt "$ROOT/pyproject.toml" ] && [ "$1" -nt "$ROOT/constraints.txt" ]
}
if [ -n "$EXTRAS" ]; then
    _relay_target="$ROOT[$EXTRAS]"; _relay_stamp="$VENV/.relay-installed-$EXTRAS"
else
    _relay_target="$ROOT"; _relay_stamp="$VENV/.relay-installed"
fi
if ! _relay_fresh "$_relay_stamp" && ! { [ -z "$EXTRAS" ] && _relay_fresh "$VENV/.relay-installed-dev"; }; then
    echo "relay: installing into $VENV (${EXTRAS:-serving only}; the first time takes a while)" >&2
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$_relay_target"
    touch "$_relay_stamp"
fi
export PATH="$VENV/bin:$PATH"
