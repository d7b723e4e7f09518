#!/usr/bin/env bash
# benches/load.sh — side-by-side load test of fhirgate against nginx, on loopback (docs/contract.md §5).
#
# What it does, all on 127.0.0.1, with bounded run time, cleaning up every process on exit:
#   1. builds fhirgate in release (`cargo build --release`; CARGO_TARGET_DIR is respected), and
#      the plain pingora pass-through proxy of benches/pingora_baseline.rs (same pingora, same
#      profile, none of fhirgate's own work);
#   2. starts a static nginx "FHIR server" (1 worker) serving a Patient at /fhir/R4/Patient/p1
#      and a CapabilityStatement at /fhir/R4/metadata (application/fhir+json);
#   3. starts an nginx reverse proxy (2 workers, upstream keepalive 128, HTTP/1.1) in front of it;
#   4. starts that pingora pass-through (2 threads) and `fhirgate serve` in front of it (2 threads, SQLite in a temp dir, known admin
#      client), and gets a client-credentials token from it;
#   5. runs `wrk -t2 -c50 -d3s --latency` for each case, REPS (8) times, interleaved (short rounds,
#      many of them: the VM's speed drifts less within a round than across a long run):
#        direct     GET /fhir/R4/Patient/p1 straight to the upstream (no proxy)
#        nginx      fg-full's request (below), its Bearer header too, through the nginx reverse
#                   proxy: every proxy fhirgate is compared with reads the same bytes it reads
#                   (and passes the header through)
#        pingora    the same through the plain pingora pass-through (docs/contract.md §5's baseline)
#        pingora-to the same pass-through with the upstream timeouts fhirgate sets on its peers
#                   (connect, read, write, pool idle): like for like on that one point; the
#                   targets stay against the plain one
#        fg-pass    GET /fhir/R4/metadata through fhirgate (public, no auth: the pass-through
#                   baseline of docs/contract.md §1; NB fhirgate renders this JSON body once per
#                   upstream answer and serves it from memory for 10 s, so the upstream is
#                   asked about once per 10 s here)
#        fg-full    GET /fhir/R4/Patient/p1 through fhirgate with `Authorization: Bearer`
#                   (cached after the first request) + policy decision + forwarding
#        fg-basic   the same with `Authorization: Basic client_id:secret`
#        fg-patient the same with the Bearer token of a client whose membership carries the
#                   shipped policies/patient-compartment.json with patient=Patient/p1: a policy
#                   with criteria on every type, on a read that needs no response filtering
#                   (issue 3: within 10 % of fg-full)
#        fg-half    fg-full paced at half the fg-full throughput measured so far (wrk Lua
#                   `delay()`), for docs/contract.md §5's "gateway-added p99 ≤ 1 ms at 50 % of saturation"
#        fg-search  GET /fhir/R4/Observation as the patient-compartment client: the upstream
#                   answers a 1 MB searchset (2,000 Observations, half of them Patient/p1's), the
#                   gateway checks every entry against the criteria and drops the other half;
#                   reported as MB/s of upstream body through the gateway (issue 14: ≥ 200 MB/s)
#        fg-full-b  fg-full against a second fhirgate, FHIRGATE_BIN_B (an A/B of two builds in
#                   one run, interleaved; same flags, its own data dir and token)
#        haproxy    HAProxy (2 threads, `http-reuse always`) verifying an ES256 JWT on every request
#                   with `jwt_verify` before forwarding: an authenticating proxy without policy or
#                   token cache, for comparison (apt-get install haproxy; skipped when absent)
#      and, for token issuance (client_credentials POSTs from a wrk Lua script):
#        issue-gw   POST /oauth2/token through the gateway (as clients do)
#        issue-ctl  POST /oauth2/token straight to the control listener
#      and, with TENANT=1 (issue 9: the cost of project isolation), the operator (bootstrap
#      admin) creates a second project with an admin client on the same upstream, so the default
#      project shares it (isolation `unmarked`, every response checked) and the tenant is
#      isolated by its marker (`tag`):
#        fg-tenant  GET /fhir/R4/Patient/t1 (carrying the tenant's marker) as the tenant
#        fg-tsearch GET /fhir/R4/Patient?name=x as the tenant (narrowed by _tag, filtered)
#        fg-dsearch the same search as the default project's admin (filtered: unmarked only)
#      (fg-full then measures the default project's read in shared mode.)
#   6. prints, per case: req/s, p50/p99 latency, the proxy's CPU-µs per request (utime+stime
#      from /proc/PID/stat before/after; nginx = master + workers), the upstream's CPU-µs per
#      request, and for fhirgate the p99 of its own "gateway-added time" histogram, plus the
#      share of CPU that processes other than ours used meanwhile (other builds or tests on the
#      machine make a run worthless: check "foreign CPU") and the share the hypervisor gave to
#      other guests ("steal", from /proc/stat); then the ratios of docs/contract.md §5, as ratios
#      of the cases' medians and, for fhirgate against the plain pingora proxy, round by round
#      (each rep's fg-full over the same rep's pingora, a few cases apart in the round: the VM's
#      speed drifts over minutes, so a paired ratio cancels what the medians keep).
#
# Usage (from the repo root):
#   benches/load.sh
#   DURATION=10 REPS=2 benches/load.sh         # longer runs, fewer reps
#   SKIP_BUILD=1 FHIRGATE_BIN=/path/to/fhirgate benches/load.sh
#   PIN=1 benches/load.sh                      # proxies on vCPU1 with 1 worker/thread;
#                                              # wrk and the upstream on vCPU0
# Environment (defaults in brackets):
#   DURATION [3] seconds per wrk run · REPS [8] (min 2) · CONNS [50] · WRK_THREADS [2]
#   ISSUE_DURATION [$DURATION] · ISSUE_CONNS [$CONNS] · CASES [all: "direct nginx fg-pass
#   pingora fg-full fg-basic fg-patient fg-half issue-gw issue-ctl"] · BASE_PORT [18180] (uses ..+5)
#   SKIP_BUILD [0] · FHIRGATE_BIN [$CARGO_TARGET_DIR/release/fhirgate] · PIN [0]
#   FHIRGATE_BIN_B [none] a second fhirgate build for the fg-full-b case (uses BASE_PORT+6..+8)
#   PINGORA_BASELINE_BIN [newest $CARGO_TARGET_DIR/release/deps/pingora_baseline-*]
#   KEEP_TMP [0] keep the temp dir (configs, logs, raw wrk output) · PROXY_THREADS [2]
#   PERF [0] 1 = sample each proxy's CPU during its runs (`perf record -e cpu-clock -g`, which
#     works where hardware counters do not) into $TMP/perf-<case>-<rep>.data, and print the
#     top of each case's last profile (self and children); implies KEEP_TMP=1
#   AUDIT [1] 1 = fhirgate's per-request audit record on (info, JSON) and nginx's access log on
#   PRELOAD [none] a malloc to LD_PRELOAD into fhirgate and the pingora baseline, for an A/B of
#     the allocator without rebuilding, e.g. PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
#     (apt-get install libjemalloc2) or .../libmimalloc.so.2 (libmimalloc2.0)
# Needs: nginx (nginx-light), wrk, curl, awk, python3; Linux /proc; for the haproxy case, haproxy
# (2.5 or newer, for jwt_verify) and python3-cryptography (to sign its token). Numbers on a shared 2-vCPU VM are
# noisy (±15 %, at times ±30 % between runs): compare CPU-µs per request, over many short
# interleaved reps (e.g. DURATION=2 REPS=12), round by round.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-3}
REPS=${REPS:-8}
if ((REPS < 2)); then REPS=2; fi
CONNS=${CONNS:-50}
WRK_THREADS=${WRK_THREADS:-2}
ISSUE_DURATION=${ISSUE_DURATION:-$DURATION}
ISSUE_CONNS=${ISSUE_CONNS:-$CONNS}
TENANT=${TENANT:-0}
if [[ $TENANT == 1 ]]; then
  CASES=${CASES:-"direct nginx pingora fg-full fg-tenant fg-tsearch fg-dsearch"}
fi
if [[ -z ${CASES:-} ]]; then
  CASES="direct nginx pingora fg-pass fg-full fg-basic fg-patient fg-search fg-half issue-gw issue-ctl"
  command -v haproxy >/dev/null && CASES="$CASES haproxy"
fi
BASE_PORT=${BASE_PORT:-18180}
SKIP_BUILD=${SKIP_BUILD:-0}
PIN=${PIN:-0}
KEEP_TMP=${KEEP_TMP:-0}
PERF=${PERF:-0}
if [[ $PERF == 1 ]]; then
  command -v perf >/dev/null || { echo "load.sh: PERF=1 needs perf (apt-get install -y linux-perf)" >&2; exit 1; }
  KEEP_TMP=1
fi
PROXY_THREADS=${PROXY_THREADS:-2}
PRELOAD=${PRELOAD:-}
# AUDIT=1: fhirgate writes its audit record per request (FHIRGATE_LOG=info, JSON, as operators
# run it) and the nginx proxy its access log, both to a file (the default); AUDIT=0: neither
# logs per request.
AUDIT=${AUDIT:-1}
if [[ -n $PRELOAD && ! -r $PRELOAD ]]; then
  echo "load.sh: PRELOAD=$PRELOAD is not a readable file" >&2
  exit 1
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FHIRGATE_BIN=${FHIRGATE_BIN:-$TARGET_DIR/release/fhirgate}
FHIRGATE_BIN_B=${FHIRGATE_BIN_B:-}
if [[ " $CASES " == *" fg-full-b "* && ! -x $FHIRGATE_BIN_B ]]; then
  echo "load.sh: fg-full-b needs FHIRGATE_BIN_B (an executable fhirgate)" >&2
  exit 1
fi

UP_PORT=$BASE_PORT
NGX_PORT=$((BASE_PORT + 1))
GW_PORT=$((BASE_PORT + 2))
CTL_PORT=$((BASE_PORT + 3))
MET_PORT=$((BASE_PORT + 4))
PB_PORT=$((BASE_PORT + 5))
GWB_PORT=$((BASE_PORT + 6))
CTLB_PORT=$((BASE_PORT + 7))
METB_PORT=$((BASE_PORT + 8))
HAP_PORT=$((BASE_PORT + 9))
PBT_PORT=$((BASE_PORT + 10))
CLIENT_ID=load-admin
CLIENT_SECRET=load-secret-5f1c2a9e8b7d4c3f
ADMIN_PASSWORD=load-operator-password-7e1d
CLK_TCK=$(getconf CLK_TCK)

# Pinning: the proxy under test alone on vCPU1, everything else on vCPU0.
if [[ $PIN == 1 ]]; then
  PROXY_THREADS=1
  PIN_PROXY=(taskset -c 1)
  PIN_OTHER=(taskset -c 0)
else
  PIN_PROXY=()
  PIN_OTHER=()
fi

for tool in nginx wrk curl awk python3; do
  command -v "$tool" >/dev/null || { echo "load.sh: $tool is required (apt-get install -y nginx-light wrk curl)" >&2; exit 1; }
done

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $UP_PORT $NGX_PORT $GW_PORT $CTL_PORT $MET_PORT $PB_PORT $GWB_PORT $CTLB_PORT $METB_PORT $HAP_PORT $PBT_PORT; do
  if port_busy "$p"; then
    echo "load.sh: port $p is in use; set BASE_PORT to a free range" >&2
    exit 1
  fi
done

BENCH_NAME=load.sh
BENCH_TMP_PREFIX=fhirgate-load
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"

log() { printf '[load.sh %s] %s\n' "$(date +%T)" "$*" >&2; }

# --- build ---------------------------------------------------------------------------------
PINGORA_BASELINE_BIN=${PINGORA_BASELINE_BIN:-}
if [[ $SKIP_BUILD != 1 ]]; then
  log "building the pingora baseline (release) into $TARGET_DIR"
  # Its executable name carries a hash: take it from cargo's own report.
  PINGORA_BASELINE_BIN=$(cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release \
    --bench pingora_baseline --message-format=json-render-diagnostics |
    grep -o '"executable":"[^"]*pingora_baseline[^"]*"' | tail -1 | sed 's/^"executable":"//; s/"$//')
  # Last, so that the fhirgate binary in place is the plain release build (no dev-dependency
  # feature unification).
  log "building fhirgate (release) into $TARGET_DIR"
  (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --bin fhirgate)
fi
if [[ -z $PINGORA_BASELINE_BIN ]]; then
  PINGORA_BASELINE_BIN=$(ls -t "$TARGET_DIR"/release/deps/pingora_baseline-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
fi
[[ -x $FHIRGATE_BIN ]] || { echo "load.sh: no binary at $FHIRGATE_BIN" >&2; exit 1; }
if [[ " $CASES " == *" haproxy "* ]] && ! command -v haproxy >/dev/null; then
  echo "load.sh: the haproxy case needs haproxy (apt-get install -y haproxy)" >&2
  exit 1
fi
if [[ " $CASES " =~ " pingora"(-to)?" " && ! -x $PINGORA_BASELINE_BIN ]]; then
  echo "load.sh: no pingora baseline binary (build it: cargo build --release --bench pingora_baseline)" >&2
  exit 1
fi

# --- fixtures ------------------------------------------------------------------------------
mkdir -p "$TMP/www/fhir/R4/Patient" "$TMP/data" "$TMP/nginx-up" "$TMP/nginx-rp"
cat >"$TMP/www/fhir/R4/Patient/p1" <<'EOF'
{"resourceType":"Patient","id":"p1","meta":{"versionId":"3","lastUpdated":"2024-05-01T10:00:00.000Z"},"identifier":[{"system":"urn:oid:1.2.36.146.595.217.0.1","value":"12345"}],"active":true,"name":[{"use":"official","family":"Chalmers","given":["Peter","James"]}],"telecom":[{"system":"phone","value":"(03) 5555 6473","use":"work"}],"gender":"male","birthDate":"1974-12-25","address":[{"use":"home","line":["534 Erewhon St"],"city":"PleasantVille","state":"Vic","postalCode":"3999"}],"managingOrganization":{"reference":"Organization/1"}}
EOF
{
  printf '{"resourceType":"CapabilityStatement","id":"load-upstream","status":"active","date":"2024-05-01","kind":"instance","software":{"name":"static nginx"},"implementation":{"description":"load test upstream","url":"http://127.0.0.1:%s/fhir/R4"},"fhirVersion":"4.0.1","format":["application/fhir+json","json"],"rest":[{"mode":"server","resource":[' "$UP_PORT"
  sep=""
  for t in Patient Observation Encounter Condition Practitioner Organization MedicationRequest AllergyIntolerance DiagnosticReport Procedure; do
    printf '%s{"type":"%s","interaction":[{"code":"read"},{"code":"vread"},{"code":"update"},{"code":"delete"},{"code":"search-type"},{"code":"create"}],"searchParam":[{"name":"_id","type":"token"},{"name":"_lastUpdated","type":"date"}]}' "$sep" "$t"
    sep=","
  done
  printf '],"interaction":[{"code":"transaction"},{"code":"batch"},{"code":"search-system"}]}]}\n'
} >"$TMP/www/fhir/R4/metadata"
# A searchset for the isolation cases (the static upstream ignores the query): the default
# project's p1 and, once a tenant exists, the tenant's t1.
printf '{"resourceType":"Bundle","type":"searchset","entry":[{"fullUrl":"http://127.0.0.1:%s/fhir/R4/Patient/p1","resource":%s}]}\n' \
  "$UP_PORT" "$(cat "$TMP/www/fhir/R4/Patient/p1")" >"$TMP/www/fhir/R4/search.json"
# The filtered search's upstream answer: 2,000 Observations (~1 MB), every other one Patient/p1's.
python3 - "$TMP/www/fhir/R4/observations.json" "$UP_PORT" <<'PY'
import json, sys
path, port = sys.argv[1], sys.argv[2]
entries = []
for i in range(2000):
    subject = "Patient/p1" if i % 2 == 0 else "Patient/p2"
    obs = {"resourceType": "Observation", "id": f"o{i}",
           "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00.000Z"},
           "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
           "subject": {"reference": subject},
           "effectiveDateTime": "2024-05-01T10:00:00Z",
           "valueQuantity": {"value": 60 + i % 40, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}}
    entries.append({"fullUrl": f"http://127.0.0.1:{port}/fhir/R4/Observation/o{i}", "resource": obs, "search": {"mode": "match"}})
with open(path, "w") as f:
    json.dump({"resourceType": "Bundle", "type": "searchset", "entry": entries}, f, separators=(",", ":"))
PY
chmod -R a+rX "$TMP/www"
PATIENT_BYTES=$(wc -c <"$TMP/www/fhir/R4/Patient/p1")
SEARCH_BYTES=$(wc -c <"$TMP/www/fhir/R4/observations.json")
METADATA_BYTES=$(wc -c <"$TMP/www/fhir/R4/metadata")

NGINX_ACCESS_LOG=""
FG_LOG_LEVEL=warn
FG_LOG_FORMAT=text
if [[ $AUDIT == 1 ]]; then
  NGINX_ACCESS_LOG="access_log $TMP/nginx-rp/access.log;"
  FG_LOG_LEVEL=info
  FG_LOG_FORMAT=json
fi

NGINX_USER=""
[[ $(id -u) == 0 ]] && NGINX_USER="user www-data;"

common_main() { # $1 prefix dir, $2 workers
  cat <<EOF
$NGINX_USER
worker_processes $2;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
EOF
}
common_http() { # $1 prefix dir
  cat <<EOF
  access_log off;
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
EOF
}

{
  common_main "$TMP/nginx-up" 1
  cat <<EOF
http {
$(common_http "$TMP/nginx-up")
  types { }
  default_type application/fhir+json;
  server {
    listen 127.0.0.1:$UP_PORT;
    root $TMP/www;
    etag on;
    location / { try_files \$uri =404; }
    location = /fhir/R4/Patient { try_files /fhir/R4/search.json =404; }
    location = /fhir/R4/Observation { try_files /fhir/R4/observations.json =404; }
  }
}
EOF
} >"$TMP/nginx-up/nginx.conf"

{
  common_main "$TMP/nginx-rp" "$PROXY_THREADS"
  cat <<EOF
http {
$(common_http "$TMP/nginx-rp")
  upstream fhir_upstream {
    server 127.0.0.1:$UP_PORT;
    keepalive 128;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGX_PORT;
    $NGINX_ACCESS_LOG
    location / {
      proxy_pass http://fhir_upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
} >"$TMP/nginx-rp/nginx.conf"

cat >"$TMP/issue.lua" <<EOF
wrk.method = "POST"
wrk.body = "grant_type=client_credentials&client_id=$CLIENT_ID&client_secret=$CLIENT_SECRET"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
EOF

# --- start ---------------------------------------------------------------------------------
wait_http() { # $1 url, $2 what
  for _ in $(seq 1 300); do
    if curl -s -o /dev/null --max-time 1 "$1"; then return 0; fi
    sleep 0.1
  done
  echo "load.sh: $2 did not come up ($1)" >&2
  return 1
}

STARTED_PID=""
start_nginx() { # $1 dir, $2 name of the pinning array; sets STARTED_PID (the master)
  local -n pin=$2
  nginx -t -q -c "$1/nginx.conf" -p "$1" -e "$1/error.log"
  "${pin[@]}" nginx -c "$1/nginx.conf" -p "$1" -e "$1/error.log" -g 'daemon off;' \
    >"$1/stdout.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

log "starting upstream nginx on :$UP_PORT (1 worker)"
start_nginx "$TMP/nginx-up" PIN_OTHER
UP_PID=$STARTED_PID
wait_http "http://127.0.0.1:$UP_PORT/fhir/R4/metadata" "upstream nginx"
log "starting nginx reverse proxy on :$NGX_PORT ($PROXY_THREADS workers)"
start_nginx "$TMP/nginx-rp" PIN_PROXY
NGX_PID=$STARTED_PID
wait_http "http://127.0.0.1:$NGX_PORT/fhir/R4/metadata" "nginx reverse proxy"

PB_PID=""
if [[ " $CASES " == *" pingora "* ]]; then
  log "starting the pingora pass-through on :$PB_PORT ($PROXY_THREADS threads)"
  LD_PRELOAD=$PRELOAD PINGORA_BASELINE_LISTEN=127.0.0.1:$PB_PORT PINGORA_BASELINE_UPSTREAM=127.0.0.1:$UP_PORT \
    PINGORA_BASELINE_THREADS=$PROXY_THREADS "${PIN_PROXY[@]}" "$PINGORA_BASELINE_BIN" \
    >"$TMP/pingora-baseline.log" 2>&1 &
  PB_PID=$!
  PIDS+=("$PB_PID")
  wait_http "http://127.0.0.1:$PB_PORT/fhir/R4/metadata" "pingora baseline" || { tail -20 "$TMP/pingora-baseline.log" >&2; exit 1; }
fi
PBT_PID=""
if [[ " $CASES " == *" pingora-to "* ]]; then
  log "starting the pingora pass-through with fhirgate's upstream timeouts on :$PBT_PORT ($PROXY_THREADS threads)"
  LD_PRELOAD=$PRELOAD PINGORA_BASELINE_LISTEN=127.0.0.1:$PBT_PORT PINGORA_BASELINE_UPSTREAM=127.0.0.1:$UP_PORT \
    PINGORA_BASELINE_THREADS=$PROXY_THREADS PINGORA_BASELINE_TIMEOUTS=1 "${PIN_PROXY[@]}" "$PINGORA_BASELINE_BIN" \
    >"$TMP/pingora-baseline-to.log" 2>&1 &
  PBT_PID=$!
  PIDS+=("$PBT_PID")
  wait_http "http://127.0.0.1:$PBT_PORT/fhir/R4/metadata" "pingora baseline with timeouts" || { tail -20 "$TMP/pingora-baseline-to.log" >&2; exit 1; }
fi

# Starts `fhirgate serve` in front of the upstream with the known admin client; sets STARTED_PID.
start_fhirgate() { # $1 binary, $2 gateway port, $3 control port, $4 metrics port, $5 name
  log "starting $5 ($1) on :$2 ($PROXY_THREADS threads)"
  mkdir -p "$TMP/data-$5"
  LD_PRELOAD=$PRELOAD FHIRGATE_ADMIN_PASSWORD=$ADMIN_PASSWORD FHIRGATE_ADMIN_CLIENT_ID=$CLIENT_ID FHIRGATE_ADMIN_CLIENT_SECRET=$CLIENT_SECRET FHIRGATE_LOG=$FG_LOG_LEVEL \
    "${PIN_PROXY[@]}" "$1" serve \
    --listen "127.0.0.1:$2" --control-listen "127.0.0.1:$3" --metrics-listen "127.0.0.1:$4" \
    --base-url "http://127.0.0.1:$2/" --upstream "http://127.0.0.1:$UP_PORT/fhir/R4" \
    --data-dir "$TMP/data-$5" --threads "$PROXY_THREADS" --log-format "$FG_LOG_FORMAT" --policies-dir "$ROOT/policies" \
    --auth-rate-limit 0 \
    >"$TMP/$5.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
  wait_http "http://127.0.0.1:$4/healthz" "$5" || { tail -30 "$TMP/$5.log" >&2; exit 1; }
}

start_fhirgate "$FHIRGATE_BIN" "$GW_PORT" "$CTL_PORT" "$MET_PORT" fhirgate
FG_PID=$STARTED_PID
wait_http "http://127.0.0.1:$GW_PORT/fhir/R4/metadata" "fhirgate gateway" || { tail -30 "$TMP/fhirgate.log" >&2; exit 1; }

TOKEN_JSON=$(curl -s --max-time 10 -X POST "http://127.0.0.1:$GW_PORT/oauth2/token" \
  -H 'Content-Type: application/x-www-form-urlencoded' \
  --data "grant_type=client_credentials&client_id=$CLIENT_ID&client_secret=$CLIENT_SECRET")
TOKEN=$(printf '%s' "$TOKEN_JSON" | sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
if [[ -z $TOKEN ]]; then
  echo "load.sh: no token from fhirgate: $TOKEN_JSON" >&2
  tail -30 "$TMP/fhirgate.log" >&2
  exit 1
fi
BASIC=$(printf '%s:%s' "$CLIENT_ID" "$CLIENT_SECRET" | base64 -w0)
log "token: ${#TOKEN} bytes"

# A patient app: a client whose membership carries the shipped patient-compartment policy with
# patient=Patient/p1, set up through the admin API as an operator would.
PATIENT_TOKEN=$(GW="http://127.0.0.1:$GW_PORT" ADMIN_TOKEN=$TOKEN python3 - <<'PY'
import json, os, sys, urllib.parse, urllib.request

gw, admin = os.environ["GW"], os.environ["ADMIN_TOKEN"]

def call(method, path, body=None, token=admin, form=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None
    if body is not None:
        data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    req = urllib.request.Request(gw + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)

project = call("GET", "/auth/me")["project"]["id"]
client = call("POST", f"/admin/projects/{project}/client",
              {"name": "load patient app", "accessPolicy": {"reference": "AccessPolicy/patient-compartment"}})
found = call("GET", f"/fhir/R4/ProjectMembership?profile=ClientApplication/{client['id']}")
membership = found["entry"][0]["resource"]
membership.pop("accessPolicy", None)
membership["access"] = [{"policy": {"reference": "AccessPolicy/patient-compartment"},
                         "parameter": [{"name": "patient", "valueReference": {"reference": "Patient/p1"}}]}]
call("POST", f"/admin/projects/{project}/members/{membership['id']}", membership)
token = call("POST", "/oauth2/token", token=None, form={
    "grant_type": "client_credentials", "client_id": client["id"], "client_secret": client["secret"]})
print(token["access_token"])
PY
) || { echo "load.sh: could not set up the patient-compartment client" >&2; tail -30 "$TMP/fhirgate.log" >&2; exit 1; }

# The A/B build (fg-full-b): a second fhirgate with the same flags, its own data and token.
FGB_PID=""
TOKEN_B=""
if [[ " $CASES " == *" fg-full-b "* ]]; then
  start_fhirgate "$FHIRGATE_BIN_B" "$GWB_PORT" "$CTLB_PORT" "$METB_PORT" fhirgate-b
  FGB_PID=$STARTED_PID
  TOKEN_B=$(curl -s --max-time 10 -X POST "http://127.0.0.1:$GWB_PORT/oauth2/token" \
    -H 'Content-Type: application/x-www-form-urlencoded' \
    --data "grant_type=client_credentials&client_id=$CLIENT_ID&client_secret=$CLIENT_SECRET" |
    sed -n 's/.*"access_token":"\([^"]*\)".*/\1/p')
  [[ -n $TOKEN_B ]] || { echo "load.sh: no token from fhirgate B" >&2; tail -30 "$TMP/fhirgate-b.log" >&2; exit 1; }
fi

# HAProxy verifying an ES256 JWT of its own key on every request (jwt_verify), then forwarding.
HAP_PID=""
HAP_TOKEN=""
if [[ " $CASES " == *" haproxy "* ]]; then
  mkdir -p "$TMP/haproxy"
  HAP_TOKEN=$(python3 - "$TMP/haproxy/jwt.pem" <<'PY'
import base64, json, sys, time
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

key = ec.generate_private_key(ec.SECP256R1())
with open(sys.argv[1], "wb") as f:
    f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
header = b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": "load"}).encode())
payload = b64(json.dumps({"iss": "load", "sub": "load-admin", "scope": "system/*.*",
                          "exp": int(time.time()) + 3600}).encode())
r, s = utils.decode_dss_signature(key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256())))
print(f"{header}.{payload}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
PY
  ) || { echo "load.sh: could not make the HAProxy key and token (python3 cryptography)" >&2; exit 1; }
  HAP_LOG=""
  [[ $AUDIT == 1 ]] && HAP_LOG="log 127.0.0.1:9 local0"
  cat >"$TMP/haproxy/haproxy.cfg" <<EOF
global
  nbthread $PROXY_THREADS
  maxconn 4096
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  $HAP_LOG
frontend fhir
  bind 127.0.0.1:$HAP_PORT
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('\$.alg')
  http-request deny deny_status 401 unless { var(txn.alg) -m str ES256 }
  http-request deny deny_status 401 unless { var(txn.bearer),jwt_verify(txn.alg,"$TMP/haproxy/jwt.pem") -m int 1 }
  default_backend upstream
backend upstream
  http-reuse always
  server up 127.0.0.1:$UP_PORT
EOF
  haproxy -c -q -f "$TMP/haproxy/haproxy.cfg" || { echo "load.sh: haproxy rejected its configuration" >&2; exit 1; }
  log "starting haproxy on :$HAP_PORT ($PROXY_THREADS threads, jwt_verify ES256)"
  "${PIN_PROXY[@]}" haproxy -db -f "$TMP/haproxy/haproxy.cfg" >"$TMP/haproxy/out.log" 2>&1 &
  HAP_PID=$!
  PIDS+=("$HAP_PID")
  wait_http "http://127.0.0.1:$HAP_PORT/fhir/R4/metadata" "haproxy" || { tail -20 "$TMP/haproxy/out.log" >&2; exit 1; }
fi

# The tenant (TENANT=1): a second project on the same upstream, so isolated by its
# marker; its patient t1 carries the marker, and the searchset lists t1 beside p1.
TENANT_TOKEN=""
if [[ $TENANT == 1 ]]; then
  read -r TENANT_TOKEN TENANT_PROJECT < <(GW="http://127.0.0.1:$GW_PORT" ADMIN_PASSWORD=$ADMIN_PASSWORD python3 - <<'PY'
import json, os, urllib.parse, urllib.request

gw = os.environ["GW"]

def post(path, body=None, form=None):
    if form is not None:
        data, ctype = urllib.parse.urlencode(form).encode(), "application/x-www-form-urlencoded"
    else:
        data, ctype = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(gw + path, data=data, method="POST", headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)

# The operator signs in (the bootstrap admin, super admin) and creates a clinic project with an
# admin client, as a super admin would for a second tenant on the same upstream.
verifier = "load-tenant-verifier-0123456789"
code = post("/auth/login", {"email": "admin@example.com", "password": os.environ["ADMIN_PASSWORD"],
                            "codeChallenge": verifier, "codeChallengeMethod": "plain"})["code"]
operator = post("/oauth2/token", form={"grant_type": "authorization_code", "code": code,
                                       "code_verifier": verifier})["access_token"]

def call(method, path, body):
    req = urllib.request.Request(gw + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Bearer " + operator})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)

project = call("POST", "/fhir/R4/Project", {"resourceType": "Project", "name": "Load tenant"})["id"]
client = call("POST", f"/admin/projects/{project}/client", {"name": "load tenant admin"})
token = post("/oauth2/token", form={"grant_type": "client_credentials", "client_id": client["id"],
                                    "client_secret": client["secret"]})
print(token["access_token"], project)
PY
  ) || { echo "load.sh: could not register the tenant" >&2; tail -30 "$TMP/fhirgate.log" >&2; exit 1; }
  sed 's/"id":"p1","meta":{/"id":"t1","meta":{"tag":[{"system":"https:\/\/fhirgate.dev\/fhir\/CodeSystem\/project","code":"'"$TENANT_PROJECT"'"}],/' \
    "$TMP/www/fhir/R4/Patient/p1" >"$TMP/www/fhir/R4/Patient/t1"
  printf '{"resourceType":"Bundle","type":"searchset","entry":[{"fullUrl":"http://127.0.0.1:%s/fhir/R4/Patient/p1","resource":%s},{"fullUrl":"http://127.0.0.1:%s/fhir/R4/Patient/t1","resource":%s}]}\n' \
    "$UP_PORT" "$(cat "$TMP/www/fhir/R4/Patient/p1")" "$UP_PORT" "$(cat "$TMP/www/fhir/R4/Patient/t1")" >"$TMP/www/fhir/R4/search.json"
  chmod -R a+rX "$TMP/www"
  log "tenant project $TENANT_PROJECT registered"
  # The snapshot with the new project (and the default project's new isolation) is in place.
  sleep 1
fi

# Smoke checks: every case must answer 200 before we measure it.
check() { # $1 name, $2 url, rest: curl args
  local name=$1 url=$2
  shift 2
  local code
  code=$(curl -s -o "$TMP/check.out" -w '%{http_code}' --max-time 5 "$@" "$url")
  if [[ $code != 200 ]]; then
    echo "load.sh: $name answered $code: $(head -c 400 "$TMP/check.out")" >&2
    exit 1
  fi
}
check direct "http://127.0.0.1:$UP_PORT/fhir/R4/Patient/p1"
check nginx "http://127.0.0.1:$NGX_PORT/fhir/R4/Patient/p1"
[[ -n $PB_PID ]] && check pingora "http://127.0.0.1:$PB_PORT/fhir/R4/Patient/p1"
[[ -n $PBT_PID ]] && check pingora-to "http://127.0.0.1:$PBT_PORT/fhir/R4/Patient/p1"
check fg-pass "http://127.0.0.1:$GW_PORT/fhir/R4/metadata"
check fg-full "http://127.0.0.1:$GW_PORT/fhir/R4/Patient/p1" -H "Authorization: Bearer $TOKEN"
check fg-basic "http://127.0.0.1:$GW_PORT/fhir/R4/Patient/p1" -H "Authorization: Basic $BASIC"
check fg-patient "http://127.0.0.1:$GW_PORT/fhir/R4/Patient/p1" -H "Authorization: Bearer $PATIENT_TOKEN"
check fg-search "http://127.0.0.1:$GW_PORT/fhir/R4/Observation" -H "Authorization: Bearer $PATIENT_TOKEN"
python3 - "$TMP/check.out" <<'PY' || { echo "load.sh: the filtered search did not keep exactly Patient/p1's 1,000 Observations" >&2; exit 1; }
import json, sys
bundle = json.load(open(sys.argv[1]))
subjects = [e["resource"]["subject"]["reference"] for e in bundle.get("entry", [])]
sys.exit(0 if len(subjects) == 1000 and set(subjects) == {"Patient/p1"} else 1)
PY
[[ -n $FGB_PID ]] && check fg-full-b "http://127.0.0.1:$GWB_PORT/fhir/R4/Patient/p1" -H "Authorization: Bearer $TOKEN_B"
if [[ -n $HAP_PID ]]; then
  check haproxy "http://127.0.0.1:$HAP_PORT/fhir/R4/Patient/p1" -H "Authorization: Bearer $HAP_TOKEN"
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${HAP_TOKEN%????}AAAA" "http://127.0.0.1:$HAP_PORT/fhir/R4/Patient/p1")
  [[ $code == 401 ]] || { echo "load.sh: haproxy let a tampered token through ($code)" >&2; exit 1; }
fi
if [[ $TENANT == 1 ]]; then
  check fg-tenant "http://127.0.0.1:$GW_PORT/fhir/R4/Patient/t1" -H "Authorization: Bearer $TENANT_TOKEN"
  check fg-tsearch "http://127.0.0.1:$GW_PORT/fhir/R4/Patient?name=x" -H "Authorization: Bearer $TENANT_TOKEN"
  grep -q '"t1"' "$TMP/check.out" && ! grep -q '"p1"' "$TMP/check.out" ||
    { echo "load.sh: the tenant's search is not isolated: $(head -c 400 "$TMP/check.out")" >&2; exit 1; }
  check fg-dsearch "http://127.0.0.1:$GW_PORT/fhir/R4/Patient?name=x" -H "Authorization: Bearer $TOKEN"
  grep -q '"p1"' "$TMP/check.out" && ! grep -q '"t1"' "$TMP/check.out" ||
    { echo "load.sh: the default project's search shows the tenant: $(head -c 400 "$TMP/check.out")" >&2; exit 1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GW_PORT/fhir/R4/Patient/t1")
  [[ $code == 404 ]] || { echo "load.sh: the default project reads the tenant's t1 ($code)" >&2; exit 1; }
fi
# The patient policy must really be in force: another patient is not visible.
mkdir -p "$TMP/www/fhir/R4/Patient" && sed 's/"id":"p1"/"id":"p2"/' "$TMP/www/fhir/R4/Patient/p1" >"$TMP/www/fhir/R4/Patient/p2"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "Authorization: Bearer $PATIENT_TOKEN" "http://127.0.0.1:$GW_PORT/fhir/R4/Patient/p2")
[[ $code == 404 ]] || { echo "load.sh: the patient client read Patient/p2 with $code (want 404): policy not in force" >&2; exit 1; }
check issue-ctl "http://127.0.0.1:$CTL_PORT/oauth2/token" -X POST --data "grant_type=client_credentials&client_id=$CLIENT_ID&client_secret=$CLIENT_SECRET"

# --- measurement ---------------------------------------------------------------------------
# Clock ticks of the given pids and, for nginx masters, their workers: utime+stime, or with
# `--kernel` first, stime alone.
cpu_ticks() {
  local total=0 pid p line f first=11
  if [[ ${1:-} == --kernel ]]; then first=12; shift; fi
  for pid in "$@"; do
    for p in $pid $(cat "/proc/$pid/task/"*/children 2>/dev/null); do
      line=$(cat "/proc/$p/stat" 2>/dev/null) || continue
      # After the ")" that closes comm, field 1 is the state (stat field 3): utime and stime
      # (stat fields 14 and 15) are fields 12 and 13 here. They cover every thread.
      read -r -a f <<<"${line##*) }"
      total=$((total + f[12] + (first == 11 ? f[11] : 0)))
    done
  done
  echo "$total"
}

# Busy ticks of the whole machine (user + nice + system, all CPUs).
sys_busy() { awk '/^cpu / {print $2 + $3 + $4; exit}' /proc/stat; }
# Time the hypervisor gave this VM's vCPUs to someone else (ticks, all vCPUs).
sys_steal() { awk '/^cpu / {print $9; exit}' /proc/stat; }
# $1 ticks over a run of $2 seconds, as a whole % of the machine (all vCPUs); never below 0.
machine_share() {
  awk -v d="$1" -v t="$CLK_TCK" -v s="$2" -v n="$(nproc)" \
    'BEGIN { f = d / t / s / n * 100; if (f < 0) f = 0; printf "%.0f", f }'
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Cumulative buckets of fhirgate_gateway_added_seconds for a route label, "le count" lines.
gw_hist() {
  curl -s --max-time 5 "http://127.0.0.1:$MET_PORT/metrics" |
    awk -v r="route=\"$1\"" '/^fhirgate_gateway_added_seconds_bucket/ && index($0, r) {
      match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5); print le, $NF }'
}

# p99 upper bound (in ms) from two bucket snapshots.
hist_p99() { # $1 before file, $2 after file
  awk 'NR == FNR { before[$1] = $2; next }
       { le[++n] = $1; c[n] = $2 - before[$1] }
       END {
         total = c[n]; if (total <= 0) { print "-"; exit }
         for (i = 1; i <= n; i++) if (c[i] >= 0.99 * total) {
           if (le[i] == "+Inf") print ">" le[i-1] * 1000; else print le[i] * 1000; exit }
       }' "$1" "$2"
}

to_ms() { # wrk latency like 1.23ms, 456.78us, 1.02s
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else print "?" }'
}

RESULTS=$TMP/results.tsv
: >"$RESULTS"

run_case() { # $1 case, $2 rep
  local name=$1 rep=$2 url proxy_pids=() upstream_pids=("$UP_PID") args=() route="" dur=$DURATION conns=$CONNS
  case $name in
    direct) url="http://127.0.0.1:$UP_PORT/fhir/R4/Patient/p1" ;;
    # The proxies fhirgate is compared with get fg-full's very request, its Bearer header too
    # (which they pass through): reading the same bytes is counted for every proxy.
    nginx) url="http://127.0.0.1:$NGX_PORT/fhir/R4/Patient/p1"; proxy_pids=("$NGX_PID")
      args=(-H "Authorization: Bearer $TOKEN") ;;
    pingora) url="http://127.0.0.1:$PB_PORT/fhir/R4/Patient/p1"; proxy_pids=("$PB_PID")
      args=(-H "Authorization: Bearer $TOKEN") ;;
    pingora-to) url="http://127.0.0.1:$PBT_PORT/fhir/R4/Patient/p1"; proxy_pids=("$PBT_PID")
      args=(-H "Authorization: Bearer $TOKEN") ;;
    fg-pass) url="http://127.0.0.1:$GW_PORT/fhir/R4/metadata"; proxy_pids=("$FG_PID"); route=metadata ;;
    fg-full) url="http://127.0.0.1:$GW_PORT/fhir/R4/Patient/p1"; proxy_pids=("$FG_PID"); route=fhir
      args=(-H "Authorization: Bearer $TOKEN") ;;
    fg-basic) url="http://127.0.0.1:$GW_PORT/fhir/R4/Patient/p1"; proxy_pids=("$FG_PID"); route=fhir
      args=(-H "Authorization: Basic $BASIC") ;;
    fg-patient) url="http://127.0.0.1:$GW_PORT/fhir/R4/Patient/p1"; proxy_pids=("$FG_PID"); route=fhir
      args=(-H "Authorization: Bearer $PATIENT_TOKEN") ;;
    fg-search) url="http://127.0.0.1:$GW_PORT/fhir/R4/Observation"; proxy_pids=("$FG_PID"); route=fhir
      args=(-H "Authorization: Bearer $PATIENT_TOKEN") ;;
    fg-full-b) url="http://127.0.0.1:$GWB_PORT/fhir/R4/Patient/p1"; proxy_pids=("$FGB_PID")
      args=(-H "Authorization: Bearer $TOKEN_B") ;;
    haproxy) url="http://127.0.0.1:$HAP_PORT/fhir/R4/Patient/p1"; proxy_pids=("$HAP_PID")
      args=(-H "Authorization: Bearer $HAP_TOKEN") ;;
    fg-tenant) url="http://127.0.0.1:$GW_PORT/fhir/R4/Patient/t1"; proxy_pids=("$FG_PID"); route=fhir
      args=(-H "Authorization: Bearer $TENANT_TOKEN") ;;
    fg-tsearch) url="http://127.0.0.1:$GW_PORT/fhir/R4/Patient?name=x"; proxy_pids=("$FG_PID"); route=fhir
      args=(-H "Authorization: Bearer $TENANT_TOKEN") ;;
    fg-dsearch) url="http://127.0.0.1:$GW_PORT/fhir/R4/Patient?name=x"; proxy_pids=("$FG_PID"); route=fhir
      args=(-H "Authorization: Bearer $TOKEN") ;;
    fg-half)
      local full_rps
      full_rps=$(awk -F'\t' '$1 == "fg-full" && $3 ~ /^[0-9.]+$/ {s += $3; n++} END {if (n) print s / n}' "$RESULTS")
      if [[ -z $full_rps ]]; then
        log "fg-half needs an fg-full run before it; skipped"
        return 0
      fi
      # Each connection waits `delay` ms between requests: conns * 1000 / delay ≈ half of full.
      local delay_ms
      delay_ms=$(awk -v r="$full_rps" -v c="$conns" 'BEGIN { d = int(c * 1000 / (r / 2) + 0.5); if (d < 1) d = 1; print d }')
      cat >"$TMP/half.lua" <<EOF
wrk.headers["Authorization"] = "Bearer $TOKEN"
function delay() return $delay_ms end
EOF
      url="http://127.0.0.1:$GW_PORT/fhir/R4/Patient/p1"; proxy_pids=("$FG_PID"); route=fhir
      args=(-s "$TMP/half.lua") ;;
    issue-gw) url="http://127.0.0.1:$GW_PORT/oauth2/token"; proxy_pids=("$FG_PID"); upstream_pids=()
      args=(-s "$TMP/issue.lua"); dur=$ISSUE_DURATION; conns=$ISSUE_CONNS ;;
    issue-ctl) url="http://127.0.0.1:$CTL_PORT/oauth2/token"; proxy_pids=("$FG_PID"); upstream_pids=()
      args=(-s "$TMP/issue.lua"); dur=$ISSUE_DURATION; conns=$ISSUE_CONNS ;;
    *) echo "load.sh: unknown case $name" >&2; exit 1 ;;
  esac
  local out=$TMP/wrk-$name-$rep.txt
  [[ -n $route ]] && gw_hist "$route" >"$TMP/hist-before"
  local p0 u0 p1 u1 o0 o1 s0 s1 st0 st1 wrk_cpu
  local k0 k1
  k0=$(cpu_ticks --kernel "${proxy_pids[@]}")
  p0=$(cpu_ticks "${proxy_pids[@]}")
  u0=$(cpu_ticks "${upstream_pids[@]}")
  o0=$(cpu_ticks "${PIDS[@]}")
  s0=$(sys_busy)
  st0=$(sys_steal)
  log "rep $rep: $name (${dur}s, $conns connections)"
  local perf_pid=""
  if [[ $PERF == 1 && ${#proxy_pids[@]} -gt 0 ]]; then
    perf record -q -e cpu-clock -F 1999 -g -o "$TMP/perf-$name-$rep.data" \
      -p "$(IFS=,; echo "${proxy_pids[*]}")" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  local TIMEFORMAT='%U %S'
  if ! { time timeout $((dur + 30)) "${PIN_OTHER[@]}" wrk -t"$WRK_THREADS" -c"$conns" -d"${dur}s" --latency \
    "${args[@]}" "$url" >"$out" 2>&1; } 2>"$TMP/wrk-time"; then
    echo "load.sh: wrk failed for $name:" >&2
    cat "$out" >&2
    exit 1
  fi
  p1=$(cpu_ticks "${proxy_pids[@]}")
  k1=$(cpu_ticks --kernel "${proxy_pids[@]}")
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
  fi
  u1=$(cpu_ticks "${upstream_pids[@]}")
  o1=$(cpu_ticks "${PIDS[@]}")
  s1=$(sys_busy)
  st1=$(sys_steal)
  wrk_cpu=$(awk -v t="$CLK_TCK" '{print int(($1 + $2) * t)}' "$TMP/wrk-time")
  # CPU used by processes other than ours and wrk, as % of the machine, over the run.
  local foreign
  foreign=$(machine_share $((s1 - s0 - (o1 - o0) - wrk_cpu)) "$dur")
  # The same for steal: CPU the machine's neighbours took from under every process here.
  local steal
  steal=$(machine_share $((st1 - st0)) "$dur")
  local gwp99="-"
  if [[ -n $route ]]; then
    gw_hist "$route" >"$TMP/hist-after"
    gwp99=$(hist_p99 "$TMP/hist-before" "$TMP/hist-after")
  fi
  local rps reqs p50 p99 non2xx errors
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  reqs=$(awk '/requests in/ {print $1}' "$out")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
  errors=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$out")
  local pcpu ucpu kcpu
  pcpu=$(awk -v d=$((p1 - p0)) -v n="$reqs" -v t="$CLK_TCK" -v has=${#proxy_pids[@]} \
    'BEGIN { if (has == 0 || n == 0) print "-"; else printf "%.1f", d / t * 1e6 / n }')
  kcpu=$(awk -v d=$((k1 - k0)) -v n="$reqs" -v t="$CLK_TCK" -v has=${#proxy_pids[@]} \
    'BEGIN { if (has == 0 || n == 0) print "-"; else printf "%.1f", d / t * 1e6 / n }')
  ucpu=$(awk -v d=$((u1 - u0)) -v n="$reqs" -v t="$CLK_TCK" -v has=${#upstream_pids[@]} \
    'BEGIN { if (has == 0 || n == 0) print "-"; else printf "%.1f", d / t * 1e6 / n }')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rep" "$rps" "$reqs" "$p50" "$p99" \
    "$pcpu" "$ucpu" "$gwp99" "${non2xx:-0}" "${errors:-0}" "$foreign" "$steal" >>"$RESULTS"
  printf '  %-9s rep %s: %10s req/s  p50 %7s ms  p99 %7s ms  proxy %6s µs/req (kernel %s)  upstream %6s µs/req  gw-added p99 %s ms  foreign CPU %s%%  steal %s%%  fhirgate RSS %s kB%s\n' \
    "$name" "$rep" "$rps" "$p50" "$p99" "$pcpu" "$kcpu" "$ucpu" "$gwp99" "$foreign" "$steal" "$(rss_kb "$FG_PID")" \
    "$([[ ${non2xx:-0} != 0 || ${errors:-0} != 0 ]] && echo "  (!! non-2xx ${non2xx:-0}, socket errors ${errors:-0})")" >&2
}

FG_RSS_START=$(rss_kb "$FG_PID")
for rep in $(seq 1 "$REPS"); do
  for c in $CASES; do
    run_case "$c" "$rep"
  done
done
FG_RSS_END=$(rss_kb "$FG_PID")

# --- summary -------------------------------------------------------------------------------
median() { sort -g | awk '{v[NR] = $1} END { if (NR == 0) { print "-"; exit } if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { # $1 case, $2 column number → median over reps (non-numeric values skipped)
  awk -F'\t' -v c="$1" -v k="$2" '$1 == c && $k ~ /^[0-9.]+$/ {print $k}' "$RESULTS" | median
}
allcol() { awk -F'\t' -v c="$1" -v k="$2" '$1 == c {printf "%s%s", sep, $k; sep = ", "}' "$RESULTS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a !~ /^[0-9.]+$/ || b !~ /^[0-9.]+$/ || b == 0) print "-"; else printf "%.2f", a / b }'; }
# Round by round: case $1 over case $2 in column $3 within each rep (the same round of the
# interleaved runs, a few cases apart), listed, then their median.
paired() {
  local per
  per=$(awk -F'\t' -v a="$1" -v b="$2" -v k="$3" '
    $1 == a && $k ~ /^[0-9.]+$/ {x[$2] = $k} $1 == b && $k ~ /^[0-9.]+$/ {y[$2] = $k}
    END { for (r in x) if (r in y && y[r] > 0) printf "%d %.2f\n", r, x[r] / y[r] }' "$RESULTS" | sort -n | awk '{print $2}')
  [[ -n $per ]] || { echo "-"; return; }
  printf '%s (rounds: %s)' "$(printf '%s\n' "$per" | median)" "$(printf '%s' "$per" | paste -sd, - | sed 's/,/, /g')"
}

echo
echo "fhirgate load test — $(date -u +%FT%TZ), $(nproc) vCPU, wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s, $REPS reps interleaved, PIN=$PIN, proxy threads/workers $PROXY_THREADS${PRELOAD:+, LD_PRELOAD=$PRELOAD}"
echo "bodies: Patient $PATIENT_BYTES B, CapabilityStatement $METADATA_BYTES B, searchset $SEARCH_BYTES B; token ${#TOKEN} B; token issuance -c$ISSUE_CONNS -d${ISSUE_DURATION}s"
echo
printf '| %-9s | %9s | %-22s | %8s | %8s | %12s | %12s | %12s | %11s | %11s | %s |\n' case "req/s med" "req/s per rep" "p50 ms" "p99 ms" "proxy µs/req" "upstr µs/req" "gw-add p99" "foreign CPU" "steal" "non-2xx/err"
printf '|%s|\n' "-----------|-----------|------------------------|----------|----------|--------------|--------------|--------------|-------------|-------------|------------"
for c in $CASES; do
  printf '| %-9s | %9s | %-22s | %8s | %8s | %12s | %12s | %12s | %11s | %11s | %s |\n' "$c" "$(col "$c" 3)" "$(allcol "$c" 3)" \
    "$(col "$c" 5)" "$(col "$c" 6)" "$(col "$c" 7)" "$(col "$c" 8)" "$(awk -F'\t' -v c="$c" '$1 == c {printf "%s%s", s, $9; s = "/"}' "$RESULTS")" \
    "$(awk -F'\t' -v c="$c" '$1 == c {printf "%s%s%%", s, $12; s = "/"}' "$RESULTS")" \
    "$(awk -F'\t' -v c="$c" '$1 == c {printf "%s%s%%", s, $13; s = "/"}' "$RESULTS")" \
    "$(awk -F'\t' -v c="$c" '$1 == c {n += $10; e += $11} END {print n "/" e}' "$RESULTS")"
done
echo
NGX_RPS=$(col nginx 3); NGX_CPU=$(col nginx 7)
PB_RPS=$(col pingora 3); PB_CPU=$(col pingora 7)
PBT_RPS=$(col pingora-to 3); PBT_CPU=$(col pingora-to 7)
PASS_RPS=$(col fg-pass 3); PASS_CPU=$(col fg-pass 7)
FULL_RPS=$(col fg-full 3); FULL_CPU=$(col fg-full 7)
BASIC_RPS=$(col fg-basic 3); BASIC_CPU=$(col fg-basic 7)
PATIENT_RPS=$(col fg-patient 3); PATIENT_CPU=$(col fg-patient 7)
FULLB_RPS=$(col fg-full-b 3); FULLB_CPU=$(col fg-full-b 7)
HAP_RPS=$(col haproxy 3); HAP_CPU=$(col haproxy 7)
SEARCH_RPS=$(col fg-search 3)
echo "ratios (medians)                          throughput   CPU/req"
printf '  fhirgate full   / nginx                 %8s   %8s   (contract: throughput >= 1.0)\n' "$(ratio "$FULL_RPS" "$NGX_RPS")" "$(ratio "$FULL_CPU" "$NGX_CPU")"
printf '  fhirgate full   / pingora pass-through  %8s   %8s   (contract: throughput >= 0.9)\n' "$(ratio "$FULL_RPS" "$PB_RPS")" "$(ratio "$FULL_CPU" "$PB_CPU")"
printf '  fhirgate full   / pingora with timeouts %8s   %8s   (the same upstream timeouts on both)\n' "$(ratio "$FULL_RPS" "$PBT_RPS")" "$(ratio "$FULL_CPU" "$PBT_CPU")"
printf '  fhirgate full   / pingora, round by round: throughput %s; CPU/req %s\n' "$(paired fg-full pingora 3)" "$(paired fg-full pingora 7)"
printf '  pingora pass    / nginx                 %8s   %8s\n' "$(ratio "$PB_RPS" "$NGX_RPS")" "$(ratio "$PB_CPU" "$NGX_CPU")"
printf '  fhirgate metadata / nginx               %8s   %8s\n' "$(ratio "$PASS_RPS" "$NGX_RPS")" "$(ratio "$PASS_CPU" "$NGX_CPU")"
printf '  fhirgate full   / fhirgate metadata     %8s   %8s\n' "$(ratio "$FULL_RPS" "$PASS_RPS")" "$(ratio "$FULL_CPU" "$PASS_CPU")"
printf '  fhirgate basic  / fhirgate full         %8s   %8s\n' "$(ratio "$BASIC_RPS" "$FULL_RPS")" "$(ratio "$BASIC_CPU" "$FULL_CPU")"
printf '  patient policy  / fhirgate full         %8s   %8s   (issue 3: throughput >= 0.9)\n' "$(ratio "$PATIENT_RPS" "$FULL_RPS")" "$(ratio "$PATIENT_CPU" "$FULL_CPU")"
printf '  fhirgate B      / fhirgate (A/B)        %8s   %8s   (FHIRGATE_BIN_B against FHIRGATE_BIN)\n' "$(ratio "$FULLB_RPS" "$FULL_RPS")" "$(ratio "$FULLB_CPU" "$FULL_CPU")"
printf '  haproxy jwt_verify / nginx              %8s   %8s\n' "$(ratio "$HAP_RPS" "$NGX_RPS")" "$(ratio "$HAP_CPU" "$NGX_CPU")"
printf '  fhirgate full   / haproxy jwt_verify    %8s   %8s\n' "$(ratio "$FULL_RPS" "$HAP_RPS")" "$(ratio "$FULL_CPU" "$HAP_CPU")"
printf '  filtered search: %s MB/s of upstream searchset through the gateway (%s B × %s req/s; issue 14: >= 200)\n' \
  "$(awk -v r="$SEARCH_RPS" -v b="$SEARCH_BYTES" 'BEGIN { if (r !~ /^[0-9.]+$/) print "-"; else printf "%.0f", r * b / 1e6 }')" "$SEARCH_BYTES" "$SEARCH_RPS"
printf '  token issuance: %s tokens/s through the gateway, %s tokens/s direct to the control API (contract: >= 2000)\n' \
  "$(col issue-gw 3)" "$(col issue-ctl 3)"
printf '  fhirgate RSS: %s kB before the runs, %s kB after\n' "$FG_RSS_START" "$FG_RSS_END"
echo
echo "notes: 'proxy µs/req' is utime+stime of the proxy process(es) per request (nginx: master + workers;"
echo "       fhirgate: the whole process, so issuance includes the control API and SQLite). 'gw-add p99' is the"
echo "       upper bucket bound (ms) of fhirgate_gateway_added_seconds for the run (at saturation, not at 50 %)."
echo "       fg-pass (GET metadata) is answered from memory (rendered once per upstream answer, 10 s): no upstream"
echo "       round trip, so not a pass-through baseline; 'pingora' is. 'foreign CPU' above ~5 % means something else was running."
echo "       fg-half: wrk's p50/p99 there are the client-side latency at ~50 % load; gw-add p99 is the contract's number."
if [[ $PERF == 1 ]]; then
  for c in $CASES; do
    data="$TMP/perf-$c-$REPS.data"
    [[ -s $data ]] || continue
    echo
    echo "== $c: where the proxy's CPU went (perf cpu-clock samples of rep $REPS, by function, self)"
    perf report -i "$data" --stdio --no-children --sort dso,sym 2>/dev/null | grep -E '^ +[0-9.]+%' | head -40 | cut -c1-160
  done
fi
