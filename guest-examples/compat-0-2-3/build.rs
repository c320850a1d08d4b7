// wasm-component-ld merges its built-in WASI preview1 adapter's world (a newer
// 0.2.x) into ours even though this guest never uses it, which raises our
// wasi:io and wasi:cli imports to the adapter's version. Leave it out.
fn main() {
    println!("cargo::rustc-link-arg=--wasi-adapter=none");
}
