# benches/common.sh — sourced by the benchmark scripts: a temp dir and the processes they start,
# all cleaned up on exit, whatever ends the script.
#
# Before sourcing, set BENCH_NAME (the script's name, for messages) and BENCH_TMP_PREFIX; after
# it, $TMP is the temp dir and every pid appended to PIDS is stopped on exit (TERM, then KILL
# after 10 s). KEEP_TMP=1 keeps the temp dir.

TMP=$(mktemp -d "/tmp/$BENCH_TMP_PREFIX.XXXXXX")
chmod 755 "$TMP"
PIDS=()

bench_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ ${KEEP_TMP:-0} == 1 ]]; then
    echo "$BENCH_NAME: temp dir kept: $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM
