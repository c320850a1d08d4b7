//! Prometheus metrics, in the text exposition format, served at `GET /metrics` on the control
//! API and, with `--metrics ADDR`, on a loopback TCP address. Every metric is documented in
//! `docs/metrics.md`.
//!
//! Events (requests, restarts, instantiations) are counted where they happen; the state of the
//! formation (instances per state, memory, queue depth) is read from the supervisor at each
//! scrape, so there is one source of truth for it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// Shared, so counting a request clones a pointer instead of allocating a string.
    r#type: Arc<String>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    r#type: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    r#type: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    r#type: String,
    instance: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

/// Request counters and latency of one HTTP process type.
pub struct HttpMetrics {
    process: Arc<String>,
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
}

impl HttpMetrics {
    /// Counts one answered request.
    pub fn request(&self, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                r#type: self.process.clone(),
                status,
            })
            .inc();
        self.latency.observe(seconds);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    r#type: String,
    /// `in`: from clients to instances; `out`: back.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    r#type: String,
    reason: &'static str,
}

/// Connection counters of one TCP process type, resolved once.
#[derive(Clone)]
pub struct TcpMetrics {
    pub connections: Counter,
    pub open: Gauge,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    process: String,
    refused: Family<RefusalLabels, Counter>,
}

impl TcpMetrics {
    /// Counts a connection closed without reaching an instance: `backlog` (every instance
    /// full and the backlog too), `no_instance` (none with room in time), `connect` (the
    /// instance did not take it).
    pub fn refused(&self, reason: &'static str) {
        self.refused
            .get_or_create(&RefusalLabels {
                r#type: self.process.clone(),
                reason,
            })
            .inc();
    }
}

/// The formation's state as the gauges show it, read from `ps` at each scrape.
pub struct Gauges<'a> {
    /// Per type: name, desired and running instances.
    pub types: Vec<(&'a str, u32, u32)>,
    /// Per instance: its type, id, state, and linear memory in use (`None`: pending).
    pub instances: Vec<(&'a str, &'a str, &'static str, Option<u64>)>,
    /// The memory budget, in bytes.
    pub capacity: u64,
    /// Memory reserved by existing instances, in bytes.
    pub reserved: u64,
}

/// All metrics of one host.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<TypeLabel, Histogram, fn() -> Histogram>,
    restarts: Family<RestartLabels, Counter>,
    /// Queue messages whose delivery failed, by consumer type.
    queue_failures: Family<TypeLabel, Counter>,
    instantiate: Histogram,
    compile: Family<TypeLabel, Gauge<f64, AtomicU64>>,
    instances: Family<StateLabels, Gauge>,
    desired: Family<TypeLabel, Gauge>,
    running: Family<TypeLabel, Gauge>,
    memory: Family<InstanceLabels, Gauge>,
    queue: Family<TypeLabel, Gauge>,
    capacity: Gauge,
    reserved: Gauge,
    store_up: Gauge,
    tcp_connections: Family<TypeLabel, Counter>,
    tcp_open: Family<TypeLabel, Gauge>,
    tcp_bytes: Family<DirectionLabels, Counter>,
    tcp_refused: Family<RefusalLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric: one block per metric, with its help text (a list, longer than
    /// most functions, read top to bottom).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "wasmform_http_requests",
            "HTTP requests answered, by process type and status",
            requests.clone(),
        );
        let latency: Family<TypeLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "wasmform_http_request_duration_seconds",
            "Time from a request's arrival to its response headers, by process type",
            latency.clone(),
        );
        let restarts = Family::<RestartLabels, Counter>::default();
        registry.register(
            "wasmform_instance_restarts",
            "Instances replaced after ending, by process type and reason (trap, memory, timeout, exit, cancelled, boot)",
            restarts.clone(),
        );
        let queue_failures = Family::<TypeLabel, Counter>::default();
        registry.register(
            "wasmform_queue_delivery_failures",
            "Queue messages whose handler returned an error, trapped or timed out, by consumer type",
            queue_failures.clone(),
        );
        let instantiate = Histogram::new(exponential_buckets(0.00001, 2.0, 16));
        registry.register(
            "wasmform_instantiate_seconds",
            "Time to instantiate an instance from its pre-instantiated template",
            instantiate.clone(),
        );
        let compile = Family::<TypeLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "wasmform_compile_seconds",
            "Time to compile (or load from the cache) each process type's component, at start and in the last deploy that went live",
            compile.clone(),
        );
        let instances = Family::<StateLabels, Gauge>::default();
        registry.register(
            "wasmform_instances",
            "Instances by process type and state (starting, up, crashed, draining, pending)",
            instances.clone(),
        );
        let desired = Family::<TypeLabel, Gauge>::default();
        registry.register(
            "wasmform_desired_instances",
            "Desired instances per process type",
            desired.clone(),
        );
        let running = Family::<TypeLabel, Gauge>::default();
        registry.register(
            "wasmform_running_instances",
            "Instances up per process type",
            running.clone(),
        );
        let memory = Family::<InstanceLabels, Gauge>::default();
        registry.register(
            "wasmform_instance_memory_bytes",
            "Linear memory in use per instance",
            memory.clone(),
        );
        let queue = Family::<TypeLabel, Gauge>::default();
        registry.register(
            "wasmform_queued_requests",
            "Requests waiting for a free instance, per HTTP process type",
            queue.clone(),
        );
        let capacity = Gauge::default();
        registry.register(
            "wasmform_capacity_bytes",
            "The host's memory budget",
            capacity.clone(),
        );
        let reserved = Gauge::default();
        registry.register(
            "wasmform_reserved_bytes",
            "Memory limits of existing instances, summed",
            reserved.clone(),
        );
        let store_up = Gauge::default();
        registry.register(
            "wasmform_state_store_up",
            "1 while the shared store answers, 0 while it cannot be reached (a Redis server that went away)",
            store_up.clone(),
        );
        let tcp_connections = Family::<TypeLabel, Counter>::default();
        registry.register(
            "wasmform_tcp_connections",
            "Connections a TCP service handed to an instance, by process type",
            tcp_connections.clone(),
        );
        let tcp_open = Family::<TypeLabel, Gauge>::default();
        registry.register(
            "wasmform_tcp_connections_open",
            "Connections open through a TCP service, by process type",
            tcp_open.clone(),
        );
        let tcp_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "wasmform_tcp_bytes",
            "Bytes through TCP services, by process type and direction (in: from clients)",
            tcp_bytes.clone(),
        );
        let tcp_refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "wasmform_tcp_refused",
            "Connections closed without reaching an instance, by process type and reason (backlog, no_instance, connect)",
            tcp_refused.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            restarts,
            queue_failures,
            instantiate,
            compile,
            instances,
            desired,
            running,
            memory,
            queue,
            capacity,
            reserved,
            store_up,
            tcp_connections,
            tcp_open,
            tcp_bytes,
            tcp_refused,
        }
    }

    /// The connection metrics of one TCP process type.
    pub fn tcp(&self, process: &str) -> TcpMetrics {
        let label = TypeLabel {
            r#type: process.to_string(),
        };
        let bytes = |direction| {
            self.tcp_bytes.get_or_create_owned(&DirectionLabels {
                r#type: process.to_string(),
                direction,
            })
        };
        TcpMetrics {
            connections: self.tcp_connections.get_or_create_owned(&label),
            open: self.tcp_open.get_or_create_owned(&label),
            bytes_in: bytes("in"),
            bytes_out: bytes("out"),
            process: process.to_string(),
            refused: self.tcp_refused.clone(),
        }
    }

    /// The request metrics of one HTTP process type, resolved once so the request path
    /// neither allocates label strings nor looks the histogram up.
    pub fn http(&self, process: &str) -> HttpMetrics {
        HttpMetrics {
            process: Arc::new(process.to_string()),
            requests: self.requests.clone(),
            latency: self.latency.get_or_create_owned(&TypeLabel {
                r#type: process.to_string(),
            }),
        }
    }

    /// A failed queue delivery of a consumer type.
    pub fn queue_failure(&self, process: &str) {
        self.queue_failures
            .get_or_create(&TypeLabel {
                r#type: process.to_string(),
            })
            .inc();
    }

    /// Counts one restart; `reason` is the logged reason, classified.
    pub fn restart(&self, process: &str, reason: &str) {
        let reason = if reason.contains("memory quota") {
            "memory"
        } else if reason.contains("timed out") {
            "timeout"
        } else if reason.contains("exited with status") {
            "exit"
        } else if reason.contains("cancelled") {
            "cancelled"
        } else if reason.starts_with("failed to start") {
            "boot"
        } else {
            "trap"
        };
        self.restarts
            .get_or_create(&RestartLabels {
                r#type: process.to_string(),
                reason,
            })
            .inc();
    }

    /// Records one instantiation.
    pub fn instantiated(&self, seconds: f64) {
        self.instantiate.observe(seconds);
    }

    /// Records a type's compile time.
    pub fn compiled(&self, process: &str, seconds: f64) {
        self.compile
            .get_or_create(&TypeLabel {
                r#type: process.to_string(),
            })
            .set(seconds);
    }

    /// The exposition text, with the formation's state as of `ps` and `queues`.
    pub fn render(
        &self,
        ps: &Gauges<'_>,
        queues: &[(String, usize)],
        store: Option<bool>,
    ) -> String {
        if let Some(reachable) = store {
            self.store_up.set(i64::from(reachable));
        }
        self.instances.clear();
        self.memory.clear();
        for &(name, desired, running) in &ps.types {
            let label = TypeLabel {
                r#type: name.to_string(),
            };
            self.desired.get_or_create(&label).set(i64::from(desired));
            self.running.get_or_create(&label).set(i64::from(running));
        }
        for &(process, id, state, memory) in &ps.instances {
            self.instances
                .get_or_create(&StateLabels {
                    r#type: process.to_string(),
                    state,
                })
                .inc();
            if let Some(memory) = memory {
                self.memory
                    .get_or_create(&InstanceLabels {
                        r#type: process.to_string(),
                        instance: id.to_string(),
                    })
                    .set(i64::try_from(memory).unwrap_or(i64::MAX));
            }
        }
        for (name, depth) in queues {
            self.queue
                .get_or_create(&TypeLabel {
                    r#type: name.clone(),
                })
                .set(i64::try_from(*depth).unwrap_or(i64::MAX));
        }
        self.capacity
            .set(i64::try_from(ps.capacity).unwrap_or(i64::MAX));
        self.reserved
            .set(i64::try_from(ps.reserved).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
