#!/usr/bin/env bash
# benches/instructions.sh — instructions per request, counted by callgrind: a figure that does
# not move with the machine's load, for attributing fhirgate's cost and for A/B of one change.
#
# What it does, on 127.0.0.1, cleaning up every process on exit:
#   1. starts a static nginx "FHIR server" with the Patient of benches/load.sh;
#   2. starts each proxy of PROXIES under `valgrind --tool=callgrind` with instrumentation off
#      (1 thread: callgrind runs the threads one at a time anyway):
#        pingora   the plain pass-through of benches/pingora_baseline.rs (sent a Bearer header
#                  of fg's token's length, BASELINE_HEADER, so both read the same bytes)
#        pingora-to the same with the upstream timeouts fhirgate sets (PINGORA_BASELINE_TIMEOUTS=1)
#        fg        `fhirgate serve` ($FHIRGATE_BIN), GET Patient/p1 with a cached Bearer token
#        fg-b      the same with $FHIRGATE_BIN_B (an A/B of two builds)
#        fg-meta   `fhirgate serve`, the public GET metadata (answered from memory)
#   3. warms each up with WARMUP requests on one kept-alive connection, switches instrumentation
#      on, zeroes the counters, sends N more and dumps; the instructions counted divided by N are the
#      proxy's instructions per request (both of its sides: the client's and the upstream's
#      connection, the hooks and everything pingora does around them);
#   4. prints the table, and with TOP=K the K functions with the most instructions per proxy,
#      inclusive and exclusive (callgrind_annotate), to see where fhirgate's own instructions go.
#
# Usage (from the repo root, after `cargo build --release --bin fhirgate --bench pingora_baseline`):
#   benches/instructions.sh
#   N=2000 TOP=40 PROXIES="pingora fg" benches/instructions.sh
#   FHIRGATE_BIN_B=/tmp/fhirgate-before PROXIES="fg fg-b" benches/instructions.sh
# Environment: N [1000] · WARMUP [200] · PROXIES ["pingora fg fg-meta"] · TOP [0] · KEEP_TMP [0]
#   AUDIT [1] 1 = fhirgate writes its audit record per request (info, JSON, as operators run
#   it and as benches/load.sh measures it; the writer thread's instructions count too), 0 = not
#   BASELINE_HEADER [an Authorization: Bearer of 530 characters, about fg's token] a header the
#   pingora cases send with each request ("Name: value"), so they read the request bytes fg
#   reads; set it empty for none
#   BASE_PORT [18280] · FHIRGATE_BIN [$CARGO_TARGET_DIR/release/fhirgate] · FHIRGATE_BIN_B
#   PINGORA_BASELINE_BIN [newest $CARGO_TARGET_DIR/release/deps/pingora_baseline-*]
# Needs: valgrind, nginx, curl, python3.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-1000}
WARMUP=${WARMUP:-200}
PROXIES=${PROXIES:-"pingora fg fg-meta"}
TOP=${TOP:-0}
KEEP_TMP=${KEEP_TMP:-0}
AUDIT=${AUDIT:-1}
FG_LOG=warn
FG_LOG_FORMAT=text
if [[ $AUDIT == 1 ]]; then
  FG_LOG=info
  FG_LOG_FORMAT=json
fi
BASELINE_HEADER=${BASELINE_HEADER-"Authorization: Bearer $(printf 'e%.0s' $(seq 1 530))"}
BASE_PORT=${BASE_PORT:-18280}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FHIRGATE_BIN=${FHIRGATE_BIN:-$TARGET_DIR/release/fhirgate}
FHIRGATE_BIN_B=${FHIRGATE_BIN_B:-}
PINGORA_BASELINE_BIN=${PINGORA_BASELINE_BIN:-$(ls -t "$TARGET_DIR"/release/deps/pingora_baseline-* 2>/dev/null | grep -v '\.d$' | head -1 || true)}
UP_PORT=$BASE_PORT
PROXY_PORT=$((BASE_PORT + 1))
CTL_PORT=$((BASE_PORT + 2))
MET_PORT=$((BASE_PORT + 3))
CLIENT_ID=instr-admin
CLIENT_SECRET=instr-secret-0b6e1f4c9d2a7e35

for tool in valgrind callgrind_control callgrind_annotate nginx curl python3; do
  command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is required" >&2; exit 1; }
done

BENCH_NAME=instructions.sh
BENCH_TMP_PREFIX=fhirgate-instr
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"
log() { printf '[instructions.sh %s] %s\n' "$(date +%T)" "$*" >&2; }

wait_http() { # $1 url, $2 seconds
  for _ in $(seq 1 $(($2 * 10))); do
    if curl -s -o /dev/null --max-time 2 "$1"; then return 0; fi
    sleep 0.1
  done
  echo "instructions.sh: $1 did not answer" >&2
  return 1
}

# --- upstream ------------------------------------------------------------------------------
mkdir -p "$TMP/www/fhir/R4/Patient" "$TMP/nginx"
cat >"$TMP/www/fhir/R4/Patient/p1" <<'EOF'
{"resourceType":"Patient","id":"p1","meta":{"versionId":"3","lastUpdated":"2024-05-01T10:00:00.000Z"},"identifier":[{"system":"urn:oid:1.2.36.146.595.217.0.1","value":"12345"}],"active":true,"name":[{"use":"official","family":"Chalmers","given":["Peter","James"]}],"telecom":[{"system":"phone","value":"(03) 5555 6473","use":"work"}],"gender":"male","birthDate":"1974-12-25","address":[{"use":"home","line":["534 Erewhon St"],"city":"PleasantVille","state":"Vic","postalCode":"3999"}],"managingOrganization":{"reference":"Organization/1"}}
EOF
printf '{"resourceType":"CapabilityStatement","status":"active","kind":"instance","fhirVersion":"4.0.1","format":["json"],"rest":[{"mode":"server"}]}\n' \
  >"$TMP/www/fhir/R4/metadata"
chmod -R a+rX "$TMP/www"
NGINX_USER=""
[[ $(id -u) == 0 ]] && NGINX_USER="user www-data;"
cat >"$TMP/nginx/nginx.conf" <<EOF
$NGINX_USER
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  keepalive_requests 1000000;
  types { }
  default_type application/fhir+json;
  server {
    listen 127.0.0.1:$UP_PORT;
    root $TMP/www;
    location / { try_files \$uri =404; }
  }
}
EOF
nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" -e "$TMP/nginx/error.log" -g 'daemon off;' >"$TMP/nginx/out.log" 2>&1 &
PIDS+=("$!")
wait_http "http://127.0.0.1:$UP_PORT/fhir/R4/metadata" 10

# --- one proxy under callgrind ---------------------------------------------------------------
# A kept-alive client sending $2 GETs of $1 with the header $3 (may be empty); fails on a status
# other than 200.
drive() {
  python3 - "$PROXY_PORT" "$1" "$2" "$3" <<'PY'
import http.client, sys
port, path, n, header = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
headers = {}
if header:
    k, v = header.split(": ", 1)
    headers[k] = v
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
for _ in range(n):
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        sys.exit(f"status {resp.status} for {path}")
PY
}

RESULTS="$TMP/results.tsv"
: >"$RESULTS"
measure() { # $1 name
  local name=$1 bin path header="" out="$TMP/callgrind.$1"
  local vg=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" --dump-instr=no)
  case $name in
    pingora | pingora-to)
      [[ -x $PINGORA_BASELINE_BIN ]] || { echo "instructions.sh: no pingora baseline binary" >&2; exit 1; }
      local timeouts=0
      [[ $name == pingora-to ]] && timeouts=1
      PINGORA_BASELINE_LISTEN=127.0.0.1:$PROXY_PORT PINGORA_BASELINE_UPSTREAM=127.0.0.1:$UP_PORT \
        PINGORA_BASELINE_THREADS=1 PINGORA_BASELINE_TIMEOUTS=$timeouts "${vg[@]}" "$PINGORA_BASELINE_BIN" \
        >"$TMP/$name.log" 2>&1 &
      path=/fhir/R4/Patient/p1
      header=$BASELINE_HEADER
      ;;
    fg | fg-b | fg-meta)
      bin=$FHIRGATE_BIN
      [[ $name == fg-b ]] && bin=$FHIRGATE_BIN_B
      [[ -x $bin ]] || { echo "instructions.sh: no fhirgate binary at '$bin'" >&2; exit 1; }
      rm -rf "$TMP/data-$name"
      FHIRGATE_ADMIN_PASSWORD=instr-operator-password-1 FHIRGATE_ADMIN_CLIENT_ID=$CLIENT_ID \
        FHIRGATE_ADMIN_CLIENT_SECRET=$CLIENT_SECRET FHIRGATE_LOG=$FG_LOG FHIRGATE_LOG_FORMAT=$FG_LOG_FORMAT \
        "${vg[@]}" "$bin" serve \
        --listen "127.0.0.1:$PROXY_PORT" --control-listen "127.0.0.1:$CTL_PORT" \
        --metrics-listen "127.0.0.1:$MET_PORT" --base-url "http://127.0.0.1:$PROXY_PORT/" \
        --upstream "http://127.0.0.1:$UP_PORT/fhir/R4" --data-dir "$TMP/data-$name" --threads 1 \
        --auth-rate-limit 0 >"$TMP/$name.log" 2>&1 &
      path=/fhir/R4/Patient/p1
      [[ $name == fg-meta ]] && path=/fhir/R4/metadata
      ;;
    *) echo "instructions.sh: unknown proxy '$name'" >&2; exit 1 ;;
  esac
  local pid=$!
  PIDS+=("$pid")
  wait_http "http://127.0.0.1:$PROXY_PORT/fhir/R4/metadata" 120 || { tail -20 "$TMP/$name.log" >&2; exit 1; }
  if [[ $name == fg || $name == fg-b ]]; then
    local token
    token=$(curl -s --max-time 60 -X POST "http://127.0.0.1:$PROXY_PORT/oauth2/token" \
      --data "grant_type=client_credentials&client_id=$CLIENT_ID&client_secret=$CLIENT_SECRET" |
      sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
    [[ -n $token ]] || { echo "instructions.sh: no token from $name" >&2; tail -20 "$TMP/$name.log" >&2; exit 1; }
    header="Authorization: Bearer $token"
  fi
  log "$name: warm-up ($WARMUP requests)"
  drive "$path" "$WARMUP" "$header"
  # Instrumentation on (callgrind acts on a command when the program next runs), a few requests
  # for it to take, counters zeroed, then the N requests counted and dumped.
  callgrind_control -i on "$pid" >/dev/null 2>&1
  drive "$path" 20 "$header"
  callgrind_control -z "$pid" >/dev/null 2>&1
  log "$name: counting $N requests"
  drive "$path" "$N" "$header"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # The dump asked for holds the N requests (the one at exit, what came after);
  # callgrind_control -d names it $out.1.
  local dump="$out.1"
  [[ -s $dump ]] || dump=$(ls -t "$out"* | tail -1)
  local ir
  ir=$(awk '/^summary:/ {print $2}' "$dump")
  printf '%s\t%s\n' "$name" "$((ir / N))" >>"$RESULTS"
  log "$name: $((ir / N)) instructions per request"
  if ((TOP > 0)); then
    for inclusive in yes no; do
      echo "== $name: the $TOP functions with the most instructions (inclusive=$inclusive, per $N requests)"
      callgrind_annotate --inclusive=$inclusive --threshold=100 "$dump" 2>/dev/null |
        sed -n '/^Ir  *file:function/,$p' | sed -n "3,$((TOP + 2))p" |
        sed -E 's#/root/.cargo/registry/src/[^/]*/##; s#/rustc/[0-9a-f]*/##; s# \[/[^]]*\]$##' | cut -c1-220
    done
  fi
}

for p in $PROXIES; do measure "$p"; done

echo
echo "| proxy | instructions per request | vs pingora |"
echo "|---|---|---|"
base=$(awk '$1 == "pingora" {print $2}' "$RESULTS")
while IFS=$'\t' read -r name ir; do
  ratio="-"
  [[ -n $base ]] && ratio=$(awk -v a="$ir" -v b="$base" 'BEGIN {printf "%.2f×", a / b}')
  echo "| $name | $ir | $ratio |"
done <"$RESULTS"
