//! The one place that owns wasmtime: the [`Engine`], the [`Linker`], compiled components with
//! their pre-instantiated templates, the epoch ticker, and the store data of an instance.
//!
//! Everything above this module (supervisor, router, CLI) talks about process types and
//! instances, never about wasmtime types, except through [`crate::instance`].

mod compile;
mod limiter;
pub mod shared;
mod sockets;
mod state;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sha2::Digest as _;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::app::{ByteSize, ProcessSpec};
use crate::logs::LogSink;

pub use self::compile::compile_all;
pub use self::limiter::MemoryLimiter;
pub use self::sockets::Listening;
pub use self::state::InstanceState;

/// How often the epoch advances. A running guest yields to the async runtime once per tick, so
/// this is the longest a spinning guest holds a tokio worker thread.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Export that makes a component an HTTP process.
const HTTP_EXPORT: &str = "wasi:http/incoming-handler@0.2";
/// Export that makes a component a background process.
const RUN_EXPORT: &str = "wasi:cli/run@0.2";
const CONSUMER_EXPORT: &str = "wasmform:host/consumer@0.1";

/// Engine-wide settings, fixed for the life of the host.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// How many instances may exist at once; sizes the pooling allocator.
    pub max_instances: u32,
    /// The largest per-instance memory limit of any type; sizes each memory slot, so that
    /// address space is reserved from the formation rather than 4 GiB per slot.
    pub max_memory: ByteSize,
    /// Whether compiled components are cached on disk (wasmtime's cache directory).
    pub cache: bool,
    /// Largest component file accepted.
    pub max_component_size: ByteSize,
    /// Largest wasi:http fields resource of an instance ([`crate::proxy::HttpLimits`]).
    pub max_fields_size: usize,
}

/// Guard region after each linear memory: wasmtime's default on 64-bit hosts, set explicitly
/// because [`MemoryLayout`] counts it.
const GUARD: u64 = 32 << 20;

/// A 32-bit memory whose slot reserves this much (plus the guard) needs no bounds checks.
const FULL_RESERVATION: u64 = 4 << 30;

/// Address space the memory pool may reserve for the 4 GiB layout: half of x86-64's 128 TiB of
/// user space, so the rest of the process (and ASLR) keeps plenty.
const ADDRESS_SPACE_BUDGET: u64 = 64 << 40;

/// How the pool's memory slots are sized. The reservation is virtual address space only
/// (`PROT_NONE` until a guest grows into it), so its size costs no memory; it decides whether
/// guest loads and stores carry explicit bounds checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MemoryLayout {
    /// Bytes reserved per memory slot (before the guard).
    reservation: u64,
}

impl MemoryLayout {
    /// 4 GiB per slot, so 32-bit guests run without bounds checks (+1 to +16 % on CPython,
    /// WASMTIME-NOTES), when every slot's 4 GiB and guard fit in the budget: the smaller of
    /// [`ADDRESS_SPACE_BUDGET`] and half the process's address-space limit (`RLIMIT_AS`,
    /// `ulimit -v`). Otherwise each slot reserves only `max_memory`, the largest limit a type
    /// may be given, and the compiled code checks bounds.
    fn choose(max_memory: u64, memories: u64, limit: Option<u64>) -> Self {
        let budget = limit.map_or(ADDRESS_SPACE_BUDGET, |l| (l / 2).min(ADDRESS_SPACE_BUDGET));
        let full = Self {
            reservation: FULL_RESERVATION.max(max_memory),
        };
        if full.address_space(memories) <= budget {
            full
        } else {
            Self {
                reservation: max_memory,
            }
        }
    }

    /// Address space that `memories` slots of this layout take.
    fn address_space(&self, memories: u64) -> u64 {
        memories.saturating_mul(self.reservation + GUARD)
    }
}

/// The process's address-space limit (`RLIMIT_AS`), if it has one.
fn address_space_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` into the valid pointer it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// The engine, the linker shared by every process type, and the epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<InstanceState>,
    /// Largest component file accepted.
    max_component_size: ByteSize,
    /// Largest wasi:http fields resource of an instance.
    max_fields_size: usize,
    /// Stops the epoch thread when the runtime is dropped.
    _epoch: EpochTicker,
}

/// What a component is, decided from its exports.
pub enum Kind {
    /// Exports `wasi:http/incoming-handler`: serves requests.
    Http(ProxyPre<InstanceState>),
    /// Exports `wasi:cli/run`: runs in the background.
    Command(CommandPre<InstanceState>),
    /// Exports `wasmform:host/consumer`: handles queue messages.
    Consumer(ConsumerPre),
}

/// A pre-instantiated queue consumer and where its `handle` export is.
pub struct ConsumerPre {
    pub pre: wasmtime::component::InstancePre<InstanceState>,
    pub handle: wasmtime::component::ComponentExportIndex,
}

/// A process type's component, compiled and pre-instantiated: ready to stamp out instances.
pub struct Compiled {
    /// The pre-instantiated template.
    pub kind: Kind,
    /// Component file name, used as the guest's program name (`argv[0]`).
    pub program: String,
    /// SHA-256 of the component file, hex.
    pub digest: String,
}

impl Compiled {
    /// `true` for HTTP components.
    pub fn is_http(&self) -> bool {
        matches!(self.kind, Kind::Http(_))
    }

    /// `http`, `background` or `consumer`, for `ps`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Http(_) => "http",
            Kind::Command(_) => "background",
            Kind::Consumer(_) => "consumer",
        }
    }
}

impl Runtime {
    /// Largest component file accepted (`--max-component-size`).
    pub fn max_component_size(&self) -> ByteSize {
        self.max_component_size
    }

    /// Creates the engine, sized for `settings`, and links WASI and WASI HTTP.
    pub fn new(settings: &EngineSettings) -> Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);

        let max_memory = settings.max_memory.as_usize();
        // Twice the instance limit: a single-use type's slot starts its next instance while
        // the request that used up the last one still runs. Only address space is reserved.
        let slots = settings.max_instances.max(1).saturating_mul(2);
        let memories = u64::from(slots.saturating_mul(2));
        let limit = address_space_limit();
        let layout = MemoryLayout::choose(settings.max_memory.as_u64(), memories, limit);
        if let Some(limit) = limit
            && layout.address_space(memories) > limit
        {
            bail!(
                "the instance pool needs {} of address space ({memories} memories of {} for \
                 --max-instances {}, each with a {} guard), more than this process's \
                 address-space limit of {} (`ulimit -v`, systemd's `LimitAS=`): lower \
                 `--max-instances` or `--max-memory`, or raise the limit",
                ByteSize::bytes(layout.address_space(memories)),
                ByteSize::bytes(layout.reservation),
                settings.max_instances,
                ByteSize::bytes(GUARD),
                ByteSize::bytes(limit),
            );
        }
        config.memory_reservation(layout.reservation);
        config.memory_guard_size(GUARD);
        config.memory_reservation_for_growth(0);
        tracing::debug!(?layout, "memory layout");
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots)
            // A Rust wasip2 component holds a few core instances and one or two memories.
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(4))
            .total_stacks(slots)
            .max_memory_size(max_memory)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_core_instances_per_component(32);
        // An instance's memory is reset when it is dropped. By default that is an `madvise`
        // of everything it touched: in a multi-threaded process each one is a TLB shootdown
        // (an IPI to the other cores) plus page faults when the slot is used again, which
        // dominated a fresh instance per request (single-use types). With `PAGEMAP_SCAN`
        // (Linux 6.7+; ignored elsewhere) only the pages the guest dirtied are found and
        // copied back, up to the first 4 MiB of each memory, without a system call to unmap
        // them. Measured with the 13 MB componentize-js guest, single use, web=4, `wrk -t2
        // -c16`: 1.7–1.8k req/s without, 3.3–4.3k with (1, 2, 4, 16 and 64 MiB performed
        // alike); the 18 MB componentize-py guest 430 → 590. Long-lived instances are not
        // affected: they are not dropped.
        pool.linear_memory_keep_resident(4 << 20)
            .table_keep_resident(256 << 10)
            .pagemap_scan(wasmtime::Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));

        // Compiled code is cached on disk keyed by content and engine configuration, so a
        // second `up` of an unchanged app does not recompile.
        if settings.cache {
            match wasmtime::Cache::new(wasmtime::CacheConfig::new()) {
                Ok(cache) => {
                    config.cache(Some(cache));
                }
                Err(e) => tracing::warn!(cause = %e, "compiled-code cache disabled"),
            }
        }

        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("failed to create the wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        shared::add_to_linker(&mut linker)?;
        let epoch = EpochTicker::start(engine.clone());
        Ok(Self {
            engine,
            linker,
            max_component_size: settings.max_component_size,
            max_fields_size: settings.max_fields_size,
            _epoch: epoch,
        })
    }

    /// Reads, checks and compiles one process type's component and decides its kind. The
    /// bytes come from `file` (a release's stored copy); messages name `spec.component`.
    ///
    /// Blocking and CPU-heavy: call it off the async runtime.
    pub fn compile(&self, spec: &ProcessSpec, file: &Path) -> Result<Compiled> {
        let path = &spec.component;
        let ctx = || {
            format!(
                "process type `{}` ({}): component `{}`",
                spec.name,
                spec.origin,
                path.display()
            )
        };
        let bytes = read_component(file, self.max_component_size).with_context(ctx)?;
        let component = Component::new(&self.engine, &bytes)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{}: failed to compile (is the file complete?)", ctx()))?;

        let ty = component.component_type();
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .map(|(n, _)| n.to_string())
            .collect();
        let has = |prefix: &str| exports.iter().any(|e| e.starts_with(prefix));

        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            anyhow::anyhow!(
                "{}: imports something this host does not provide: {e}\n\
                 wasmform provides the `wasi:cli/command` and `wasi:http/proxy` worlds of WASI 0.2",
                ctx()
            )
        })?;
        let kind = if let Some(export) = exports.iter().find(|e| e.starts_with(CONSUMER_EXPORT)) {
            let interface = component.get_export_index(None, export).with_context(ctx)?;
            let handle = component
                .get_export_index(Some(&interface), "handle")
                .with_context(|| format!("{}: `{export}` has no `handle` function", ctx()))?;
            Kind::Consumer(ConsumerPre { pre, handle })
        } else if has(HTTP_EXPORT) {
            Kind::Http(
                ProxyPre::new(pre)
                    .map_err(anyhow::Error::from)
                    .with_context(ctx)?,
            )
        } else if has(RUN_EXPORT) {
            Kind::Command(
                CommandPre::new(pre)
                    .map_err(anyhow::Error::from)
                    .with_context(ctx)?,
            )
        } else {
            let found = if exports.is_empty() {
                "it exports nothing".to_string()
            } else {
                format!("it exports {}", exports.join(", "))
            };
            bail!(
                "{}: not a process: a component must export `wasi:http/incoming-handler` \
                 (an HTTP process), `wasi:cli/run` (a background process) or \
                 `wasmform:host/consumer` (a queue consumer), but {found}",
                ctx()
            );
        };
        let program = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let digest = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Compiled {
            kind,
            program,
            digest,
        })
    }

    /// Creates the store for one instance: its own WASI context, memory limiter and output.
    pub fn new_store(&self, mut setup: InstanceSetup<'_>) -> Store<InstanceState> {
        let stdio = setup.stdio.take();
        let state = InstanceState::new(&setup, stdio, self.max_fields_size);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        // Yield to the async runtime at every epoch tick so a spinning guest never holds a
        // tokio worker, and stays cancellable by timeouts and shutdown.
        store.epoch_deadline_async_yield_and_update(1);
        store
    }
}

/// What an instance's store is built from.
pub struct InstanceSetup<'a> {
    /// `web.1`
    pub instance: &'a str,
    /// `web`
    pub process: &'a str,
    /// `argv[0]`, the component's file name.
    pub program: &'a str,
    /// Arguments after the program name.
    pub args: &'a [String],
    /// The HTTP port, given to guests as `PORT` like foreman does.
    pub port: u16,
    /// Memory limit over all of the instance's linear memories.
    pub memory: ByteSize,
    /// Kept up to date with the instance's memory use, for `ps`.
    pub memory_used: Arc<std::sync::atomic::AtomicU64>,
    /// Where the guest's stdout goes.
    pub stdout: LogSink,
    /// Where the guest's stderr goes.
    pub stderr: LogSink,
    /// The type's environment (`.env`, `[env]`, the type's `env`); the platform's variables
    /// (`PORT`, `DYNO`…) cannot be overridden.
    pub env: &'a std::collections::BTreeMap<String, String>,
    /// Hosts outgoing HTTP may reach (`allowed_outbound_hosts`); empty denies all.
    pub allowed_outbound_hosts: &'a [String],
    /// The shared store and the buckets and queues this type may use.
    pub shared: &'a shared::SharedCtx,
    /// A TCP process instance: the `$PORT` it may listen on and the host connections it may
    /// accept (`port` is that port then).
    pub listen: Option<Arc<Listening>>,
    /// Attached standard streams (`wasmform run`) instead of the log and an empty stdin.
    pub stdio: Option<Attached>,
    /// In a cluster: this node's name and the fencing token of the instance's claim, given to
    /// the guest as `WASMFORM_NODE` and `WASMFORM_FENCE`.
    pub cluster: Option<(&'a str, i64)>,
}

/// A one-off process's standard streams, attached to its client.
pub struct Attached {
    pub stdin: wasmtime_wasi::cli::AsyncStdinStream,
    pub stdout: wasmtime_wasi::cli::AsyncStdoutStream,
    pub stderr: wasmtime_wasi::cli::AsyncStdoutStream,
}

/// Reads a component file and checks that it is a component, with a helpful message if it is
/// something else.
fn read_component(path: &Path, max_size: ByteSize) -> Result<Vec<u8>> {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.len() > max_size.as_u64()
    {
        bail!(
            "the file is {}, above the limit of {max_size}: raise `--max-component-size` if it is meant to be this big",
            ByteSize::bytes(meta.len())
        );
    }
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "file not found: build it first (e.g. `cargo build --release --target wasm32-wasip2`) or fix the path"
            )
        }
        Err(e) => return Err(e).context("failed to read the file"),
    };
    const MAGIC: &[u8] = b"\0asm";
    const MODULE_VERSION: &[u8] = &[1, 0, 0, 0];
    if bytes.is_empty() {
        bail!("the file is empty: expected a WebAssembly component");
    }
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        bail!(
            "not a WebAssembly file (no `\\0asm` header): expected a component built for `wasm32-wasip2`"
        );
    }
    if &bytes[4..8] == MODULE_VERSION {
        bail!(
            "this is a core WebAssembly module, not a component: build it for `wasm32-wasip2`, \
             or wrap it with `wasm-tools component new`"
        );
    }
    Ok(bytes)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a thread of its own, as `wasmtime serve`
/// does; the thread ends when this is dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("wasmform-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("failed to spawn the epoch thread");
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn slots_reserve_4_gib_when_they_fit_and_only_the_limit_when_not() {
        // The default pool (1024 instances, 4096 memories): 16 TiB of address space.
        let layout = MemoryLayout::choose(GIB, 4096, None);
        assert_eq!(layout.reservation, FULL_RESERVATION);
        // 10 000 instances' 40 000 memories would take 161 TiB.
        assert_eq!(MemoryLayout::choose(GIB, 40_000, None).reservation, GIB);
        // `ulimit -v` (valgrind, a unit's LimitAS=) shrinks the budget to half the limit.
        assert_eq!(
            MemoryLayout::choose(16 << 20, 32, Some(64 * GIB)).reservation,
            16 << 20
        );
        assert_eq!(
            MemoryLayout::choose(GIB, 4, Some(64 * GIB)).reservation,
            FULL_RESERVATION
        );
        // A limit above 4 GiB is reserved whole either way.
        assert_eq!(MemoryLayout::choose(8 * GIB, 16, None).reservation, 8 * GIB);
    }
}
