//! Reading an app from its files: the Procfile, `wasmform.toml` and `.env`, resolved into the
//! [`AppSpec`](crate::app::AppSpec) the rest of the host runs. Nothing here knows about
//! wasmtime.
//!
//! | file | what it holds |
//! |---|---|
//! | `procfile.rs` | Procfile parsing, errors with line numbers |
//! | `schema.rs` | the `wasmform.toml` schema, errors with line, column and key path |
//! | `resolve.rs` | [`AppSpec::load`](crate::app::AppSpec::load): the files merged and checked |
//! | `dotenv.rs` | `.env` files |

mod dotenv;
pub mod procfile;
mod resolve;
pub mod schema;
