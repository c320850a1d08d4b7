//! wasmform runs a Procfile of WASI 0.2 components as a *formation*: N isolated,
//! memory-limited instances per process type in one host process. HTTP is round-robined over
//! the instances of the web type; components exporting `wasi:cli/run` run as supervised
//! background workers.
//!
//! # Embedding
//!
//! The CLI is a thin layer over [`Host`]; embedders and tests use the same API:
//!
//! ```no_run
//! use std::path::Path;
//! use wasmform::{AppSpec, Host, HostOptions};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let app = AppSpec::from_procfile(Path::new("guest-examples/Procfile"))?;
//! let options = HostOptions { formation: Some("web=2".into()), ..HostOptions::default() };
//! // Validates the formation and compiles every component before anything listens.
//! let host = tokio::task::spawn_blocking(move || Host::new(app, options)).await??;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let running = host.start(listener).await?;
//! println!("serving on http://{}", running.local_addr());
//! running.shutdown(std::time::Duration::from_secs(30)).await;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! Data flows one way, and so do the modules' dependencies (a module imports only those
//! above it in this list):
//!
//! ```text
//! Procfile, wasmform.toml, .env ─► manifest ─► app::AppSpec ─► release (stage: store + hash)
//!                                                   │
//!                         host::Host::new (formation layered, engine sized, compiled)
//!                                                   │
//!   CLI scale/ps/logs ─► control ─┐          host::Host::start ─► supervisor
//!   CLI deploy/rollback ─► deploy ┴────────────────────────────► │ plan: what starts, stops, waits
//!                                                                │ one task per slot, restarts,
//!                                                                │ health, scale, roll-outs
//!                                    ├── web instances ─► router::Pool ◄── proxy (hyper)
//!                                    ├── TCP processes (wasi:cli/run on $PORT) ─► tcp::Backends ◄── tcp
//!                                    ├── workers (wasi:cli/run, idle-priority runtime)
//!                                    └── consumers ◄── shared::Store (queues, buckets)
//!   guest stdout/stderr and host events ─► logs ─► stdout, history, followers
//!   instance, formation, release and host changes ─► events ─► `GET /v1/events` (JSON Lines)
//! ```
//!
//! | module | its job |
//! |---|---|
//! | `units` | validated values: process names, sizes, durations |
//! | `logs`, `events`, `metrics`, `net` | the log stream, the event stream (JSON Lines), Prometheus metrics, accepting connections |
//! | `manifest` | reading an app: Procfile, `wasmform.toml`, `.env` (errors with file and line) |
//! | `app` | the resolved app: process types and their settings |
//! | `formation` | desired counts and memory per type, foreman's `-m`, the layering rule |
//! | `release` | numbered immutable releases and their stored components |
//! | `state` | the state directory: the persisted formation, the control socket |
//! | `runtime` | the only owner of wasmtime: engine, linker, pooling allocator, compiling |
//! | `shared` | shared state for scaled-out types: buckets and queues (SQLite or Redis) |
//! | `instance` | one web instance, worker run or queue consumer in its `Store` |
//! | `router` | the pool of free instances a request takes one from; no wasmtime types |
//! | `supervisor` | the formation kept running: `plan`, slots, restarts, health, scale, deploys |
//! | `proxy` | the HTTP front door: limits, routing, the router's own answers |
//! | `tcp` | the TCP front door: connections balanced over TCP processes, bytes proxied |
//! | `control` | the control API: routes, transports (Unix socket, TCP with a token) |
//! | `deploy` | deploys and rollbacks of a running host: validate and compile, then roll |
//! | `host` | [`Host`]: boot as named steps, start, [`RunningHost`] and its shutdown |
//! | `cli` | one file per subcommand |
//!
//! Only what an embedder uses is public (below); the rest is private to the crate.

mod app;
pub mod cli;
mod cluster;
mod control;
mod deploy;
mod events;
mod formation;
mod host;
mod instance;
mod logs;
mod manifest;
mod metrics;
mod net;
mod proxy;
mod release;
mod router;
mod runtime;
mod shared;
mod state;
mod supervisor;
mod tcp;
mod units;

/// Outside tools for the unit tests (`redis-server`), shared with the integration tests.
#[cfg(test)]
#[path = "../tests/all/tools.rs"]
mod test_tools;

pub use crate::app::{AppSpec, ProcessSpec};
pub use crate::control::TcpControl;
pub use crate::deploy::Deployer;
pub use crate::formation::{Formation, Scale};
pub use crate::host::{DEFAULT_MEMORY, Host, HostOptions, RunningHost};
pub use crate::proxy::HttpLimits;
pub use crate::supervisor::RestartPolicy;
pub use crate::units::{ByteSize, ProcessName, humanize};
