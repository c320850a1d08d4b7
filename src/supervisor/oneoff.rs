//! One-off processes (`wasmform run`): a `wasi:cli/run` instance named `run.N` beside the
//! formation, with a type's component, environment, buckets and queues (or a component file
//! of its own), its standard streams attached to its client or sent to the log.
//!
//! A one-off is not part of the formation: no slot holds it, it is never restarted, and a
//! scale or deploy leaves it alone. Its memory limit must fit in the budget's free room when
//! it starts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{ControlError, Supervisor, reserved};
use crate::app::{ByteSize, ProcessName, ProcessSpec};
use crate::events::Fields;
use crate::instance::{self, RunEnd};
use crate::runtime::shared::SharedCtx;
use crate::runtime::{Attached, Compiled, InstanceSetup, Kind};

/// What `wasmform run` asks for.
#[derive(Debug, Clone)]
pub struct OneOff {
    /// A process type of the formation, or the absolute path of a `.wasm` component.
    pub target: String,
    /// Arguments after the program name; `None`: the type's own (from its Procfile line).
    pub args: Option<Vec<String>>,
    /// Variables added to (and overriding) the type's environment.
    pub env: BTreeMap<String, String>,
    /// Memory limit; default the type's (a file: the host's default).
    pub memory: Option<ByteSize>,
    /// Longest run; `None`: no limit.
    pub timeout: Option<Duration>,
}

/// Whether `target` names a component file rather than a process type: a path (a `/`) or a
/// `.wasm` name. The client resolves such a target against its own directory.
pub fn is_file(target: &str) -> bool {
    target.ends_with(".wasm") || target.contains('/')
}

/// A one-off checked and ready to start.
pub struct Prepared {
    /// `run.3`
    pub name: String,
    /// The type it runs as, or `run` for a file.
    process: String,
    compiled: Arc<Compiled>,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    memory: ByteSize,
    timeout: Option<Duration>,
    shared: SharedCtx,
    allowed_outbound_hosts: Vec<String>,
    release: u32,
    colour: usize,
}

/// How a one-off ended, as its exit status says (documented in README, "One-off processes").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    Ended(RunEnd),
    /// Its `--timeout` passed: stopped.
    TimedOut(Duration),
    /// Its client cancelled it (Ctrl-C) or went away.
    Cancelled,
}

impl RunOutcome {
    /// The exit status `wasmform run` exits with: the guest's own, else 124 for a timeout, 130
    /// for a cancellation, 134 for a trap, 137 for the memory limit, 1 when it could not start.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunOutcome::Ended(RunEnd::Exited(code)) => *code,
            RunOutcome::Ended(RunEnd::FailedToStart(_)) => 1,
            RunOutcome::Ended(RunEnd::Trapped(_)) => 134,
            RunOutcome::Ended(RunEnd::OutOfMemory(_)) => 137,
            RunOutcome::TimedOut(_) => 124,
            RunOutcome::Cancelled => 130,
        }
    }

    /// For the log and the client: `exited with status 3`, `wasm trap: …`.
    pub fn reason(&self) -> String {
        match self {
            RunOutcome::Ended(end) => end.reason(),
            RunOutcome::TimedOut(after) => format!(
                "stopped after its timeout of {}",
                crate::units::humanize(*after)
            ),
            RunOutcome::Cancelled => "cancelled by its client".into(),
        }
    }
}

impl Supervisor {
    /// Checks a one-off and names it; a refusal names the value at fault. `file` components
    /// are compiled here (blocking work, on a blocking thread).
    pub async fn prepare_run(self: &Arc<Self>, run: OneOff) -> Result<Prepared, ControlError> {
        // The name comes last, once nothing can refuse the run.
        let mut prepared = if is_file(&run.target) {
            let path = PathBuf::from(&run.target);
            let runtime = self.runtime.clone();
            let spec = ProcessSpec::new(
                ProcessName::new("run").expect("a valid name"),
                path.clone(),
                Vec::new(),
                format!("`wasmform run {}`", path.display()),
            );
            let compiled = tokio::task::spawn_blocking(move || runtime.compile(&spec, &path))
                .await
                .map_err(|e| ControlError::Failed(format!("compiling failed: {e}")))?
                .map_err(|e| ControlError::Invalid(format!("{e:#}")))?;
            Prepared {
                name: String::new(),
                process: "run".to_string(),
                compiled: Arc::new(compiled),
                args: Vec::new(),
                env: BTreeMap::new(),
                memory: self.default_memory,
                timeout: run.timeout,
                shared: SharedCtx {
                    store: self.shared.clone(),
                    buckets: Default::default(),
                    queues: Default::default(),
                    denied: None,
                },
                allowed_outbound_hosts: Vec::new(),
                release: 0,
                colour: 0,
            }
        } else {
            let state = self.lock();
            let Some(version) = ProcessName::new(&run.target)
                .ok()
                .and_then(|name| state.types.get(&name))
            else {
                let known: Vec<String> = state.types.keys().map(|k| k.to_string()).collect();
                return Err(ControlError::Invalid(format!(
                    "unknown process type `{}`: known types are {} (or give a component file, e.g. `wasmform run ./tool.wasm`)",
                    run.target,
                    known.join(", ")
                )));
            };
            Prepared {
                name: String::new(),
                process: version.spec.name.to_string(),
                compiled: version.compiled.clone(),
                args: version.spec.args.clone(),
                env: version.spec.env.clone(),
                memory: state
                    .desired
                    .get(&version.spec.name)
                    .map_or(self.default_memory, |s| s.memory),
                timeout: run.timeout,
                shared: version.shared.clone(),
                allowed_outbound_hosts: version.spec.allowed_outbound_hosts.clone(),
                release: version.release,
                colour: version.colour,
            }
        };
        match &prepared.compiled.kind {
            Kind::Command(_) => {}
            Kind::Http(_) => {
                return Err(ControlError::Invalid(format!(
                    "`{}` is an HTTP component (it exports wasi:http/incoming-handler, not wasi:cli/run): `wasmform run` runs commands; send it a request instead (`curl` the front door), or build the task as a command (a Rust `fn main`, `wasm32-wasip2`)",
                    run.target
                )));
            }
            Kind::Consumer(_) => {
                return Err(ControlError::Invalid(format!(
                    "`{}` is a queue consumer (it exports a handler for queue deliveries, not wasi:cli/run): `wasmform run` runs commands; enqueue a message for it instead",
                    run.target
                )));
            }
        }
        let memory = run.memory.unwrap_or(prepared.memory);
        if memory > self.limits.max_memory {
            return Err(ControlError::Invalid(format!(
                "--memory {memory} is above this host's maximum of {}: ask for less, or restart `wasmform up` with a larger `--max-memory`",
                self.limits.max_memory
            )));
        }
        {
            let state = self.lock();
            let free = self
                .limits
                .capacity
                .as_u64()
                .saturating_sub(reserved(&state));
            if memory.as_u64() > free {
                return Err(ControlError::Failed(format!(
                    "no room for a one-off of {memory}: the formation reserves {} of the {} budget; ask for less with --memory, or scale something down",
                    ByteSize::bytes(reserved(&state)),
                    self.limits.capacity
                )));
            }
        }
        for (key, value) in run.env {
            if crate::app::PLATFORM_ENV.contains(&key.as_str()) {
                return Err(ControlError::Invalid(format!(
                    "-e {key}=…: `{key}` is set by wasmform and cannot be overridden"
                )));
            }
            prepared.env.insert(key, value);
        }
        if let Some(args) = run.args {
            prepared.args = args;
        }
        prepared.memory = memory;
        let index = self.runs.fetch_add(1, Ordering::Relaxed) + 1;
        prepared.name = format!("run.{index}");
        Ok(prepared)
    }

    /// Runs a prepared one-off until it ends, times out or `cancel` fires. Without `stdio`, its
    /// output goes to the app log under its name.
    pub async fn run_one_off(
        &self,
        run: Prepared,
        stdio: Option<Attached>,
        cancel: CancellationToken,
    ) -> RunOutcome {
        let Kind::Command(pre) = &run.compiled.kind else {
            unreachable!("checked by prepare_run");
        };
        let fields = || Fields::instance(&run.name, &run.process, run.release);
        self.logs.host(format!(
            "{} started by `wasmform run` ({}{}{})",
            run.name,
            run.compiled.program,
            if run.args.is_empty() { "" } else { " " },
            run.args.join(" ")
        ));
        self.events.emit("run.started", fields());
        let setup = InstanceSetup {
            instance: &run.name,
            process: &run.process,
            program: &run.compiled.program,
            args: &run.args,
            port: self.port,
            memory: run.memory,
            memory_used: Arc::default(),
            stdout: self.logs.sink(&run.name, run.colour),
            stderr: self.logs.sink(&run.name, run.colour),
            env: &run.env,
            allowed_outbound_hosts: &run.allowed_outbound_hosts,
            shared: &run.shared,
            listen: None,
            stdio,
            cluster: None,
        };
        let sinks = (setup.stdout.clone(), setup.stderr.clone());
        let go = instance::run_command(&self.runtime, pre, setup, || {});
        let timeout = async {
            match run.timeout {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            end = go => RunOutcome::Ended(end),
            () = timeout => RunOutcome::TimedOut(run.timeout.unwrap_or_default()),
            () = cancel.cancelled() => RunOutcome::Cancelled,
            () = self.cancel.cancelled() => RunOutcome::Cancelled,
        };
        sinks.0.flush();
        sinks.1.flush();
        let reason = outcome.reason();
        self.logs.host(format!("{} {reason}", run.name));
        self.events.emit(
            "run.exited",
            Fields {
                exit_code: Some(outcome.exit_code()),
                ..fields().because(&reason)
            },
        );
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_end_has_its_own_exit_status() {
        let codes = [
            RunOutcome::Ended(RunEnd::Exited(0)),
            RunOutcome::Ended(RunEnd::Exited(7)),
            RunOutcome::Ended(RunEnd::FailedToStart("x".into())),
            RunOutcome::Ended(RunEnd::Trapped("x".into())),
            RunOutcome::Ended(RunEnd::OutOfMemory("x".into())),
            RunOutcome::TimedOut(Duration::from_secs(1)),
            RunOutcome::Cancelled,
        ]
        .map(|o| o.exit_code());
        assert_eq!(codes, [0, 7, 1, 134, 137, 124, 130]);
    }
}
