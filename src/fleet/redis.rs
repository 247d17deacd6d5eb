//! [`RedisStore`]: the fleet's state on Redis (or Valkey), one script per operation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::store::{
    Acquired, BreakerEvent, BreakerState, BucketsSync, BucketsView, SharedStore, StoreError,
    StoreFuture,
};

/// The server's clock in milliseconds, inside a script: every worker's
/// leases expire by the same clock, whatever the workers' clocks say.
const NOW_MS: &str = "local t = redis.call('TIME') \
     local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
     local function expect(key, kind) \
       local found = redis.call('TYPE', key).ok \
       if found ~= 'none' and found ~= kind then redis.call('DEL', key) end \
     end ";

/// KEYS[1]: the semaphore (a sorted set: holder -> lease expiry in ms).
/// ARGV: cap, lease ms, holder. Drops expired leases, then takes a slot, or
/// answers how long until the earliest lease expires.
const ACQUIRE: &str = "
local cap = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
expect(KEYS[1], 'zset')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < cap then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.max(0, tonumber(first[2]) - now)}
";

/// KEYS[1]: the semaphore. ARGV: lease ms, holders... Extends the leases
/// of calls still alive, bringing back any the store lost (a restart, an
/// outage longer than a lease): they are still in flight and must count.
/// Answers how many had to be brought back.
const RENEW: &str = "
local lease = tonumber(ARGV[1])
expect(KEYS[1], 'zset')
local back = 0
for i = 2, #ARGV do
  back = back + redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return back
";

/// KEYS[1]: a token counter. ARGV: capacity, delta. Starts full; clamped
/// to 0..=capacity.
const ADD_TOKENS: &str = "
local cap = tonumber(ARGV[1])
local found = redis.call('TYPE', KEYS[1]).ok
if found ~= 'none' and found ~= 'string' then redis.call('DEL', KEYS[1]) end
local held = tonumber(redis.call('GET', KEYS[1])) or cap
local after = math.max(0, math.min(cap, held + tonumber(ARGV[2])))
redis.call('SET', KEYS[1], after)
return after
";

/// KEYS[1]: a model's breaker (a hash: until, rest in ms), KEYS[2]: its
/// probe (the holder's name). ARGV: event ('', 'open', 'close'), rest ms,
/// holder, probe ttl ms. Answers {state, remaining or mine, rest}: 0 closed,
/// 1 open, 2 half-open (mine 1 when the holder may probe).
const SYNC_BREAKER: &str = "
expect(KEYS[1], 'hash')
expect(KEYS[2], 'string')
if ARGV[1] == 'open' then
  local rest = tonumber(ARGV[2])
  local untl = now + rest
  local cur = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
  if untl > cur then redis.call('HSET', KEYS[1], 'until', untl, 'rest', rest) end
  redis.call('PEXPIRE', KEYS[1], rest + 600000)
  if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
elseif ARGV[1] == 'close' then
  redis.call('DEL', KEYS[1], KEYS[2])
end
local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '-1')
if untl < 0 then return {0, 0, 0} end
local rest = tonumber(redis.call('HGET', KEYS[1], 'rest') or '0')
if now < untl then return {1, untl - now, rest} end
local owner = redis.call('GET', KEYS[2])
if not owner and ARGV[5] == '1' then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', tonumber(ARGV[4]))
  owner = ARGV[3]
end
if owner == ARGV[3] then return {2, 1, rest} end
return {2, 0, rest}
";

/// KEYS[1]: a pacing key's buckets (a hash: level<i>, updated<i>, paused),
/// KEYS[2]: the needs of the workers' queues (worker ->
/// "since:updated:n1:n2:n3"). ARGV: worker, pause ms, since ms, share, then
/// per bucket: capacity (0: none), period ms, returned, remaining (-1:
/// none), need. Answers the tokens lent, in thousandths, and the pause left.
const SYNC_BUCKETS: &str = "
expect(KEYS[1], 'hash')
expect(KEYS[2], 'hash')
local worker = ARGV[1]
local pause = tonumber(ARGV[2])
local since = tonumber(ARGV[3])
local share = tonumber(ARGV[4])
local paused = tonumber(redis.call('HGET', KEYS[1], 'paused') or '0')
if pause > 0 and now + pause > paused then
  paused = now + pause
  redis.call('HSET', KEYS[1], 'paused', paused)
end
local others = {}
local raw = redis.call('HGETALL', KEYS[2])
for j = 1, #raw, 2 do
  if raw[j] ~= worker then
    local s, u, a, b, c = string.match(raw[j + 1], '^(%d+):(%d+):(%d+):(%d+):(%d+)$')
    if s and tonumber(u) >= now - 2000 then
      others[#others + 1] = {tonumber(s), {tonumber(a), tonumber(b), tonumber(c)}}
    else
      redis.call('HDEL', KEYS[2], raw[j])
    end
  end
end
local views = {0, 0, 0}
local mine = {0, 0, 0}
local needy = false
for i = 1, 3 do
  local base = 4 + (i - 1) * 5
  local cap = tonumber(ARGV[base + 1])
  mine[i] = tonumber(ARGV[base + 5])
  if mine[i] > 0 then needy = true end
  if cap > 0 then
    local period = tonumber(ARGV[base + 2])
    local lk, uk = 'level' .. i, 'updated' .. i
    local level = tonumber(redis.call('HGET', KEYS[1], lk) or cap)
    local upd = tonumber(redis.call('HGET', KEYS[1], uk) or now)
    local start = math.max(upd, math.min(paused, now))
    if now > start then level = level + (now - start) * cap / period end
    level = math.min(cap, level) + tonumber(ARGV[base + 3])
    local remaining = tonumber(ARGV[base + 4])
    if remaining >= 0 then level = math.min(level, remaining) end
    if paused > now then level = math.min(level, 0) end
    level = math.max(-cap, math.min(cap, level))
    redis.call('HSET', KEYS[1], lk, tostring(level), uk, now)
    views[i] = level
  end
end
for i = 1, 3 do
  local older, all = 0, 0
  for _, other in ipairs(others) do
    all = all + other[2][i]
    if other[1] <= since then older = older + other[2][i] end
  end
  local lent
  if needy then
    lent = math.min(views[i] - older, mine[i])
  else
    lent = (views[i] - all) * share
  end
  lent = math.floor(math.max(0, lent) * 1000) / 1000
  if tonumber(ARGV[4 + (i - 1) * 5 + 1]) > 0 and lent > 0 then
    redis.call('HSET', KEYS[1], 'level' .. i, tostring(views[i] - lent))
  end
  views[i] = math.floor(lent * 1000)
end
if needy then
  redis.call('HSET', KEYS[2], worker, since .. ':' .. now .. ':' .. mine[1] .. ':' .. mine[2] .. ':' .. mine[3])
else
  redis.call('HDEL', KEYS[2], worker)
end
redis.call('PEXPIRE', KEYS[1], 600000)
redis.call('PEXPIRE', KEYS[2], 600000)
return {views[1], views[2], views[3], math.max(0, paused - now)}
";

/// The fleet's state on a Redis or Valkey server.
///
/// One multiplexed connection that reconnects by itself (redis-rs's
/// `ConnectionManager`), opened lazily: a store made while the server is
/// down works once it is up. Every operation is one script call, atomic on
/// the server, and bounded by the response timeout (the fleet's
/// `op_timeout` bounds it again).
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tower_overload::fleet::RedisStore;
/// let store = RedisStore::open("redis://127.0.0.1:6379/").unwrap();
/// # let _ = store;
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    scripts: Arc<Scripts>,
}

struct Scripts {
    acquire: Script,
    renew: Script,
    add_tokens: Script,
    sync_breaker: Script,
    sync_buckets: Script,
}

impl RedisStore {
    /// A store on the server at `url` (`redis://host:port/db`, or
    /// `rediss://` with redis-rs's TLS features), with a 100 ms response
    /// timeout. Must be called inside a Tokio runtime. Fails only on a URL
    /// that does not parse: the server may be down.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let store = tower_overload::fleet::RedisStore::open("redis://127.0.0.1/").unwrap();
    /// # let _ = store;
    /// # }
    /// ```
    pub fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with_timeout(url, Duration::from_millis(100))
    }

    /// [`open`](Self::open) with another response (and connect) timeout.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use std::time::Duration;
    /// let store = tower_overload::fleet::RedisStore::open_with_timeout("redis://127.0.0.1/", Duration::from_millis(50)).unwrap();
    /// # let _ = store;
    /// # }
    /// ```
    pub fn open_with_timeout(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(|error| StoreError::new(error.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            // Reconnects are the fleet's job (it rechecks while degraded):
            // a call never waits on a reconnect loop.
            .set_number_of_retries(1)
            .set_max_delay(timeout);
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|error| StoreError::new(error.to_string()))?;
        let script = |body: &str| Script::new(&format!("{NOW_MS}{body}"));
        Ok(Self {
            connection,
            scripts: Arc::new(Scripts {
                acquire: script(ACQUIRE),
                renew: script(RENEW),
                add_tokens: Script::new(ADD_TOKENS),
                sync_breaker: script(SYNC_BREAKER),
                sync_buckets: script(SYNC_BUCKETS),
            }),
        })
    }
}

fn failed(error: redis::RedisError) -> StoreError {
    StoreError::new(error.to_string())
}

impl SharedStore for RedisStore {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        cap: u32,
        lease: Duration,
        holder: &'a str,
    ) -> StoreFuture<'a, Acquired> {
        let mut connection = self.connection.clone();
        Box::pin(async move {
            let (granted, wait_ms): (i64, i64) = self
                .scripts
                .acquire
                .key(key)
                .arg(cap)
                .arg(millis(lease))
                .arg(holder)
                .invoke_async(&mut connection)
                .await
                .map_err(failed)?;
            Ok(if granted == 1 {
                Acquired::Granted
            } else {
                Acquired::Full {
                    earliest_expiry: Duration::from_millis(wait_ms.max(0) as u64),
                }
            })
        })
    }

    fn renew<'a>(
        &'a self,
        key: &'a str,
        holders: &'a [String],
        lease: Duration,
    ) -> StoreFuture<'a, u32> {
        let mut connection = self.connection.clone();
        Box::pin(async move {
            let mut invocation = self.scripts.renew.key(key);
            invocation.arg(millis(lease));
            for holder in holders {
                invocation.arg(holder);
            }
            let held: u32 = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(failed)?;
            Ok(held)
        })
    }

    fn release<'a>(&'a self, key: &'a str, holders: &'a [String]) -> StoreFuture<'a, ()> {
        let mut connection = self.connection.clone();
        Box::pin(async move {
            if holders.is_empty() {
                return Ok(());
            }
            redis::cmd("ZREM")
                .arg(key)
                .arg(holders)
                .query_async::<()>(&mut connection)
                .await
                .map_err(failed)
        })
    }

    fn add_tokens<'a>(&'a self, key: &'a str, capacity: u32, delta: i64) -> StoreFuture<'a, u32> {
        let mut connection = self.connection.clone();
        Box::pin(async move {
            let after: u32 = self
                .scripts
                .add_tokens
                .key(key)
                .arg(capacity)
                .arg(delta)
                .invoke_async(&mut connection)
                .await
                .map_err(failed)?;
            Ok(after)
        })
    }

    fn sync_breaker<'a>(
        &'a self,
        key: &'a str,
        probe_key: &'a str,
        holder: &'a str,
        event: Option<BreakerEvent>,
        wants_probe: bool,
        probe_ttl: Duration,
    ) -> StoreFuture<'a, BreakerState> {
        let mut connection = self.connection.clone();
        Box::pin(async move {
            let (kind, rest) = match event {
                None => ("", Duration::ZERO),
                Some(BreakerEvent::Opened { rest }) => ("open", rest),
                Some(BreakerEvent::Closed) => ("close", Duration::ZERO),
            };
            let (state, value, rest_ms): (i64, i64, i64) = self
                .scripts
                .sync_breaker
                .key(key)
                .key(probe_key)
                .arg(kind)
                .arg(millis(rest))
                .arg(holder)
                .arg(millis(probe_ttl))
                .arg(if wants_probe { "1" } else { "0" })
                .invoke_async(&mut connection)
                .await
                .map_err(failed)?;
            let ms = |value: i64| Duration::from_millis(value.max(0) as u64);
            Ok(match state {
                1 => BreakerState::Open {
                    remaining: ms(value),
                    rest: ms(rest_ms),
                },
                2 => BreakerState::HalfOpen {
                    probe_is_yours: value == 1,
                    rest: ms(rest_ms),
                },
                _ => BreakerState::Closed,
            })
        })
    }

    fn sync_buckets<'a>(
        &'a self,
        key: &'a str,
        needs_key: &'a str,
        holder: &'a str,
        sync: &'a BucketsSync,
    ) -> StoreFuture<'a, BucketsView> {
        let mut connection = self.connection.clone();
        Box::pin(async move {
            let mut invocation = self.scripts.sync_buckets.key(key);
            invocation.key(needs_key);
            let (need, since) = sync.need.unwrap_or(([0; 3], 0));
            invocation
                .arg(holder)
                .arg(if sync.pause.is_zero() {
                    0
                } else {
                    millis(sync.pause)
                })
                .arg(since)
                .arg(sync.share);
            let per_bucket = sync
                .buckets
                .iter()
                .zip(sync.returned)
                .zip(sync.remaining)
                .zip(need);
            for (((bucket, returned), remaining), need) in per_bucket {
                let (capacity, period) = bucket.unwrap_or((0, Duration::from_secs(60)));
                let remaining =
                    remaining.map_or(-1, |left| i64::try_from(left).unwrap_or(i64::MAX));
                invocation
                    .arg(capacity)
                    .arg(millis(period))
                    .arg(returned)
                    .arg(remaining)
                    .arg(need);
            }
            let (a, b, c, paused): (i64, i64, i64, i64) = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(failed)?;
            Ok(BucketsView {
                lent: [a, b, c].map(|tokens| tokens as f64 / 1000.0),
                paused_for: Duration::from_millis(paused.max(0) as u64),
            })
        })
    }

    fn ping(&self) -> StoreFuture<'_, ()> {
        let mut connection = self.connection.clone();
        Box::pin(async move {
            redis::cmd("PING")
                .query_async::<()>(&mut connection)
                .await
                .map_err(failed)
        })
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: not printed.
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}
