//! Integration tests: real guests built from `guest-examples/`, the real `wasmform` binary,
//! real HTTP over loopback. One test binary so wasmtime is linked once.

mod bad_input;
mod ci;
#[cfg(feature = "cluster")]
mod cluster;
mod control;
mod deploy;
mod embedding;
mod errors;
mod formation;
mod front_door;
mod lifecycle;
mod limits;
mod manifest;
mod remote;
mod shared;
mod support;
mod systemd;
mod tcp;
mod toolchains;
mod tools;
mod wit;
