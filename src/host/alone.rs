//! A host of its own for one one-off process, when no host runs for the app (`wasmform run`
//! with nothing running): no front door, no control socket, and nothing recorded — no
//! release, no formation. It reads the app's files as `up` would (the current release unless
//! they changed since), compiles only the component it runs, and shares the app's state
//! (the embedded store in the state directory, or `[state] url`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio_util::sync::CancellationToken;

use super::DEFAULT_MEMORY;
use super::running::{BackgroundRuntime, system_memory};
use crate::app::AppSpec;
use crate::events::Events;
use crate::formation::Formation;
use crate::logs::Logs;
use crate::metrics::Metrics;
use crate::runtime::{Attached, EngineSettings, Runtime};
use crate::shared::Store;
use crate::state::StateDir;
use crate::supervisor::{Limits, OneOff, RestartPolicy, RunOutcome, Supervisor, SupervisorConfig};
use crate::units::ByteSize;

/// Runs `run` alone: `app` (if the target is one of its types, or for its state), its stored
/// memory limits from `state`.
pub(crate) async fn run_alone(
    app: Option<AppSpec>,
    state: Option<StateDir>,
    run: OneOff,
    stdio: Attached,
    cancel: CancellationToken,
) -> Result<RunOutcome> {
    let mut formation = match &app {
        Some(app) => Formation::default_for(app, DEFAULT_MEMORY),
        None => Formation::default(),
    };
    if let Some(state) = &state
        && let Some((stored, _)) = state.load_formation(&formation)?
    {
        formation = stored;
    }
    formation
        .apply_spec("all=0")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let max_memory = formation
        .iter()
        .map(|(_, s)| s.memory)
        .chain(run.memory)
        .chain([DEFAULT_MEMORY])
        .max()
        .unwrap_or(DEFAULT_MEMORY);
    let runtime = Arc::new(Runtime::new(&EngineSettings {
        max_instances: 4,
        max_memory,
        cache: true,
        max_component_size: ByteSize::mib(512),
        max_fields_size: crate::proxy::DEFAULT_FIELDS_SIZE,
    })?);
    // Only the component it runs is compiled.
    let mut types = Vec::new();
    if let Some(spec) = app
        .as_ref()
        .and_then(|app| app.process(&run.target))
        .cloned()
    {
        let compiler = runtime.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let file = spec.component.clone();
            compiler.compile(&spec, &file).map(|c| (spec, Arc::new(c)))
        })
        .await
        .context("compiling failed")??;
        types.push(compiled);
    }
    let dir = state.as_ref().map(|s| s.path().to_path_buf());
    let state_url = app.as_ref().and_then(|a| a.state_url.clone());
    let shared = Store::open(state_url.as_deref(), dir.as_deref()).await?;
    let background = BackgroundRuntime::start()?;
    let supervisor = Supervisor::new(SupervisorConfig {
        runtime,
        logs: Logs::silent(),
        restart: RestartPolicy::default(),
        port: 0,
        limits: Limits {
            capacity: system_memory(),
            max_instances: 4,
            max_memory,
            drain_timeout: Duration::from_secs(1),
        },
        types,
        release: 0,
        queue_limit: 1,
        rotate: 0,
        default_memory: DEFAULT_MEMORY,
        shared: Some(shared),
        formation,
        store: None,
        listening: Default::default(),
        background: background.handle(),
        metrics: Arc::new(Metrics::new()),
        events: Events::new(),
    });
    let prepared = supervisor
        .prepare_run(run)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let outcome = supervisor.run_one_off(prepared, Some(stdio), cancel).await;
    supervisor.shutdown(Duration::from_secs(1)).await;
    drop(background);
    Ok(outcome)
}
