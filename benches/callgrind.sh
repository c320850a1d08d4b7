#!/usr/bin/env bash
# Instructions and allocations per hello request of one wasmform binary, under callgrind, as
# README's "Performance" reports them:
#
#     benches/callgrind.sh BINARY [REQUESTS]
#
# `up -m web=2` on hello from `cargo bench`'s guest build (target/bench-guests), 500 sequential
# keep-alive requests of warm-up, counters zeroed, REQUESTS (default 4000) more, counters
# dumped. Under `ulimit -v 33554432` with `--max-memory 16MiB --max-instances 8`: valgrind
# cannot map the pool's 4 GiB slots, and under that limit the host takes the small layout.
# callgrind counts the same for the same binary whatever else the machine does. Needs valgrind
# and python3. Loopback only; every loop is bounded by REQUESTS.
set -euo pipefail
bin=$1 requests=${2:-4000} port=${PORT:-5399}
# shellcheck source=benches/hello-app.sh
source "$(dirname "$0")/hello-app.sh"

client() { # COUNT: sequential keep-alive GETs
    python3 - "$port" "$1" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
PY
}

(
    ulimit -v 33554432
    exec valgrind --tool=callgrind --smc-check=all-non-file --callgrind-out-file="$app/cg" \
        "$bin" up -f "$app/Procfile" -p "$port" -m web=2 --max-memory 16MiB --max-instances 8
) > "$app/log" 2>&1 &
pid=$!
for _ in $(seq 600); do grep -q "listening on" "$app/log" && break; sleep 0.2; done
grep -q "listening on" "$app/log" || { cat "$app/log" >&2; exit 1; }
client 500
callgrind_control -z "$pid" > /dev/null
client "$requests"
callgrind_control -d "$pid" > /dev/null
sleep 1
kill -INT "$pid"; wait "$pid" || true

# The dump triggered above is cg.1: its summary is the instructions, and the calls to the
# allocator are summed from its call records.
python3 - "$app/cg.1" "$requests" <<'PY'
import re, sys
path, requests = sys.argv[1], int(sys.argv[2])
names, calls, callee, instructions = {}, {}, None, 0
for line in open(path, errors="replace"):
    if line.startswith("summary:"):
        instructions = int(line.split()[1])
    m = re.match(r"(c?fn)=\((\d+)\)(?: (.*))?", line)
    if m:
        if m.group(3):
            names[m.group(2)] = m.group(3).strip()
        callee = names.get(m.group(2)) if m.group(1) == "cfn" else None
        continue
    if line.startswith("calls=") and callee is not None:
        calls[callee] = calls.get(callee, 0) + int(line.split()[0][6:])
        callee = None
print(f"{instructions / requests:.0f} instructions per request")
for name in ["malloc", "calloc", "realloc", "free"]:
    n = sum(v for k, v in calls.items() if k == name or k.startswith(name + "'"))
    print(f"{name}: {n / requests:.1f} per request")
PY
