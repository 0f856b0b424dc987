//! [`FleetThrottle`] in Redis: one throttle for every replica of the fleet.
//!
//! # Why it is shaped like this
//!
//! - **Every decision is one Lua script.** Redis runs a script to the end
//!   before it serves any other command, so "count the leases, take a
//!   token, grant the lease" is one indivisible step across all replicas,
//!   just as it is under the gate mutex of the single-process
//!   [`Throttle`](super::throttle::Throttle). No client-side locks, no
//!   WATCH/MULTI retries, and one round trip per decision (EVALSHA; the
//!   script is sent again only after Redis lost its script cache).
//! - **Redis's clock, not the replicas'.** Deadlines, the start-rate bucket
//!   and the staleness of waiters all read `TIME` inside the script, so the
//!   clock skew between replicas cannot shorten a lease or mint tokens. The
//!   rollout's marker key also records the latest time a script saw, and
//!   every script uses the later of the two: should the Redis host's clock
//!   step back, expired leases stay expired (they were already not counted
//!   against the cap, and may have been replaced).
//! - **Expiry is decided by the deadline alone.** A lease counts against
//!   the cap while `deadline >= now`, and only then can it be renewed. Once
//!   past its deadline it can never come back, so not counting it is safe
//!   even before [`FleetThrottle::reap`] removes it; the reaper still returns
//!   it, exactly once (the removal and the answer are one script).
//! - **Losing state is loud.** Every rollout has a marker key; a script that
//!   finds it missing changes nothing and answers "lost", which becomes
//!   [`ThrottleError::Lost`]. Only [`FleetThrottle::rebuild`] creates the
//!   marker. A Redis restart without persistence or a FLUSHALL therefore
//!   cannot silently reset the cap to "nobody is downloading".
//!
//! # Key layout
//!
//! With `T` = `{<prefix>:<rollout>}` (a Redis Cluster hash tag, so one
//! rollout's keys live in one slot):
//!
//! | key              | type   | contents                                   |
//! |------------------|--------|--------------------------------------------|
//! | `T:marker`       | string | exists ⇔ state valid; latest script time (ms) |
//! | `T:leases`       | hash   | device → `<fence>\|<update id>`            |
//! | `T:deadlines`    | zset   | device → lease deadline (ms, Redis clock)  |
//! | `T:bucket`       | hash   | `tokens`, `refilled_ms`                    |
//! | `T:queue`        | zset   | waiting device → ticket                    |
//! | `T:seen`         | hash   | waiting device → last attempt (ms)         |
//! | `T:ticket`       | string | last ticket handed out                     |
//! | `T:counts`       | hash   | `granted`, `expired`                       |
//! | `<prefix>:fence` | string | last fence handed out, for every rollout   |
//!
//! The fence counter is global so that fences are unique across rollouts
//! and survive [`FleetThrottle::forget`]. It is the one key outside the
//! rollout's slot: this works on a standalone Redis or a primary with
//! replicas (what [`ConnectionManager`] talks to); Redis Cluster would
//! refuse the scripts that touch it (CROSSSLOT), and would need the counter
//! moved under the rollout's hash tag.
//!
//! Needs Redis 6.2 or later (`ZADD ... GT`; tested with 7.0), which runs
//! scripts with effects replication, so `TIME` inside a writing script is
//! allowed and replicas receive the writes, not the script.
//!
//! Redis must run with `maxmemory-policy noeviction`: the design detects
//! the loss of *all* of a rollout's keys (restart, FLUSHALL), not the
//! eviction of a few of them.
//!
//! Fences are handled as Lua numbers (doubles), exact up to 2^53. Rebuilds
//! seed the counter with `now_ms × 1000`, about 1.8 × 10^15 today, which
//! stays exact until about the year 2250.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, ScriptInvocation, Value};

use super::shared::{Bucket, FleetThrottle, HeldLease, ThrottleError, ThrottleStats};
use super::throttle::{Admission, Limits, WaitReason};

/// Largest integer the scripts handle exactly (Lua numbers are doubles):
/// the bound for fences and the cap.
const MAX_EXACT: u64 = 1 << 53;

/// Longest lease or staleness accepted (ten years): keeps `now + lease_ms`
/// an exact integer inside the scripts.
const MAX_TERM_MS: u64 = 10 * 366 * 24 * 3600 * 1000;

/// Shared by every script: key names, the clocks and the "lost" answer.
///
/// Every script returns `{status, payload}`: status 0 means the rollout's
/// marker is missing (nothing was changed), 1 means `payload` is the answer.
const PRELUDE: &str = r#"
local marker, leases, deadlines, bucket = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local queue, seen, tickets, counts = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local fence_key = KEYS[9]
local LOST = {0, 0}

-- Integers are formatted explicitly: Lua's own number-to-string conversion
-- ("%.14g") would turn a 16-digit fence into 1.7e+15.
local function int(n)
  return string.format('%d', n)
end

-- Redis's clock in ms: the one clock every replica shares.
local function redis_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The rollout's clock, or nil when its state is lost. It never goes back:
-- the marker holds the latest time any script of this rollout saw, so an
-- expired lease cannot become live again if the host's clock steps back.
local function rollout_now()
  local last = redis.call('GET', marker)
  if not last then
    return nil
  end
  last = tonumber(last) or 0
  local now = redis_ms()
  if now > last then
    redis.call('SET', marker, int(now))
    return now
  end
  return last
end

-- The fence of a stored lease ("<fence>|<update id>"), as a string: fences
-- are compared as decimal strings, exactly.
local function fence_of(lease)
  return string.match(lease, '^(%d+)|')
end
"#;

/// Admission: the single-process `Throttle::try_admit`, step for step.
///
/// ARGV: device, update id, max concurrent, starts per minute, lease ms,
/// stale-after ms. Payload: `{1, fence, 0, 0}` (granted) or
/// `{2, 0, reason, near_head}` (wait; reason 1 cap, 2 start rate, 3 queued).
const TRY_ADMIT: &str = r#"
local now = rollout_now()
if not now then
  return LOST
end
local device, update_id = ARGV[1], ARGV[2]
local cap, rate = tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_ms, stale_ms = tonumber(ARGV[5]), tonumber(ARGV[6])

-- A device never holds two leases. Asking again for the update it holds a
-- live lease for (a replica retrying after a lost answer) gets the same
-- lease back, with a fresh term, so the grant is not leaked until it
-- expires; a live lease for another update means "busy" until it is
-- released.
local held = redis.call('HGET', leases, device)
if held then
  local deadline = tonumber(redis.call('ZSCORE', deadlines, device)) or -1
  if deadline >= now then
    local fence, held_update = string.match(held, '^(%d+)|(.*)$')
    if fence and held_update == update_id then
      if now + lease_ms > deadline then
        redis.call('ZADD', deadlines, int(now + lease_ms), device)
      end
      return {1, {1, fence, 0, 0}}
    end
    return {1, {2, '0', 1, 0}}
  end
  -- Past its deadline but not reaped yet: it no longer counts, yet it must
  -- reach the reaper (which decides retry or failure), so it is not
  -- replaced here; the device waits in the queue like everybody else.
end

-- Refill the start-rate bucket by the time elapsed. It holds at most one
-- second's worth of starts (at least one). A new rollout's bucket is
-- stored as "full" (more tokens than any burst, clamped here at first use);
-- a rebuild after a loss leaves it empty; a missing bucket (never after
-- rebuild) also counts as empty.
local burst = math.max(1, math.floor(rate / 60))
local b = redis.call('HMGET', bucket, 'tokens', 'refilled_ms')
local tokens = tonumber(b[1]) or 0
local refilled = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - refilled) * rate / 60000)

-- Drop stale waiters from the head so a vanished device does not hold the
-- queue. Bounded work per call; later calls continue.
for _ = 1, 64 do
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  if not head then
    break
  end
  local last_seen = tonumber(redis.call('HGET', seen, head)) or 0
  if now - last_seen <= stale_ms then
    break
  end
  redis.call('ZREM', queue, head)
  redis.call('HDEL', seen, head)
end

-- The caller's ticket: kept while it keeps asking, new otherwise.
local ticket = tonumber(redis.call('ZSCORE', queue, device))
if not ticket then
  ticket = redis.call('INCR', tickets)
  redis.call('ZADD', queue, int(ticket), device)
end
redis.call('HSET', seen, device, int(now))
local head = tonumber(redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')[2])

-- Only live leases count (see the deadline rule in the Rust docs).
local active = redis.call('ZCOUNT', deadlines, int(now), '+inf')
local free = math.max(0, cap - active)
local whole = math.floor(tokens)
local grantable = math.min(free, whole)
-- Tickets within `2 × grantable + 1` of the head may take a slot; the head
-- always may.
local window = 2 * grantable + 1
local near_head = 0
if ticket < head + 4 * math.max(window, math.min(cap, 64)) then
  near_head = 1
end
local reason = 0
if free == 0 then
  reason = 1
elseif whole == 0 then
  reason = 2
elseif ticket >= head + window then
  reason = 3
elseif held then
  reason = 1
end
if reason ~= 0 then
  redis.call('HSET', bucket, 'tokens', tokens, 'refilled_ms', int(now))
  return {1, {2, '0', reason, near_head}}
end

redis.call('HSET', bucket, 'tokens', tokens - 1, 'refilled_ms', int(now))
redis.call('ZREM', queue, device)
redis.call('HDEL', seen, device)
local fence = int(redis.call('INCR', fence_key))
redis.call('HSET', leases, device, fence .. '|' .. update_id)
redis.call('ZADD', deadlines, int(now + lease_ms), device)
redis.call('HINCRBY', counts, 'granted', 1)
return {1, {1, fence, 0, 0}}
"#;

/// ARGV: device, fence, lease ms. Payload: 1 renewed, 0 not.
///
/// Only the holder of the current fence renews, only while the lease is
/// live (a lease past its deadline may already have been replaced in the
/// cap's count), and only forward.
const RENEW: &str = r#"
local now = rollout_now()
if not now then
  return LOST
end
local device = ARGV[1]
local held = redis.call('HGET', leases, device)
if not held or fence_of(held) ~= ARGV[2] then
  return {1, 0}
end
local deadline = tonumber(redis.call('ZSCORE', deadlines, device))
if not deadline or deadline < now then
  return {1, 0}
end
local want = now + tonumber(ARGV[3])
if want > deadline then
  redis.call('ZADD', deadlines, int(want), device)
end
return {1, 1}
"#;

/// ARGV: device, fence. Payload: 1 released, 0 not (another fence, or
/// none). A lease past its deadline but not reaped may still be released by
/// its holder: whoever released it knows its fate, the reaper then does not
/// report it.
const RELEASE: &str = r#"
if not rollout_now() then
  return LOST
end
local device = ARGV[1]
local held = redis.call('HGET', leases, device)
if not held or fence_of(held) ~= ARGV[2] then
  return {1, 0}
end
redis.call('HDEL', leases, device)
redis.call('ZREM', deadlines, device)
return {1, 1}
"#;

/// Payload: `{device, "<fence>|<update id>", ...}` of every lease whose
/// deadline passed. Removing and answering are one step, so two reapers
/// never both get a lease. The work is bounded by the cap (plus rebuilt
/// leases): there are never more leases than that.
const REAP: &str = r#"
local now = rollout_now()
if not now then
  return LOST
end
local due = redis.call('ZRANGEBYSCORE', deadlines, '-inf', '(' .. int(now))
local out = {}
for _, device in ipairs(due) do
  local held = redis.call('HGET', leases, device)
  redis.call('ZREM', deadlines, device)
  if held then
    redis.call('HDEL', leases, device)
    redis.call('HINCRBY', counts, 'expired', 1)
    out[#out + 1] = device
    out[#out + 1] = held
  end
end
return {1, out}
"#;

/// Payload: `{active, waiting, granted, expired}`; active counts live
/// leases, as admission does.
const STATS: &str = r#"
local now = rollout_now()
if not now then
  return LOST
end
local c = redis.call('HMGET', counts, 'granted', 'expired')
return {1, {
  redis.call('ZCOUNT', deadlines, int(now), '+inf'),
  redis.call('ZCARD', queue),
  tonumber(c[1]) or 0,
  tonumber(c[2]) or 0,
}}
"#;

/// ARGV: lease ms, min fence, bucket ("full" for a new rollout, "empty"
/// after a loss), then (device, update id, fence) per lease. Payload: 1
/// rebuilt, 0 the state was already there.
///
/// The fence counter moves to max(current, min fence, every given fence,
/// now × 1000): after Redis lost everything the counter restarts from the
/// clock, so fences keep growing even if the caller knows of no fence.
///
/// If the marker exists, another replica rebuilt first (or nothing was
/// lost) and the state is live: restoring the leases again could bring back
/// a lease released since, so nothing else is touched. Without the marker
/// no script changes anything, so restoring is safe: leases the state still
/// has keep their fence (a different fence in Redis is not overwritten) and
/// every restored or surviving lease gets a fresh term. All of them count
/// against the cap, and after a loss the bucket starts empty: the fleet
/// admits fewer devices for a while, never more. A new rollout's bucket
/// starts full (one burst), as the in-process throttle's does.
const REBUILD: &str = r#"
local lease_ms = tonumber(ARGV[1])
local now = redis_ms()
local top = math.max(tonumber(redis.call('GET', fence_key)) or 0,
  tonumber(ARGV[2]) or 0, now * 1000)
for i = 4, #ARGV, 3 do
  top = math.max(top, tonumber(ARGV[i + 2]) or 0)
end
redis.call('SET', fence_key, int(top))

if redis.call('EXISTS', marker) == 1 then
  return {1, 0}
end
redis.call('SET', marker, int(now))
local deadline = int(now + lease_ms)
for i = 4, #ARGV, 3 do
  local device, update_id, fence = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if not redis.call('HGET', leases, device) then
    redis.call('HSET', leases, device, fence .. '|' .. update_id)
  end
  -- GT: a surviving later deadline is kept; a missing one is added.
  redis.call('ZADD', deadlines, 'GT', deadline, device)
  redis.call('ZREM', queue, device)
  redis.call('HDEL', seen, device)
end
-- Surviving leases without a deadline would never expire: give them one.
for _, device in ipairs(redis.call('HKEYS', leases)) do
  if not redis.call('ZSCORE', deadlines, device) then
    redis.call('ZADD', deadlines, deadline, device)
  end
end
-- 1e9 tokens: more than any burst; try_admit clamps it to the burst.
local start = 0
if ARGV[3] == 'full' then
  start = 1000000000
end
redis.call('HSET', bucket, 'tokens', int(start), 'refilled_ms', int(now))
return {1, 1}
"#;

/// Deletes the rollout's keys (not the global fence counter). Payload: keys
/// deleted.
const FORGET: &str = r#"
return {1, redis.call('DEL', marker, leases, deadlines, bucket, queue, seen, tickets, counts)}
"#;

/// The scripts, with their SHA1s computed once.
struct Scripts {
    try_admit: Script,
    renew: Script,
    release: Script,
    reap: Script,
    stats: Script,
    rebuild: Script,
    forget: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            try_admit: s(TRY_ADMIT),
            renew: s(RENEW),
            release: s(RELEASE),
            reap: s(REAP),
            stats: s(STATS),
            rebuild: s(REBUILD),
            forget: s(FORGET),
        }
    }
}

/// The fleet-wide throttle in Redis. Cheap to clone (the connection is
/// multiplexed and shared).
#[derive(Clone)]
pub struct RedisThrottle {
    con: ConnectionManager,
    prefix: String,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisThrottle")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> ThrottleError {
    ThrottleError::Backend(e.to_string())
}

/// Connects to the Redis at `url`; every key starts with `key_prefix`.
///
/// The [`ConnectionManager`] reconnects on its own after Redis restarts;
/// calls made while it is down fail with [`ThrottleError::Backend`], and
/// the first calls after an empty restart with [`ThrottleError::Lost`].
///
/// # Cancel safety
/// Dropping the future only drops the connection attempt.
pub async fn connect(url: &str, key_prefix: &str) -> Result<RedisThrottle, ThrottleError> {
    let client = redis::Client::open(url).map_err(backend)?;
    // A request that gets no answer fails after a few seconds instead of
    // holding a device's check-in; reconnection retries stay short so a
    // restarted Redis is used again within about a second.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(3)))
        .set_max_delay(Duration::from_secs(1));
    let con = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(backend)?;
    Ok(RedisThrottle {
        con,
        prefix: key_prefix.to_string(),
        scripts: Arc::new(Scripts::new()),
    })
}

impl RedisThrottle {
    /// The keys of `rollout`, in the order the scripts expect (`KEYS[1..9]`).
    fn keys(&self, rollout: &str) -> [String; 9] {
        let p = &self.prefix;
        let t = format!("{{{p}:{rollout}}}");
        [
            format!("{t}:marker"),
            format!("{t}:leases"),
            format!("{t}:deadlines"),
            format!("{t}:bucket"),
            format!("{t}:queue"),
            format!("{t}:seen"),
            format!("{t}:ticket"),
            format!("{t}:counts"),
            format!("{p}:fence"),
        ]
    }

    /// A script invocation of `script` for `rollout`, with its keys set.
    fn invocation<'a>(&self, script: &'a Script, rollout: &str) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for k in self.keys(rollout) {
            inv.key(k);
        }
        inv
    }

    /// Runs one script (EVALSHA, falling back to sending the script) and
    /// decodes its `{status, payload}` answer.
    ///
    /// # Cancel safety
    /// One script run: if dropped (or the answer times out), the script ran
    /// entirely or not at all; only its answer may be lost.
    async fn run<T: FromRedisValue>(
        &self,
        rollout: &str,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, ThrottleError> {
        // The manager is a handle to one multiplexed connection; cloning it
        // is how concurrent callers share it (no lock across the await).
        let mut con = self.con.clone();
        let (status, payload): (i64, Value) = inv.invoke_async(&mut con).await.map_err(backend)?;
        if status == 0 {
            return Err(ThrottleError::Lost(rollout.to_string()));
        }
        redis::from_redis_value(payload)
            .map_err(|e| backend(format!("unexpected answer from a throttle script: {e}")))
    }
}

/// A fence the scripts can hold exactly.
fn check_fence(fence: u64) -> Result<u64, ThrottleError> {
    if fence > MAX_EXACT {
        return Err(backend(format!(
            "fence {fence} is beyond 2^53, which the Redis throttle cannot hold exactly"
        )));
    }
    Ok(fence)
}

/// Parses a stored lease, `<fence>|<update id>`.
fn parse_lease(device: String, stored: &str) -> Result<HeldLease, ThrottleError> {
    stored
        .split_once('|')
        .and_then(|(f, u)| {
            Some(HeldLease {
                device,
                update_id: u.to_string(),
                fence: f.parse().ok()?,
            })
        })
        .ok_or_else(|| backend(format!("malformed lease in Redis: {stored:?}")))
}

#[async_trait]
impl FleetThrottle for RedisThrottle {
    /// One script (`TRY_ADMIT` above). A device that already holds a live
    /// lease for `update_id` gets that lease back (same fence, fresh term);
    /// for another update it waits with [`WaitReason::ConcurrencyCap`].
    ///
    /// # Cancel safety
    /// One script run. A dropped call may leave a granted lease nobody
    /// uses; asking again returns it, otherwise it expires.
    async fn try_admit(
        &self,
        rollout: &str,
        device: &str,
        update_id: &str,
        limits: Limits,
    ) -> Result<Admission, ThrottleError> {
        // Finite, non-negative inputs keep the script's arithmetic exact.
        let rate = if limits.starts_per_min.is_nan() {
            0.0
        } else {
            limits.starts_per_min.clamp(0.0, 1e15)
        };
        let mut inv = self.invocation(&self.scripts.try_admit, rollout);
        inv.arg(device)
            .arg(update_id)
            .arg(limits.max_concurrent.min(MAX_EXACT))
            .arg(rate)
            .arg(limits.lease_ms.min(MAX_TERM_MS))
            .arg(limits.stale_after_ms.min(MAX_TERM_MS));
        let (kind, fence, reason, near_head): (i64, u64, i64, i64) =
            self.run(rollout, &inv).await?;
        Ok(match (kind, reason) {
            (1, _) => Admission::Granted { fence },
            (_, r) => Admission::Wait {
                reason: match r {
                    1 => WaitReason::ConcurrencyCap,
                    2 => WaitReason::StartRate,
                    _ => WaitReason::Queued,
                },
                near_head: near_head != 0,
            },
        })
    }

    /// # Cancel safety
    /// One script run; renewing twice is harmless.
    async fn renew(
        &self,
        rollout: &str,
        device: &str,
        fence: u64,
        lease_ms: u64,
    ) -> Result<bool, ThrottleError> {
        let mut inv = self.invocation(&self.scripts.renew, rollout);
        inv.arg(device).arg(fence).arg(lease_ms.min(MAX_TERM_MS));
        Ok(self.run::<i64>(rollout, &inv).await? == 1)
    }

    /// # Cancel safety
    /// One script run; releasing twice is harmless (the second finds no
    /// lease with that fence).
    async fn release(
        &self,
        rollout: &str,
        device: &str,
        fence: u64,
    ) -> Result<bool, ThrottleError> {
        let mut inv = self.invocation(&self.scripts.release, rollout);
        inv.arg(device).arg(fence);
        Ok(self.run::<i64>(rollout, &inv).await? == 1)
    }

    /// # Cancel safety
    /// One script run. If the answer is lost (dropped future, broken
    /// connection) after the script ran, the leases it removed are reported
    /// to nobody: the engine's own sweep of devices stuck in `downloading`
    /// must cover that, as for a replica that dies mid-reap.
    async fn reap(&self, rollout: &str) -> Result<Vec<HeldLease>, ThrottleError> {
        let inv = self.invocation(&self.scripts.reap, rollout);
        let flat: Vec<String> = self.run(rollout, &inv).await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(device), Some(stored)) = (it.next(), it.next()) {
            out.push(parse_lease(device, &stored)?);
        }
        Ok(out)
    }

    /// # Cancel safety
    /// One script run, idempotent: run again if in doubt.
    async fn rebuild(
        &self,
        rollout: &str,
        leases: &[HeldLease],
        lease_ms: u64,
        min_fence: u64,
        bucket: Bucket,
    ) -> Result<(), ThrottleError> {
        let mut inv = self.invocation(&self.scripts.rebuild, rollout);
        inv.arg(lease_ms.min(MAX_TERM_MS))
            .arg(check_fence(min_fence)?)
            .arg(match bucket {
                Bucket::Full => "full",
                Bucket::Empty => "empty",
            });
        for l in leases {
            inv.arg(&l.device)
                .arg(&l.update_id)
                .arg(check_fence(l.fence)?);
        }
        self.run::<i64>(rollout, &inv).await.map(drop)
    }

    /// # Cancel safety
    /// One script run, read-only apart from the rollout's clock.
    async fn stats(&self, rollout: &str) -> Result<ThrottleStats, ThrottleError> {
        let inv = self.invocation(&self.scripts.stats, rollout);
        let (active, waiting, granted, expired) = self.run(rollout, &inv).await?;
        Ok(ThrottleStats {
            active,
            waiting,
            granted,
            expired,
        })
    }

    /// # Cancel safety
    /// One script run, idempotent.
    async fn forget(&self, rollout: &str) -> Result<(), ThrottleError> {
        let inv = self.invocation(&self.scripts.forget, rollout);
        self.run::<i64>(rollout, &inv).await.map(drop)
    }
}
