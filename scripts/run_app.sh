#!/usr/bin/env bash
# `make run`: the demo stores' first seeds (minutes), the rest of both builds in the
# background, the intervention server on 127.0.0.1 with a fresh token, then the app.
# Stopping the app (Ctrl-C) stops the server and the background builds; a build stopped
# part-way resumes at the next `make run` (or `make demo`).
set -euo pipefail

PY=${PY:-.venv/bin/python}
CACHE=${CACHE:-cache}
SEEDS=${SEEDS:-0-49}
PORT=${PORT:-8765}
FIRST_SEEDS=${FIRST_SEEDS:-4}
MODEL=${MODEL:-smollm2-135m}  # the embedded model; another spec for a quick trial

build() {  # build DATASET N_EXAMPLES [extra args]: a finished store is left alone, a partial one resumes
    "$PY" -m cache_builder build --model "$MODEL" --dataset "$1" --n-examples "$2" --seeds "$SEEDS" \
        --out "$CACHE" "${@:3}"
}

mkdir -p "$CACHE"
build friedman2 25 --max-seeds "$FIRST_SEEDS"
build linear-ni11 20 --max-seeds "$FIRST_SEEDS"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null || true  # the job's process group: its children too
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

set -m  # each background job in its own process group, so that cleanup reaches its children
(build friedman2 25 --quiet && build linear-ni11 20 --quiet) >>"$CACHE/build.log" 2>&1 &
pids+=($!)
echo "building the rest of seeds $SEEDS in the background (log: $CACHE/build.log)"

token_file="$CACHE/server.token"
rm -f "$token_file"
(umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$token_file")
token=$(cat "$token_file")
"$PY" -m cache_builder serve --model "$MODEL" --cache "$CACHE" --host 127.0.0.1 --port "$PORT" \
    --token-file "$token_file" >>"$CACHE/server.log" 2>&1 &
server=$!
pids+=("$server")
set +m
echo "intervention server: http://127.0.0.1:$PORT (token in $token_file, log: $CACHE/server.log)"

# Wait for the server's model to load (the app works without it, minus live interventions).
for _ in $(seq 120); do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "the intervention server did not start: $(tail -n 1 "$CACHE/server.log")" >&2
        break
    fi
    if "$PY" -c "import httpx, sys; httpx.get('http://127.0.0.1:$PORT/health', timeout=1).raise_for_status()" \
        2>/dev/null; then
        break
    fi
    sleep 1
done

WORKBENCH_CACHE="$CACHE" WORKBENCH_SERVER="http://127.0.0.1:$PORT" WORKBENCH_TOKEN="$token" \
    "$PY" -m streamlit run app/main.py
