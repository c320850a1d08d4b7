//! The Redis backend (`[state] url = "redis://…"`), for hosts that share state. Same
//! semantics as the embedded store; every operation that reads and writes is one Lua script,
//! so it is atomic on the server. Time comes from the server (`TIME`), so hosts with skewed
//! clocks agree on leases.
//!
//! Every app has its own namespace, named in the URL (`redis://host:6379/?namespace=shop`) and
//! required, so that two apps on one server never see each other's buckets and queues, while
//! hosts of one app (same namespace) share them.
//!
//! Layout, under `wasmform:{namespace}:`: a bucket is the hash `kv:{bucket}`; a queue `q` is the sorted
//! set `q:{q}:due` (message ids by due time in ms: waiting ones are due now or later, leased
//! ones at the lease's end), the hashes `q:{q}:body`, `q:{q}:attempts` and `q:{q}:lease` (id →
//! the token of its current lease), the counters `q:{q}:next` (ids) and `q:{q}:leases`
//! (tokens), and the dead letters `q:{q}:dead` (id → body) and `q:{q}:why` (id → reason).

use anyhow::{Context as _, Result};
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;

use super::{Job, Nacked, PAGE, QueueStats, StoreResult};

/// A connection to the server (reconnects by itself).
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    /// Since when and why calls fail (the server went away), until a check finds it back.
    down: std::sync::Arc<std::sync::Mutex<Option<(std::time::SystemTime, String)>>>,
    url: String,
    /// `wasmform:{namespace}:`, before every key: the app's own part of the server.
    prefix: String,
}

fn err(e: redis::RedisError) -> String {
    format!("redis: {e}")
}

/// The app's namespace from `url`'s `namespace=` query parameter: required, 1-128 of
/// `[A-Za-z0-9_.-]` (as bucket names, so no `:` can make two keys collide).
pub fn namespace(url: &str) -> Result<String> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    let Some(name) = query.split('&').find_map(|p| p.strip_prefix("namespace=")) else {
        anyhow::bail!(
            "state.url `{url}` names no namespace: add `?namespace=NAME` (the app's own keys on the server, the same on every host that shares its state), e.g. `redis://127.0.0.1:6379/?namespace=myapp`"
        );
    };
    let valid = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !valid {
        anyhow::bail!("state.url `{url}`: namespace `{name}` must be 1-128 of A-Z a-z 0-9 _ . -");
    }
    Ok(name.to_string())
}

impl RedisStore {
    fn kv(&self, bucket: &str) -> String {
        format!("{}kv:{bucket}", self.prefix)
    }

    fn q(&self, queue: &str, part: &str) -> String {
        format!("{}q:{queue}:{part}", self.prefix)
    }
}

/// `now` in ms from the server's clock.
const NOW: &str =
    "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000);";

impl RedisStore {
    /// Connects to `url` (fails at once if nothing answers).
    pub async fn open(url: &str) -> Result<Self> {
        let prefix = format!("wasmform:{}:", namespace(url)?);
        let client = redis::Client::open(url)
            .with_context(|| format!("state.url `{url}` is not a valid Redis URL"))?;
        // No response timeout: a script that ran must not be reported as failed because the
        // answer was slow (the caller would retry it and, say, enqueue twice).
        // A server that went away fails calls fast: one reconnection attempt per failure
        // (a refused connection answers at once), not the six with growing delays (~9 s) of
        // redis-rs's defaults, which held a guest's call and its instance that long. The next
        // call tries again, so the store comes back by itself with the server.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_min_delay(std::time::Duration::from_millis(50))
            .set_max_delay(std::time::Duration::from_millis(500));
        let conn = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer from Redis at `{url}` within 5 s"))?
        .with_context(|| format!("cannot connect to Redis at `{url}`: is it running?"))?;
        Ok(Self {
            conn,
            down: Default::default(),
            url: url.to_string(),
            prefix,
        })
    }

    /// A failed call: noted as the server being unreachable (the first failure's time is
    /// kept) until [`RedisStore::unreachable`] finds it back; the text for the caller.
    fn failed(&self, e: redis::RedisError) -> String {
        let text = err(e);
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if down.is_none() {
            *down = Some((std::time::SystemTime::now(), text.clone()));
        }
        text
    }

    /// Since when and why the server is unreachable, or `None`: after a failure, a `PING`
    /// (at most 1 s) tells whether it is back.
    pub async fn unreachable(&self) -> Option<(std::time::SystemTime, String)> {
        let down = self
            .down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let mut conn = self.conn.clone();
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<String>(&mut conn);
        match tokio::time::timeout(std::time::Duration::from_secs(1), ping).await {
            Ok(Ok(_)) => {
                *self.down.lock().unwrap_or_else(|e| e.into_inner()) = None;
                None
            }
            _ => Some(down),
        }
    }

    /// `redis (url)`.
    pub fn describe(&self) -> String {
        format!("redis ({})", self.url)
    }

    pub(crate) async fn get(&self, bucket: &str, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.conn
            .clone()
            .hget(self.kv(bucket), key)
            .await
            .map_err(|e| self.failed(e))
    }

    pub(crate) async fn list_keys(
        &self,
        bucket: &str,
        cursor: Option<u64>,
    ) -> StoreResult<(Vec<String>, Option<u64>)> {
        let mut keys: Vec<String> = self
            .conn
            .clone()
            .hkeys(self.kv(bucket))
            .await
            .map_err(|e| self.failed(e))?;
        keys.sort();
        let offset = cursor.unwrap_or(0);
        let rest: Vec<String> = keys
            .into_iter()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .take(PAGE + 1)
            .collect();
        Ok(super::embedded::page(rest, offset))
    }

    pub(crate) async fn increment(&self, bucket: &str, key: &str, delta: u64) -> StoreResult<u64> {
        // Like the embedded store: absent = 0, the value is decimal text, no wrap-around.
        // Same rules as `parse_counter`: ASCII digits with optional ASCII whitespace, at most
        // 2^53-1 (Lua numbers are doubles). Leading zeros do not count: at most 16 significant
        // digits are left to compare exactly as a double.
        // Built (and hashed) once, not per call.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "local v = redis.call('HGET', KEYS[1], ARGV[1])
                 local n = 0
                 if v then
                   local digits = string.match(v, '^[ \\t\\n\\r\\f]*(%d+)[ \\t\\n\\r\\f]*$')
                   if digits then digits = (string.gsub(digits, '^0+(%d)', '%1')) end
                   if (not digits) or #digits > 16 or tonumber(digits) > 9007199254740991 then
                     return redis.error_reply('NOTNUM value is not a decimal number')
                   end
                   n = tonumber(digits)
                 end
                 local next = n + tonumber(ARGV[2])
                 if next > 9007199254740991 then
                   return redis.error_reply('OVERFLOW value would pass 2^53-1')
                 end
                 redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', next))
                 return next",
            )
        });
        let script = &*SCRIPT;
        if delta > super::MAX_COUNTER {
            return Err(format!(
                "cannot increment `{key}`: the value would pass 2^53-1"
            ));
        }
        let result: Result<u64, _> = script
            .key(self.kv(bucket))
            .arg(key)
            .arg(delta)
            .invoke_async(&mut self.conn.clone())
            .await;
        result.map_err(|e| match e.code() {
            Some("NOTNUM") => {
                format!("cannot increment `{key}`: its value is not a decimal number up to 2^53-1")
            }
            Some("OVERFLOW") => format!("cannot increment `{key}`: the value would pass 2^53-1"),
            _ => self.failed(e),
        })
    }

    pub(crate) async fn compare_and_swap(
        &self,
        bucket: &str,
        key: &str,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> StoreResult<bool> {
        // Built (and hashed) once, not per call.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "local v = redis.call('HGET', KEYS[1], ARGV[1])
                 if ARGV[2] == '0' then
                   if v then return 0 end
                 elseif (not v) or v ~= ARGV[3] then
                   return 0
                 end
                 redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
                 return 1",
            )
        });
        let script = &*SCRIPT;
        let swapped: i64 = script
            .key(self.kv(bucket))
            .arg(key)
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or_default())
            .arg(new)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.failed(e))?;
        Ok(swapped == 1)
    }

    pub(crate) async fn set_many(
        &self,
        bucket: &str,
        pairs: Vec<(String, Vec<u8>)>,
    ) -> StoreResult<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        self.conn
            .clone()
            .hset_multiple::<_, _, _, ()>(self.kv(bucket), &pairs)
            .await
            .map_err(|e| self.failed(e))
    }

    pub(crate) async fn delete_many(&self, bucket: &str, keys: Vec<String>) -> StoreResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.conn
            .clone()
            .hdel::<_, _, ()>(self.kv(bucket), keys)
            .await
            .map_err(|e| self.failed(e))
    }

    pub(crate) async fn enqueue(&self, queue: &str, bodies: Vec<Vec<u8>>) -> StoreResult<()> {
        if bodies.is_empty() {
            return Ok(());
        }
        // One script for every body, so `enqueue-many` is one transaction as documented: all
        // of the messages or none. (20 000 short bodies take the server some milliseconds,
        // during which it serves nothing else: the price of atomicity.)
        // Built (and hashed) once, not per call.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(&format!(
                "{NOW}
                 local last = redis.call('INCRBY', KEYS[1], #ARGV)
                 for i = 1, #ARGV do
                   local id = string.format('%020d', last - #ARGV + i)
                   redis.call('HSET', KEYS[2], id, ARGV[i])
                   redis.call('ZADD', KEYS[3], now, id)
                 end
                 return #ARGV"
            ))
        });
        let script = &*SCRIPT;
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.q(queue, "next"))
            .key(self.q(queue, "body"))
            .key(self.q(queue, "due"));
        for body in &bodies {
            invocation.arg(body.as_slice());
        }
        let _: i64 = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    pub(crate) async fn reserve(
        &self,
        queue: &str,
        lease: std::time::Duration,
        max_attempts: u32,
    ) -> StoreResult<Option<Job>> {
        // A message delivered `max_attempts` times without an answer (its handler crashed or
        // hung a host) is dead-lettered here instead of looping forever.
        // Built (and hashed) once, not per call.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(&format!(
                "{NOW}
                 while true do
                   local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
                   if #ids == 0 then return false end
                   local id = ids[1]
                   local attempts = redis.call('HINCRBY', KEYS[3], id, 1)
                   if attempts > tonumber(ARGV[2]) then
                     redis.call('HSET', KEYS[4], id, redis.call('HGET', KEYS[2], id))
                     redis.call('HSET', KEYS[5], id, ARGV[3])
                     redis.call('ZREM', KEYS[1], id)
                     redis.call('HDEL', KEYS[2], id)
                     redis.call('HDEL', KEYS[3], id)
                     redis.call('HDEL', KEYS[6], id)
                   else
                     local token = redis.call('INCR', KEYS[7])
                     redis.call('HSET', KEYS[6], id, token)
                     redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), id)
                     return {{id, redis.call('HGET', KEYS[2], id), attempts, token}}
                   end
                 end"
            ))
        });
        let script = &*SCRIPT;
        let found: Option<(String, Vec<u8>, u32, u64)> = script
            .key(self.q(queue, "due"))
            .key(self.q(queue, "body"))
            .key(self.q(queue, "attempts"))
            .key(self.q(queue, "dead"))
            .key(self.q(queue, "why"))
            .key(self.q(queue, "lease"))
            .key(self.q(queue, "leases"))
            .arg(lease.as_millis() as u64)
            .arg(max_attempts)
            .arg(super::embedded::POISON)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.failed(e))?;
        Ok(found.map(|(id, body, attempts, lease)| Job {
            id: id.parse().unwrap_or_default(),
            queue: queue.to_string(),
            body,
            attempts,
            lease,
        }))
    }

    fn id(job: &Job) -> String {
        format!("{:020}", job.id)
    }

    /// The start of every answer's script: it applies only while the message is leased under
    /// the job's token (`KEYS[1]` the lease hash, `ARGV[1]` the id, `ARGV[2]` the token).
    const HOLDS: &str = "if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end";

    pub(crate) async fn ack(&self, job: &Job) -> StoreResult<bool> {
        // Built (and hashed) once, not per call.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(&format!(
                "{}
                 redis.call('ZREM', KEYS[2], ARGV[1])
                 redis.call('HDEL', KEYS[3], ARGV[1])
                 redis.call('HDEL', KEYS[4], ARGV[1])
                 redis.call('HDEL', KEYS[1], ARGV[1])
                 return 1",
                RedisStore::HOLDS
            ))
        });
        let script = &*SCRIPT;
        let acked: i64 = script
            .key(self.q(&job.queue, "lease"))
            .key(self.q(&job.queue, "due"))
            .key(self.q(&job.queue, "body"))
            .key(self.q(&job.queue, "attempts"))
            .arg(Self::id(job))
            .arg(job.lease)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.failed(e))?;
        Ok(acked == 1)
    }

    pub(crate) async fn nack(
        &self,
        job: &Job,
        reason: &str,
        max_attempts: u32,
    ) -> StoreResult<Nacked> {
        // A late answer for a message whose lease lapsed and that another consumer got
        // meanwhile changes nothing.
        let dead = job.attempts >= max_attempts;
        // Built (and hashed) once, not per call.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(&format!(
                "{NOW}
                 {}
                 if ARGV[3] == '1' then
                   redis.call('HSET', KEYS[5], ARGV[1], redis.call('HGET', KEYS[3], ARGV[1]))
                   redis.call('HSET', KEYS[6], ARGV[1], ARGV[4])
                   redis.call('ZREM', KEYS[2], ARGV[1])
                   redis.call('HDEL', KEYS[3], ARGV[1])
                   redis.call('HDEL', KEYS[4], ARGV[1])
                 else
                   redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
                 end
                 redis.call('HDEL', KEYS[1], ARGV[1])
                 return 1",
                RedisStore::HOLDS
            ))
        });
        let script = &*SCRIPT;
        let applied: i64 = script
            .key(self.q(&job.queue, "lease"))
            .key(self.q(&job.queue, "due"))
            .key(self.q(&job.queue, "body"))
            .key(self.q(&job.queue, "attempts"))
            .key(self.q(&job.queue, "dead"))
            .key(self.q(&job.queue, "why"))
            .arg(Self::id(job))
            .arg(job.lease)
            .arg(if dead { "1" } else { "0" })
            .arg(reason)
            .arg(super::retry_delay(job.attempts).as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.failed(e))?;
        Ok(match (applied == 1, dead) {
            (false, _) => Nacked::Lapsed,
            (true, true) => Nacked::DeadLettered,
            (true, false) => Nacked::Retry,
        })
    }

    pub(crate) async fn release(&self, job: &Job) -> StoreResult<bool> {
        // Built (and hashed) once, not per call.
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(&format!(
                "{}
                 redis.call('ZADD', KEYS[2], 0, ARGV[1])
                 redis.call('HINCRBY', KEYS[3], ARGV[1], -1)
                 redis.call('HDEL', KEYS[1], ARGV[1])
                 return 1",
                RedisStore::HOLDS
            ))
        });
        let script = &*SCRIPT;
        let released: i64 = script
            .key(self.q(&job.queue, "lease"))
            .key(self.q(&job.queue, "due"))
            .key(self.q(&job.queue, "attempts"))
            .arg(Self::id(job))
            .arg(job.lease)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.failed(e))?;
        Ok(released == 1)
    }

    pub(crate) async fn stats(&self, queue: &str) -> StoreResult<QueueStats> {
        let (pending, dead): (u64, u64) = redis::pipe()
            .zcard(self.q(queue, "due"))
            .hlen(self.q(queue, "dead"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.failed(e))?;
        Ok(QueueStats {
            queue: queue.to_string(),
            pending,
            dead,
        })
    }
}
