//! One node's agent on etcd: its lease, its claims, the cluster's formation.
//!
//! Keys, under `/wasmform/APP/`:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `formation` | `{"types": {"web": {"count": 3, "memory": BYTES}}}` | none |
//! | `nodes/NODE` | the node's front door and instances (`ps --cluster`) | the node's |
//! | `claims/TYPE/INDEX` | the node that runs that slot | the node's |
//!
//! Every round (each [`ROUND`], and at once after a change this node made) the agent reads
//! the prefix, applies a newer formation, claims what [`place::share`] gives it, gives back
//! what it holds above its share, a quarter of the share per TTL (rebalancing after a node
//! joins), releases
//! the claims of slots that are no longer desired once their instance has ended, and tells
//! the supervisor which slots it holds.
//!
//! **Fencing.** The lease is renewed every TTL ÷ 3. A renewal counts from the moment its
//! request was *sent* (etcd's clock started no earlier), so the lease cannot have expired
//! before `sent + TTL`. When no renewal has been acknowledged for TTL − [`margin`], the node
//! stops its singletons by itself, before etcd can have given their claims to another node;
//! other instances keep serving (fail-static) and no new claim is made until etcd answers.
//! A leader change in etcd renews every lease to its full TTL, so it only delays a takeover.
//! Each claim's creation revision is its fencing token, given to the guest as
//! `WASMFORM_FENCE`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::ClusterOptions;
use super::place::{self, SlotId};
use crate::app::ProcessName;
use crate::events::{Events, Fields};
use crate::formation::Formation;
use crate::logs::Logs;
use crate::supervisor::{ClusterLink, Supervisor};
use crate::units::humanize;

/// How often a node reads the cluster's state when nothing wakes it.
const ROUND: Duration = Duration::from_millis(250);

/// Longest wait for one etcd request: a node that cannot reach etcd must notice in time to
/// fence its singletons.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// How long before its lease can have expired a node stops its singletons: time for them to
/// stop.
fn margin(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(500))
}

/// The lease's TTL as etcd grants it: whole seconds, at least 2.
fn lease_seconds(options: &ClusterOptions) -> i64 {
    options.lease_ttl.as_secs().max(2) as i64
}

/// The key layout of one app.
struct Keys {
    prefix: String,
}

impl Keys {
    fn formation(&self) -> String {
        format!("{}formation", self.prefix)
    }

    fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.prefix)
    }

    fn claim(&self, (process, index): &SlotId) -> String {
        format!("{}claims/{process}/{index}", self.prefix)
    }
}

/// A node's record under `nodes/NODE`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct NodeRecord {
    node: String,
    pid: u32,
    /// Its front door.
    addr: String,
    /// `--label`s, which types' `placement` selects on.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    instances: Vec<InstanceRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct InstanceRecord {
    id: String,
    state: String,
}

/// The node's lease, as the renewer keeps it.
struct Lease {
    id: i64,
    /// When the last acknowledged renewal (or the grant) was sent.
    renewed: Instant,
    /// etcd said the lease is gone: the node registers again with a new one.
    lost: bool,
}

/// What the agent holds between rounds.
#[derive(Default)]
struct Claims {
    /// Claims of this node, with their fencing tokens.
    mine: BTreeMap<SlotId, i64>,
    /// Claims being given back: their instances stop, then the claims are deleted.
    giving_back: BTreeSet<SlotId>,
    /// When the last batch was given back (one batch per TTL).
    last_give_back: Option<Instant>,
    /// The formation key's revision this node applied.
    formation_rev: i64,
    /// The record last written under `nodes/NODE`.
    published: Option<NodeRecord>,
    /// Whether etcd answered the last round (for the log line when that changes).
    reachable: bool,
    /// Whether the singletons are stopped because the lease could not be renewed in time.
    fenced: bool,
    /// Since when this node is being drained (`wasmform node drain`).
    draining: Option<Instant>,
    /// Types that no node can take, with why (`0 of 3 nodes match region=eu`).
    unplaced: BTreeMap<ProcessName, String>,
}

/// Why no node can take a type: how many match its `placement`, or that every one that
/// does is cordoned.
fn unplaced_reason(
    nodes: &BTreeSet<String>,
    cordons: &BTreeMap<String, Cordon>,
    wants: &BTreeMap<String, String>,
) -> String {
    if wants.is_empty() {
        return format!("all {} nodes are cordoned", nodes.len());
    }
    let selector = wants
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "0 of {} uncordoned nodes match {selector} (start a node with `--label {}`)",
        nodes.iter().filter(|n| !cordons.contains_key(*n)).count(),
        wants
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" --label ")
    )
}

/// A node's entry under `cordons/NODE`: it gets no new instance; `drain`: it also hands its
/// instances over.
#[derive(Serialize, Deserialize)]
struct Cordon {
    drain: bool,
}

/// How long a draining node fails its health check before it hands its instances over: a
/// load balancer checking every second with `fall 2` has moved its traffic off by then.
const DRAIN_GRACE: Duration = Duration::from_secs(3);

struct Inner {
    client: Client,
    keys: Keys,
    options: ClusterOptions,
    supervisor: Arc<Supervisor>,
    logs: Logs,
    /// `cluster.*` events (`wasmform events`).
    events: Events,
    addr: SocketAddr,
    lease: Mutex<Lease>,
    claims: Mutex<Claims>,
    /// Wakes the agent for a round at once (after this node changed the formation).
    wake: tokio::sync::Notify,
    stop: CancellationToken,
}

/// This host's membership of a cluster.
pub struct Node {
    inner: Arc<Inner>,
}

/// The error for an etcd that does not answer.
fn unreachable(options: &ClusterOptions, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "--cluster: cannot reach etcd at {} ({e}): start etcd, or fix the address",
        options.endpoints.join(", ")
    )
}

async fn timed<T>(
    what: &str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(anyhow!("{what}: {e}")),
        Err(_) => Err(anyhow!(
            "{what}: no answer within {}",
            humanize(REQUEST_TIMEOUT)
        )),
    }
}

impl Node {
    /// Joins the cluster before the formation starts: takes the node's name (refused if a
    /// live node has it), reads the cluster's formation (this node's own if it is the first)
    /// and claims this node's share, so that [`Supervisor::start`] starts exactly that.
    pub async fn join(
        options: &ClusterOptions,
        supervisor: &Arc<Supervisor>,
        (logs, events): (&Logs, &Events),
        addr: SocketAddr,
    ) -> Result<Node> {
        let connect = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
        let mut client = Client::connect(&options.endpoints, Some(connect))
            .await
            .map_err(|e| unreachable(options, e))?;
        let ttl = lease_seconds(options);
        let sent = Instant::now();
        let lease = tokio::time::timeout(Duration::from_secs(3), client.lease_grant(ttl, None))
            .await
            .map_err(|_| unreachable(options, "no answer within 3 s"))?
            .map_err(|e| unreachable(options, e))?;
        let keys = Keys {
            prefix: format!("/wasmform/{}/", options.app),
        };
        let inner = Arc::new(Inner {
            client,
            keys,
            options: options.clone(),
            supervisor: supervisor.clone(),
            logs: logs.clone(),
            events: events.clone(),
            addr,
            lease: Mutex::new(Lease {
                id: lease.id(),
                renewed: sent,
                lost: false,
            }),
            claims: Mutex::new(Claims {
                reachable: true,
                ..Claims::default()
            }),
            wake: tokio::sync::Notify::new(),
            stop: CancellationToken::new(),
        });
        inner.register(lease.id()).await?;
        // Renewed from now on: starting the formation may take longer than the TTL.
        let renewer = inner.clone();
        tokio::spawn(async move { renewer.renew().await });
        let fence = inner.clone();
        tokio::spawn(async move { fence.fence().await });
        let joined = async {
            let (formation, rev, first) = inner.formation_at_join(&supervisor.desired()).await?;
            inner.lock().formation_rev = rev;
            logs.host(format!(
                "cluster `{}`: node `{}` joined over etcd {} (lease TTL {}); formation {formation}{}",
                options.app,
                options.node,
                options.endpoints.join(", "),
                humanize(options.lease_ttl),
                if first {
                    " (this node's: the first node)"
                } else {
                    " (the cluster's)"
                }
            ));
            inner.emit(
                "cluster.joined",
                format!("cluster `{}` over etcd {}", options.app, options.endpoints.join(", ")),
            );
            supervisor.join_cluster(
                Arc::new(Link {
                    inner: inner.clone(),
                }),
                options.node.clone(),
                formation,
            );
            inner.round(false).await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = joined {
            Link {
                inner: inner.clone(),
            }
            .leave()
            .await;
            return Err(e);
        }
        Ok(Node { inner })
    }

    /// Runs the agent (the lease is renewed since [`join`](Self::join)) until the host
    /// stops.
    pub fn spawn(&self) {
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.run().await });
    }
}

/// What the supervisor calls: [`ClusterLink`].
struct Link {
    inner: Arc<Inner>,
}

impl ClusterLink for Link {
    fn propose<'a>(
        &'a self,
        next: &'a Formation,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let inner = &self.inner;
            let seen = inner.lock().formation_rev;
            let key = inner.keys.formation();
            let value = crate::state::formation_to_json(next);
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, seen)])
                .and_then([TxnOp::put(key, value, None)]);
            let response = timed("etcd", inner.client.clone().txn(txn))
                .await
                .map_err(|e| {
                    format!(
                        "the cluster's formation cannot be changed while etcd does not answer ({e})"
                    )
                })?;
            if !response.succeeded() {
                inner.wake.notify_one();
                return Err(
                    "the cluster's formation changed since this node applied it (another node's scale, or one this node has not applied yet): see `wasmform ps --cluster`, then scale again"
                        .to_string(),
                );
            }
            if let Some(header) = response.header() {
                inner.lock().formation_rev = header.revision();
            }
            inner.wake.notify_one();
            Ok(())
        })
    }

    fn ps(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<serde_json::Value, String>> + Send + '_>>
    {
        Box::pin(async move { self.inner.ps().await.map_err(|e| format!("{e:#}")) })
    }

    fn health(&self) -> Result<(), String> {
        let inner = &self.inner;
        let lease = inner.lease();
        if lease.lost {
            return Err(
                "this node lost its lease in the cluster: its slots went to other nodes"
                    .to_string(),
            );
        }
        if inner.lock().draining.is_some() {
            return Err("this node is being drained (`wasmform node drain`)".to_string());
        }
        let since = lease.renewed.elapsed();
        drop(lease);
        if inner.late() {
            return Err(format!(
                "this node has not renewed its lease for {}: etcd does not answer",
                humanize(since)
            ));
        }
        Ok(())
    }

    fn node_action<'a>(
        &'a self,
        node: &'a str,
        action: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>> {
        Box::pin(async move {
            let result = self.inner.node_action(node, action).await;
            self.inner.wake.notify_one();
            result.map_err(|e| format!("{e:#}"))
        })
    }

    fn leave(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.stop.cancel();
            let id = inner.lease.lock().unwrap_or_else(|e| e.into_inner()).id;
            match timed("etcd", inner.client.clone().lease_revoke(id)).await {
                Ok(_) => inner.logs.host(format!(
                    "cluster `{}`: node `{}` left; its slots go to the other nodes",
                    inner.options.app, inner.options.node
                )),
                Err(e) => inner.logs.host(format!(
                    "cluster `{}`: could not leave ({e:#}); the other nodes take this node's slots when its lease expires",
                    inner.options.app
                )),
            }
        })
    }
}

impl Inner {
    /// Tells `event` with this node's name and `reason`.
    fn emit(&self, event: &str, reason: String) {
        self.events.emit(
            event,
            Fields {
                node: Some(self.options.node.clone()),
                reason: Some(reason),
                ..Fields::default()
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Claims> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self) -> NodeRecord {
        let mut instances: Vec<InstanceRecord> = self
            .supervisor
            .local_slots()
            .into_iter()
            .map(|s| InstanceRecord {
                id: format!("{}.{}", s.process, s.index),
                state: s.state.to_string(),
            })
            .collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        NodeRecord {
            node: self.options.node.clone(),
            pid: std::process::id(),
            addr: self.addr.to_string(),
            labels: self.options.labels.clone(),
            instances,
        }
    }

    /// Creates the node's key under lease `id`; refused if a live node has the name.
    async fn register(&self, id: i64) -> Result<()> {
        let key = self.keys.node(&self.options.node);
        let record = serde_json::to_string(&self.record()).expect("serializes");
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                record,
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = timed("etcd", self.client.clone().txn(txn))
            .await
            .map_err(|e| unreachable(&self.options, e))?;
        if response.succeeded() {
            return Ok(());
        }
        let holder = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .and_then(|v| serde_json::from_slice::<NodeRecord>(&v).ok());
        let holder = holder.map_or(String::new(), |h| {
            format!(" (pid {}, serving {})", h.pid, h.addr)
        });
        bail!(
            "--node `{}`: a live node of cluster `{}` already has this name{holder}: give each node its own `--node NAME`; if that node was just killed, its lease expires within {}: start again then",
            self.options.node,
            self.options.app,
            humanize(self.options.lease_ttl)
        )
    }

    /// The cluster's formation over this node's types, its revision, and whether this node
    /// created it (the first node's formation becomes the cluster's).
    async fn formation_at_join(&self, local: &Formation) -> Result<(Formation, i64, bool)> {
        let key = self.keys.formation();
        let value = crate::state::formation_to_json(local);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let response = timed("etcd", self.client.clone().txn(txn))
            .await
            .map_err(|e| unreachable(&self.options, e))?;
        if response.succeeded() {
            let rev = response.header().map_or(0, |h| h.revision());
            return Ok((local.clone(), rev, true));
        }
        let kv = response
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                _ => None,
            })
            .ok_or_else(|| anyhow!("etcd: {key} vanished while joining; start again"))?;
        let text = String::from_utf8_lossy(kv.value());
        let (formation, _) = crate::state::formation_from_json(&text, local).map_err(|e| {
            anyhow!("etcd key {key} is not a wasmform formation ({e}): delete it with `etcdctl del {key}` to start from this node's")
        })?;
        Ok((formation, kv.mod_revision(), false))
    }

    /// Rounds until the host stops: each reads the cluster's state and acts on it.
    async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(ROUND);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = tick.tick() => {}
                () = self.wake.notified() => {}
            }
            let result = self.round(true).await;
            let mut claims = self.lock();
            match result {
                Ok(()) if !claims.reachable => {
                    claims.reachable = true;
                    drop(claims);
                    self.logs.host(format!(
                        "cluster `{}`: etcd answers again",
                        self.options.app
                    ));
                    self.emit("cluster.reachable", "etcd answers again".to_string());
                }
                Err(e) if claims.reachable => {
                    claims.reachable = false;
                    drop(claims);
                    let held = self.supervisor.local_slots().len();
                    self.logs.host(format!(
                        "cluster `{}`: {e:#}: keeping this node's {held} instances, claiming nothing new until etcd answers",
                        self.options.app
                    ));
                    self.emit("cluster.unreachable", format!("{e:#}"));
                }
                _ => {}
            }
        }
    }

    /// One round: read, apply the formation, claim, give back, release, hold, publish; read
    /// again once if the node had to join again.
    async fn round(&self, started: bool) -> Result<()> {
        if self.lease().lost {
            self.rejoin().await?;
        }
        if self.round_once(started).await? {
            self.round_once(started).await?;
        }
        Ok(())
    }

    /// [`round`](Self::round) once; `true` if the node found its lease gone and joined again
    /// (the state it read is stale then).
    async fn round_once(&self, started: bool) -> Result<bool> {
        let lease = self.lease().id;
        let me = self.options.node.as_str();
        let prefix = &self.keys.prefix;
        let response = timed(
            "etcd",
            self.client
                .clone()
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut nodes = BTreeSet::new();
        let mut cordons: BTreeMap<String, Cordon> = BTreeMap::new();
        let mut labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        // Slot → (holder, fencing token, the holder's lease).
        let mut claims: BTreeMap<SlotId, (String, i64, i64)> = BTreeMap::new();
        let mut formation = None;
        for kv in response.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            let Some(rest) = key.strip_prefix(prefix.as_str()) else {
                continue;
            };
            if rest == "formation" {
                formation = Some(kv.clone());
            } else if let Some(node) = rest.strip_prefix("cordons/") {
                let cordon = serde_json::from_slice(kv.value()).unwrap_or(Cordon { drain: false });
                cordons.insert(node.to_string(), cordon);
            } else if let Some(node) = rest.strip_prefix("nodes/") {
                nodes.insert(node.to_string());
                let record = serde_json::from_slice::<NodeRecord>(kv.value()).ok();
                labels.insert(
                    node.to_string(),
                    record.map(|r| r.labels).unwrap_or_default(),
                );
            } else if let Some(slot) = rest.strip_prefix("claims/") {
                let Some((process, index)) = slot.rsplit_once('/') else {
                    continue;
                };
                let (Ok(process), Ok(index)) = (ProcessName::new(process), index.parse()) else {
                    continue;
                };
                let holder = kv.value_str().unwrap_or_default().to_string();
                claims.insert((process, index), (holder, kv.create_revision(), kv.lease()));
            }
        }
        // This node's key is gone: its lease expired (etcd was away longer than the TTL), its
        // claims with it. Join again with a new lease; the next round claims again what this
        // node still runs and nobody took.
        if !nodes.contains(me) {
            self.lease().lost = true;
            self.rejoin().await?;
            return Ok(true);
        }
        if let Some(kv) = formation
            && started
            && kv.mod_revision() > self.lock().formation_rev
        {
            // Under the supervisor's formation lock, so that a scale through this node (which
            // proposes against `formation_rev` under the same lock) and this apply cannot
            // interleave; skipped while a change runs here, and tried again next round.
            let rev = kv.mod_revision();
            self.supervisor
                .adopt(|current| {
                    let mut claims = self.lock();
                    if rev <= claims.formation_rev {
                        return None;
                    }
                    claims.formation_rev = rev;
                    let text = String::from_utf8_lossy(kv.value());
                    crate::state::formation_from_json(&text, current)
                        .ok()
                        .map(|(next, _)| next)
                })
                .await;
        }
        let desired = self.supervisor.desired();
        let counts: BTreeMap<ProcessName, u32> = desired
            .iter()
            .map(|(name, s)| (name.clone(), s.count))
            .collect();
        let wanted = |(process, index): &SlotId| counts.get(process).is_some_and(|c| index <= c);
        let local: BTreeSet<SlotId> = self
            .supervisor
            .local_slots()
            .into_iter()
            .map(|s| (s.process, s.index))
            .collect();
        // This node's claims: under its lease (a claim under its name but another lease is a
        // process that took the name after this one's lease expired).
        let mut mine: BTreeMap<SlotId, i64> = claims
            .iter()
            .filter(|(_, (node, _, held))| node == me && *held == lease)
            .map(|(slot, (_, fence, _))| (slot.clone(), *fence))
            .collect();
        let draining = cordons.get(me).is_some_and(|c| c.drain);
        // Instances this node runs without a claim (its lease expired while etcd was away):
        // claim them again if no other node took them; else they stop.
        let mut attempts: Vec<SlotId> = local
            .iter()
            .filter(|slot| !draining && wanted(slot) && !claims.contains_key(*slot))
            .cloned()
            .collect();
        let holders: BTreeMap<SlotId, String> = claims
            .iter()
            .map(|(slot, (node, ..))| (slot.clone(), node.clone()))
            .collect();
        // Per type, the nodes that may get its new instances: not cordoned (they keep what
        // they hold), with the labels of its `placement`.
        let placement = self.supervisor.placement();
        let mut eligible: BTreeMap<ProcessName, BTreeSet<String>> = BTreeMap::new();
        let mut unplaced = BTreeMap::new();
        let mut share = place::Share::default();
        for (process, &count) in &counts {
            let wants = placement.get(process).cloned().unwrap_or_default();
            let fits: BTreeSet<String> = nodes
                .iter()
                .filter(|n| !cordons.contains_key(*n))
                .filter(|n| {
                    let has = labels.get(*n);
                    wants
                        .iter()
                        .all(|(k, v)| has.and_then(|h| h.get(k)) == Some(v))
                })
                .cloned()
                .collect();
            if count > 0 && fits.is_empty() {
                unplaced.insert(process.clone(), unplaced_reason(&nodes, &cordons, &wants));
            }
            let one = BTreeMap::from([(process.clone(), count)]);
            let part = place::share(&one, &fits, &holders, me);
            share.claim.extend(part.claim);
            share.surplus.extend(part.surplus);
            eligible.insert(process.clone(), fits);
        }
        self.report_unplaced(unplaced);
        for slot in share.claim {
            if !attempts.contains(&slot) {
                attempts.push(slot);
            }
        }
        let fenced = self.lock().fenced;
        let singletons = self.supervisor.singletons();
        for slot in attempts {
            if fenced && singletons.contains(&slot.0) {
                continue;
            }
            if let Some(fence) = self.claim(&slot, lease).await? {
                mine.insert(slot, fence);
            }
        }
        // Give back what this node holds above its share, once the last batch has gone: per
        // type at most a quarter of the share (at least one) per TTL, never a singleton (its
        // share is its one instance).
        let release: Vec<SlotId> = {
            let mut claims_state = self.lock();
            let due = claims_state
                .last_give_back
                .is_none_or(|t| t.elapsed() >= self.options.lease_ttl);
            // Draining: the health check fails at once; once a load balancer had the time to
            // notice, every instance is handed over.
            if draining {
                let since = *claims_state.draining.get_or_insert_with(Instant::now);
                if since.elapsed() >= DRAIN_GRACE {
                    let all: Vec<SlotId> = mine.keys().cloned().collect();
                    claims_state.giving_back.extend(all);
                }
            } else if claims_state.draining.take().is_some() {
                // A drain that ended (uncordon) gives nothing more back.
                claims_state.giving_back.clear();
            }
            if due && !draining && claims_state.giving_back.is_empty() {
                let mut batch: BTreeMap<&ProcessName, u32> = BTreeMap::new();
                for slot in share.surplus.iter().filter(|s| !singletons.contains(&s.0)) {
                    let fits = eligible[&slot.0].len().max(1) as u32;
                    let share_of_type = counts[&slot.0].div_ceil(fits);
                    let given = batch.entry(&slot.0).or_default();
                    if *given < share_of_type.div_ceil(4).max(1) {
                        *given += 1;
                        claims_state.giving_back.insert(slot.clone());
                        claims_state.last_give_back = Some(Instant::now());
                    }
                }
            }
            claims_state
                .giving_back
                .retain(|slot| mine.contains_key(slot));
            mine.keys()
                .filter(|slot| !wanted(slot) || claims_state.giving_back.contains(*slot))
                .filter(|slot| !local.contains(*slot))
                .cloned()
                .collect()
        };
        // Out of the supervisor's hands first, so no reconcile can start a slot whose claim
        // is going; then the claims go.
        for slot in &release {
            mine.remove(slot);
        }
        {
            let mut claims = self.lock();
            claims.mine = mine;
            // Only a round lifts the fence: it has just claimed again what this node runs.
            if claims.fenced && !self.late() {
                claims.fenced = false;
            }
        }
        self.hold(started);
        for slot in &release {
            self.release(slot, lease).await?;
        }
        self.publish(lease).await?;
        Ok(false)
    }

    /// Whether the lease has not been renewed for TTL − [`margin`]: etcd may give this
    /// node's claims away soon.
    fn late(&self) -> bool {
        let ttl = self.options.lease_ttl;
        self.lease().renewed.elapsed() >= ttl.saturating_sub(margin(ttl))
    }

    /// Logs each type that no node can take, once per reason, and keeps them for `ps`.
    fn report_unplaced(&self, unplaced: BTreeMap<ProcessName, String>) {
        let mut claims = self.lock();
        for (process, why) in &unplaced {
            if claims.unplaced.get(process) != Some(why) {
                self.logs.host(format!(
                    "cluster `{}`: `{process}` cannot be placed: {why}",
                    self.options.app
                ));
                self.events.emit(
                    "cluster.unplaced",
                    Fields {
                        node: Some(self.options.node.clone()),
                        process: Some(process.to_string()),
                        reason: Some(why.clone()),
                        ..Fields::default()
                    },
                );
            }
        }
        claims.unplaced = unplaced;
    }

    /// Tells the supervisor the slots it runs: the claimed ones, but those being given back,
    /// and no singleton while the lease is not renewed in time.
    fn hold(&self, started: bool) {
        let claims = self.lock();
        let singletons = if claims.fenced {
            self.supervisor.singletons()
        } else {
            BTreeSet::new()
        };
        let mut here: BTreeMap<ProcessName, BTreeMap<u32, i64>> = BTreeMap::new();
        for ((process, index), fence) in &claims.mine {
            if claims.giving_back.contains(&(process.clone(), *index))
                || singletons.contains(process)
            {
                continue;
            }
            here.entry(process.clone())
                .or_default()
                .insert(*index, *fence);
        }
        drop(claims);
        self.supervisor.hold(here, started);
    }

    /// Creates the claim of `slot` under `lease` if no node holds it; its fencing token.
    async fn claim(&self, slot: &SlotId, lease: i64) -> Result<Option<i64>> {
        let key = self.keys.claim(slot);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.options.node.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let response = timed("etcd", self.client.clone().txn(txn)).await?;
        Ok(response
            .succeeded()
            .then(|| response.header().map_or(0, |h| h.revision())))
    }

    /// Deletes this node's claim of `slot` (only if it is still this node's).
    async fn release(&self, slot: &SlotId, lease: i64) -> Result<()> {
        let key = self.keys.claim(slot);
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        timed("etcd", self.client.clone().txn(txn)).await?;
        Ok(())
    }

    /// Writes the node's record when its instances changed.
    async fn publish(&self, lease: i64) -> Result<()> {
        let record = self.record();
        if self.lock().published.as_ref() == Some(&record) {
            return Ok(());
        }
        let key = self.keys.node(&self.options.node);
        let value = serde_json::to_string(&record).expect("serializes");
        // Only under this node's lease: a put must never revive a lost node's key.
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        if timed("etcd", self.client.clone().txn(txn))
            .await?
            .succeeded()
        {
            self.lock().published = Some(record);
        }
        Ok(())
    }

    /// The lease expired (etcd was away longer than its TTL): a new lease, the node's key
    /// again. The old claims are gone; the next round claims again what it still runs.
    async fn rejoin(&self) -> Result<()> {
        let ttl = lease_seconds(&self.options);
        let sent = Instant::now();
        let lease = timed("etcd", self.client.clone().lease_grant(ttl, None)).await?;
        self.register(lease.id()).await?;
        // The old claims are gone: nothing is held until a round has claimed again, and the
        // singletons stay stopped until then.
        {
            let mut claims = self.lock();
            claims.mine.clear();
            claims.published = None;
            claims.fenced = true;
        }
        let mut l = self.lease();
        l.id = lease.id();
        l.renewed = sent;
        l.lost = false;
        drop(l);
        self.logs.host(format!(
            "cluster `{}`: node `{}` joined again with a new lease (the old one expired while etcd was away)",
            self.options.app, self.options.node
        ));
        self.emit(
            "cluster.rejoined",
            "the lease expired while etcd was away".to_string(),
        );
        Ok(())
    }

    /// Renews the lease every TTL ÷ 3 until the host stops.
    async fn renew(self: Arc<Self>) {
        let every = self.options.lease_ttl / 3;
        loop {
            let id = self.lease().id;
            let stream = timed("etcd", self.client.clone().lease_keep_alive(id)).await;
            let Ok((mut keeper, mut responses)) = stream else {
                if self.sleep(every / 2).await {
                    return;
                }
                continue;
            };
            loop {
                let sent = Instant::now();
                // Bounded too: the request channel of a dead stream may never take it.
                let request = tokio::time::timeout(REQUEST_TIMEOUT, keeper.keep_alive()).await;
                if !matches!(request, Ok(Ok(()))) {
                    break;
                }
                match tokio::time::timeout(REQUEST_TIMEOUT, responses.message()).await {
                    Ok(Ok(Some(response))) if response.ttl() > 0 => {
                        let mut lease = self.lease();
                        if lease.id == id {
                            lease.renewed = sent;
                        }
                    }
                    Ok(Ok(Some(_))) => {
                        let mut lease = self.lease();
                        if lease.id == id {
                            lease.lost = true;
                        }
                        drop(lease);
                        self.wake.notify_one();
                        break;
                    }
                    _ => break,
                }
                if self.sleep(every.saturating_sub(sent.elapsed())).await {
                    return;
                }
            }
            // A new stream (not at once: etcd may be away), and for a new lease once the
            // agent registered again.
            if self.sleep(every / 2).await {
                return;
            }
            while self.lease().lost {
                if self.sleep(Duration::from_millis(100)).await {
                    return;
                }
            }
        }
    }

    /// Stops the singletons as soon as the lease has not been renewed in time. Only a round
    /// starts them again (it claims first what this node still runs).
    async fn fence(self: Arc<Self>) {
        let ttl = self.options.lease_ttl;
        loop {
            if self.sleep(Duration::from_millis(100)).await {
                return;
            }
            if !self.late() {
                continue;
            }
            let mut claims = self.lock();
            if claims.fenced {
                continue;
            }
            claims.fenced = true;
            drop(claims);
            let why = format!(
                "the lease was not renewed for {}",
                humanize(ttl.saturating_sub(margin(ttl)))
            );
            self.logs.host(format!(
                "cluster `{}`: {why}: stopping this node's singletons before etcd can give them to another node",
                self.options.app
            ));
            self.emit("cluster.fenced", why);
            self.hold(true);
        }
    }

    /// Sleeps; whether the host is stopping.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            () = self.stop.cancelled() => true,
            () = tokio::time::sleep(d) => false,
        }
    }

    /// `wasmform node cordon|uncordon|drain NODE`.
    async fn node_action(&self, node: &str, action: &str) -> Result<String> {
        let app = &self.options.app;
        let cordon = format!("{}cordons/{node}", self.keys.prefix);
        let known = timed(
            "etcd",
            self.client.clone().get(
                format!("{}nodes/", self.keys.prefix),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        )
        .await?;
        let names: Vec<String> = known
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.rsplit('/').next().map(String::from))
            .collect();
        let cordoned = timed("etcd", self.client.clone().get(cordon.as_str(), None))
            .await?
            .count()
            > 0;
        let live = names.iter().any(|n| n == node);
        // A cordoned node that is gone can still be uncordoned.
        if !(live || action == "uncordon" && cordoned) {
            bail!(
                "no node `{node}` in cluster `{app}`: its nodes are {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            );
        }
        let mut kv = self.client.clone();
        let value = |drain| serde_json::to_string(&Cordon { drain }).expect("serializes");
        Ok(match action {
            "cordon" => {
                timed("etcd", kv.put(cordon, value(false), None)).await?;
                format!("node `{node}` cordoned: it gets no new instance and keeps those it runs")
            }
            "drain" => {
                timed("etcd", kv.put(cordon, value(true), None)).await?;
                format!(
                    "node `{node}` draining: its health check fails now, and in {} its instances move to the other nodes",
                    humanize(DRAIN_GRACE)
                )
            }
            "uncordon" => {
                timed("etcd", kv.delete(cordon, None)).await?;
                format!("node `{node}` uncordoned: it gets its share of the instances again")
            }
            other => bail!("unknown node action `{other}`: give cordon, uncordon or drain"),
        })
    }

    /// Every node and its instances, for `ps --cluster --json`.
    async fn ps(&self) -> Result<serde_json::Value> {
        let prefix = format!("{}nodes/", self.keys.prefix);
        let response = timed(
            "etcd",
            self.client
                .clone()
                .get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut nodes = Vec::new();
        let mut instances = Vec::new();
        for kv in response.kvs() {
            let Ok(record) = serde_json::from_slice::<NodeRecord>(kv.value()) else {
                continue;
            };
            for i in &record.instances {
                instances.push(serde_json::json!({
                    "id": i.id, "node": record.node, "state": i.state,
                }));
            }
            nodes.push(serde_json::json!({
                "node": record.node, "addr": record.addr, "pid": record.pid,
                "labels": record.labels, "instances": record.instances.len(),
            }));
        }
        Ok(serde_json::json!({
            "app": self.options.app,
            "formation": self.supervisor.desired().to_json(),
            "nodes": nodes,
            "instances": instances,
            "unplaced": self.lock().unplaced.iter()
                .map(|(process, why)| (process.to_string(), why.clone()))
                .collect::<BTreeMap<_, _>>(),
        }))
    }
}
