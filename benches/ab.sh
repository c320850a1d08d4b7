#!/usr/bin/env bash
# A/B of two wasmform binaries on the hello guest, as README's "Performance" reports it:
#
#     benches/ab.sh OLD_BINARY NEW_BINARY [PAIRS]
#
# Each pair runs both binaries one after the other (alternating which goes first), `up -m web=2`
# on hello from `cargo bench`'s guest build (target/bench-guests), `wrk -t2 -c64 -d5s` after a
# 1 s warm-up, and prints req/s and the host's CPU per request: Δ(utime + stime) from
# /proc/PID/stat over the measured run ÷ requests. Needs wrk and bc. Loopback only; every run
# is bounded by wrk's duration.
set -euo pipefail
old=$1 new=$2 pairs=${3:-3}
# shellcheck source=benches/hello-app.sh
source "$(dirname "$0")/hello-app.sh"

run() { # BINARY PORT
    rm -rf "$app/.wasmform"
    "$1" up -f "$app/Procfile" -p "$2" -m web=2 --capacity 1024GiB --queue 4096 > "$app/log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do grep -q "listening on" "$app/log" && break; sleep 0.1; done
    wrk -t2 -c64 -d1s "http://127.0.0.1:$2/" > /dev/null
    local t0 t1 out rps req
    t0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    out=$(wrk -t2 -c64 -d5s "http://127.0.0.1:$2/")
    t1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill -INT "$pid"; wait "$pid" || true
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    req=$(echo "$out" | awk '/requests in/ {print $1}')
    printf '%s req/s, %.1f µs CPU/request\n' "$rps" \
        "$(echo "($t1 - $t0) * 1000000 / $(getconf CLK_TCK) / $req" | bc -l)"
}

for i in $(seq "$pairs"); do
    if (( i % 2 )); then
        echo "old: $(run "$old" 5301)"; echo "new: $(run "$new" 5302)"
    else
        echo "new: $(run "$new" 5302)"; echo "old: $(run "$old" 5301)"
    fi
done
