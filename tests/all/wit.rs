//! The worlds in `wit/` parse and resolve against their WASI dependencies.

#[test]
fn wit_worlds_resolve() {
    let mut resolve = wit_parser::Resolve::default();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("wit");
    let (package, _) = resolve.push_dir(&dir).expect("wit/ must parse");
    for world in [
        "http-process",
        "background-process",
        "queue-consumer",
        "shared-state",
    ] {
        resolve
            .select_world(&[package], Some(world))
            .unwrap_or_else(|e| panic!("world `{world}`: {e:#}"));
    }
}
