# Sourced by the benchmark scripts: `$app`, a temporary directory (removed on exit) holding a
# Procfile of one `web` type, hello from `cargo bench`'s guest build (target/bench-guests).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hello=$root/target/bench-guests/wasm32-wasip2/release/hello.wasm
[ -f "$hello" ] || { echo "no $hello: run \`cargo bench\` once to build the guests" >&2; exit 1; }
app=$(mktemp -d)
trap 'rm -rf "$app"' EXIT
printf 'web: %s\n' "$hello" > "$app/Procfile"
