//! Cooldowns, failure counts and the retry budget shared by several processes through Redis
//! (cargo feature `redis`). See [`RedisHealth`] and [`RedisBudget`].

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, Script};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use super::health::{Admission, Cooldowns, HealthOutcome, HealthStore, TargetId};
use crate::error::ConfigError;

/// The longest cooldown written to Redis (ten years): longer ones are capped, so that an endless
/// cooldown cannot overflow Redis's expiry arithmetic.
const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3600 * 1000;
/// How long connecting to Redis, and each answer from it, may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// Events waiting for the background task; more are dropped (the local state still has them).
const QUEUE: usize = 1024;
/// The default refresh interval.
const DEFAULT_REFRESH: Duration = Duration::from_millis(200);
/// How long the fleet's probe lock is held by default: long enough for one attempt.
const DEFAULT_PROBE_LOCK: Duration = Duration::from_secs(30);
/// How long a target stays marked open after its cooldown, waiting for a probe to close it; past
/// it, with no probe, every replica probes on its own again.
const OPEN_MARK_SLACK: Duration = Duration::from_secs(600);

/// A failure: counts it in the shared window and extends the cooldown when it calls for one;
/// while a cooldown runs, marks the target open until a probe closes it; a failed probe gives
/// its lock back. KEYS: fails, cool, open, probe lock. ARGV: window ms, threshold, cooldown ms,
/// asked-for cooldown ms (0: none), 1 when the replica's breaker was open (a failed probe
/// re-opens it everywhere), the replica's token when the attempt was its probe (else ''), how
/// long the open mark outlives the cooldown in ms. Returns the cooldown left in ms (0 when none).
const FAILURE_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local want = tonumber(ARGV[4])
local ttl = redis.call('PTTL', KEYS[2])
if ttl > 0 or n >= tonumber(ARGV[2]) or ARGV[5] == '1' then
  want = math.max(want, tonumber(ARGV[3]))
end
if want > 0 and want > ttl then
  redis.call('SET', KEYS[2], '1', 'PX', want)
  ttl = want
end
if ttl > 0 then redis.call('SET', KEYS[3], '1', 'PX', ttl + tonumber(ARGV[7])) end
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) == ARGV[6] then redis.call('DEL', KEYS[4]) end
return math.max(ttl, 0)
";

/// A bid for a target's probe lock: won when it is free or already this replica's (then held
/// for a whole lock again). KEYS: probe lock. ARGV: the replica's token, the lock in ms.
/// Returns 1 when won.
const BID_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// A success resets the shared failure count and, once no shared cooldown runs, closes the target
/// for every replica (a success sent before the cooldown began proves nothing); a probe that ends
/// either way gives its lock back. KEYS: fails, open, probe lock, cool. ARGV: 1 for a success,
/// the replica's token when the attempt was its probe (else '').
const SETTLE_SCRIPT: &str = r"
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
  if redis.call('PTTL', KEYS[4]) <= 0 then redis.call('DEL', KEYS[2]) end
end
if ARGV[2] ~= '' and redis.call('GET', KEYS[3]) == ARGV[2] then redis.call('DEL', KEYS[3]) end
return 0
";

/// Extends a cooldown to at least ARGV[1] ms from now; never shortens it. KEYS: cool.
const EXTEND_SCRIPT: &str = r"
local want = tonumber(ARGV[1])
if want > 0 and want > redis.call('PTTL', KEYS[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', want)
end
return 0
";

/// Adds this process's deposits and withdrawals to the current slot (by Redis's clock) and
/// returns the totals over the window. KEYS: the budget key prefix. ARGV: slot ms, slots,
/// deposits, withdrawals.
const BUDGET_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slot_ms = tonumber(ARGV[1])
local slots = tonumber(ARGV[2])
local slot = math.floor(now / slot_ms)
local key = KEYS[1] .. ':' .. slot
local d, w = tonumber(ARGV[3]), tonumber(ARGV[4])
if d > 0 then redis.call('HINCRBY', key, 'd', d) end
if w > 0 then redis.call('HINCRBY', key, 'w', w) end
if d > 0 or w > 0 then redis.call('PEXPIRE', key, slot_ms * (slots + 1)) end
local td, tw = 0, 0
for i = 0, slots - 1 do
  local v = redis.call('HMGET', KEYS[1] .. ':' .. (slot - i), 'd', 'w')
  td = td + (tonumber(v[1]) or 0)
  tw = tw + (tonumber(v[2]) or 0)
end
return {td, tw}
";

fn ttl_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_TTL_MS)
}

/// Where the shared state lives: a Redis URL and a key prefix.
#[derive(Clone)]
struct Link {
    client: Client,
    prefix: String,
    refresh: Duration,
    /// `host:port` (never the password), for logs.
    addr: String,
}

impl Link {
    fn new(url: &str, prefix: &str) -> Result<Self, ConfigError> {
        let tls = url
            .get(..9)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"));
        if tls && cfg!(not(feature = "redis-tls")) {
            return Err(ConfigError::new(
                "redis_url",
                "is rediss:// (TLS), which needs tower-model-fallback built with its `redis-tls` \
                 feature",
            ));
        }
        let client = Client::open(url)
            .map_err(|e| ConfigError::new("redis_url", format!("is not a Redis URL ({e})")))?;
        if let ConnectionAddr::TcpTls { insecure: true, .. } = client.get_connection_info().addr() {
            return Err(ConfigError::new(
                "redis_url",
                "asks for TLS without certificate checks (#insecure), which is not supported; \
                 trust the server's CA instead (RedisTls::root_ca_pem, tls_ca_file in a config)",
            ));
        }
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::new(
                "prefix",
                "must be non-empty, without spaces or control characters",
            ));
        }
        let addr = client.get_connection_info().addr().to_string();
        Ok(Link {
            client,
            prefix: prefix.to_owned(),
            refresh: DEFAULT_REFRESH,
            addr,
        })
    }

    /// Builds the client again with `tls`'s roots and client identity.
    #[cfg(feature = "redis-tls")]
    fn tls(&mut self, tls: &RedisTls) -> Result<(), ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;

        let info = self.client.get_connection_info();
        if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            return Err(ConfigError::new(
                "redis_url",
                "is not rediss://: TLS settings need a rediss:// URL",
            ));
        }
        // A PEM file with no certificate in it parses as an empty list: say so now rather than
        // fail every handshake later.
        let holds_certificates = |pem: &[u8]| CertificateDer::pem_slice_iter(pem).next().is_some();
        if let Some(ca) = &tls.root_ca {
            if !holds_certificates(ca) {
                return Err(ConfigError::new("root_ca_pem", "holds no PEM certificate"));
            }
        }
        if let Some((chain, _)) = &tls.identity {
            if !holds_certificates(chain) {
                return Err(ConfigError::new(
                    "client_identity_pem",
                    "holds no PEM certificate",
                ));
            }
        }
        let certificates = redis::TlsCertificates {
            client_tls: tls
                .identity
                .as_ref()
                .map(|(chain, key)| redis::ClientTlsConfig {
                    client_cert: chain.clone(),
                    client_key: key.clone(),
                }),
            root_cert: tls.root_ca.clone(),
        };
        // Redis's messages name the PEM that failed to parse, never the URL or a key.
        self.client = Client::build_with_tls(info.clone(), certificates)
            .map_err(|e| ConfigError::new("tls", format!("is not usable ({e})")))?;
        Ok(())
    }

    fn refresh(&mut self, every: Duration) -> Result<(), ConfigError> {
        if every.is_zero() {
            return Err(ConfigError::new("refresh_ms", "must be at least 1"));
        }
        self.refresh = every;
        Ok(())
    }
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("addr", &self.addr)
            .field("prefix", &self.prefix)
            .field("refresh", &self.refresh)
            .finish()
    }
}

/// A connection to Redis that is opened on demand, dropped on any error, and whose outages are
/// logged once each.
struct Connection {
    link: Link,
    what: &'static str,
    conn: Option<MultiplexedConnection>,
    /// What was logged last: `Some(true)` up, `Some(false)` down, `None` nothing yet (the
    /// first outcome is logged either way: a store that never connects says so).
    up: Option<bool>,
}

impl Connection {
    fn new(link: Link, what: &'static str) -> Self {
        Connection {
            link,
            what,
            conn: None,
            up: None,
        }
    }

    /// The connection, opened if need be; `None` while Redis cannot be reached. `fresh` is set
    /// when the connection was (re)opened now.
    async fn get(&mut self, fresh: &mut bool) -> Option<&mut MultiplexedConnection> {
        if self.conn.is_none() {
            #[cfg(feature = "redis-tls")]
            install_crypto_provider();
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(REDIS_TIMEOUT));
            match self
                .link
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(conn) => {
                    tracing::info!(
                        redis = %self.link.addr,
                        prefix = %self.link.prefix,
                        "shared {} connected",
                        self.what
                    );
                    self.conn = Some(conn);
                    self.up = Some(true);
                    *fresh = true;
                }
                Err(e) => {
                    self.failed(&e);
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    fn failed(&mut self, e: &redis::RedisError) {
        self.conn = None;
        if self.up != Some(false) {
            self.up = Some(false);
            tracing::warn!(
                redis = %self.link.addr,
                error = %e,
                "shared {} unreachable; serving on local state until it answers",
                self.what
            );
        }
    }
}

/// rustls needs a process-wide crypto provider when more than one is compiled in (an application
/// with reqwest's default aws-lc-rs beside this crate's ring): install ring unless the
/// application installed its own first. Only at the first connection, so that an application
/// that installs its provider at start-up is never pre-empted.
#[cfg(feature = "redis-tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may have won the race; then its provider serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// What a `rediss://` connection trusts and shows beyond the default (cargo feature
/// `redis-tls`): the webpki roots, which managed Redis services' certificates chain to, and no
/// client certificate.
///
/// Give [`root_ca_pem`](RedisTls::root_ca_pem) for a server whose certificate a private CA
/// signed (it then replaces the webpki roots), and
/// [`client_identity_pem`](RedisTls::client_identity_pem) for a server that asks for client
/// certificates (`tls-auth-clients yes`). `Debug` never shows the key.
///
/// ```no_run
/// use tower_model_fallback::{RedisHealth, RedisTls};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let tls = RedisTls::new().root_ca_pem(std::fs::read("/etc/redis/ca.crt")?);
/// let store = RedisHealth::new(&std::env::var("REDIS_URL")?, "llm-gateway")?.tls(&tls)?;
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
///
/// The first TLS connection installs rustls' ring provider as the process default when the
/// application has installed none (rustls cannot choose one itself when several are compiled
/// in); an application that wants another installs it before its first request.
#[cfg(feature = "redis-tls")]
#[derive(Clone, Default)]
pub struct RedisTls {
    root_ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

#[cfg(feature = "redis-tls")]
impl RedisTls {
    /// The webpki roots and no client certificate: what a bare `rediss://` URL gets.
    pub fn new() -> Self {
        RedisTls::default()
    }

    /// Trust only the CA certificates in `pem` (one or more PEM blocks) instead of the webpki
    /// roots.
    pub fn root_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_ca = Some(pem.into());
        self
    }

    /// Show the server this certificate chain (PEM, leaf first) and private key (PEM: PKCS#8,
    /// PKCS#1 or SEC1) when it asks for one.
    pub fn client_identity_pem(
        mut self,
        cert_chain: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert_chain.into(), key.into()));
        self
    }
}

#[cfg(feature = "redis-tls")]
impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("root_ca", &self.root_ca.as_ref().map(|_| "<PEM>"))
            .field("client_identity", &self.identity.as_ref().map(|_| "<PEM>"))
            .finish()
    }
}

/// A [`HealthStore`] whose cooldowns and failure counts are shared through Redis by every
/// process that uses the same Redis and prefix (cargo feature `redis`).
///
/// The request path never waits on Redis. Each process keeps the state in memory, exactly as
/// [`Cooldowns`] and tower's [`TpsBudget`] do, and a background task keeps that state and Redis
/// in step:
///
/// - a failure is sent to the task without waiting (a bounded queue; when it is full the event
///   is dropped and only the local state learns of it) and written with one Lua script that
///   counts it in a shared window and, when the count reaches the threshold or the failure asks
///   for a cooldown (`Retry-After`, an exhausted quota), extends the target's shared cooldown key.
///   The key's TTL is the cooldown: a longer one extends it, a shorter one never shortens it, and
///   the compare and the write are one atomic script;
/// - every `refresh` interval the task reads the TTL of every target's cooldown key (one pipelined
///   round trip) and extends the local cooldowns to match, so a cooldown learnt by one replica
///   reaches the others within one interval;
/// - if Redis is down or slow (connect and response time-outs of one second), the task logs it
///   once, every replica keeps serving on its local state, and when Redis answers again the task
///   writes its local cooldowns back (never shortening anything) and logs the recovery.
///
/// A success at a replica that has seen failures of a target resets the target's shared failure
/// count; the success path of a healthy target sends nothing to Redis. Cooldown keys are never
/// deleted early: a `Retry-After` is the provider's word for every replica, so they run out on
/// their own.
///
/// After a shared cooldown ends, the fleet sends one probe: a cooldown marks the target open in
/// Redis, and while it is open a replica whose request would probe skips the target instead and
/// bids, at its next refresh, for a short lock (`SET … PX` of [`probe_lock`](RedisHealth::probe_lock),
/// 30 s by default, in one script that only the lock's holder or nobody can win). The winner's next
/// request is the probe; the others keep skipping. A successful probe clears the mark and each
/// other replica closes its breaker at its next refresh; a failed one opens the shared cooldown
/// again; a dropped one gives the lock back. The probe therefore starts up to one refresh after
/// the cooldown ends. While Redis cannot be reached, each replica probes on its own as
/// [`Cooldowns`] does.
///
/// Keys are `{prefix}:cool:{target}`, `{prefix}:fails:{target}`, `{prefix}:open:{target}`,
/// `{prefix}:probe:{target}` and `{prefix}:budget:{slot}`, with `{target}` the target's
/// `name|base_url|model` (and a 32-bit fingerprint of its key, so that two keys for one model are
/// two quota pools), so several gateways (with different prefixes, or the same targets under the
/// same prefix) can share one Redis. **A single Redis node is required** (a Sentinel-managed
/// primary is one): the scripts touch several keys of a target at once and the budget's script
/// names its slot keys itself, which Redis Cluster refuses across hash slots; the client does not
/// follow cluster redirections either.
///
/// The background task runs on the tokio runtime that first uses the store (which needs its time
/// driver, as the layer's timers do).
///
/// ```no_run
/// use std::time::Duration;
/// use tower_model_fallback::{Cooldowns, FallbackLayer, RedisHealth, Target};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisHealth::new("redis://127.0.0.1:6379/", "llm-gateway")?
///     .cooldowns(Cooldowns::new().cooldown(Duration::from_secs(30)))
///     .refresh(Duration::from_millis(200))?;
/// let layer = FallbackLayer::new([
///     Target::new("https://api.cometapi.com/v1")?.with_model("gpt-4o-mini"),
///     Target::new("https://api.openai.com/v1")?.with_model("gpt-4o-mini"),
/// ])?
/// .redis_health(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
pub struct RedisHealth {
    link: Link,
    cooldowns: Cooldowns,
    probe_lock: Duration,
    core: Option<Arc<HealthCore>>,
}

struct HealthCore {
    local: Cooldowns,
    keys: Vec<String>,
    tx: mpsc::Sender<HealthEvent>,
    task: Mutex<Option<HealthTask>>,
    started: AtomicBool,
    dropped: AtomicU64,
    errors: AtomicU64,
    /// Per target: where the fleet's one probe stands, as this replica knows it.
    fleet: Vec<FleetProbe>,
    /// This replica's value in the probe locks it holds.
    token: String,
    probe_lock: Duration,
    /// Redis answered the last round: the fleet's probe lock is in force.
    linked: AtomicBool,
}

/// One target's probe, fleet-wide: once a cooldown ends, only the replica holding the target's
/// lock sends the probe; the others skip it until the outcome reaches them.
#[derive(Default)]
struct FleetProbe {
    /// Redis has the target open: a cooldown began that no probe has closed yet.
    open: AtomicBool,
    /// A request here would have probed: take the lock at the next round.
    wanted: AtomicBool,
    /// This replica holds the lock, until then: its next admission is the probe.
    granted: Mutex<Option<Instant>>,
}

impl HealthCore {
    /// Whether target `index`'s probe is the fleet's to send, not this replica's alone.
    fn gated(&self, index: usize) -> bool {
        self.linked.load(Ordering::Acquire)
            && self
                .fleet
                .get(index)
                .is_some_and(|f| f.open.load(Ordering::Acquire))
    }

    /// Takes this replica's grant for target `index`, if it holds an unexpired one.
    fn take_grant(&self, index: usize) -> bool {
        let Some(fleet) = self.fleet.get(index) else {
            return false;
        };
        let mut granted = fleet.granted.lock().unwrap_or_else(|e| e.into_inner());
        granted.take().is_some_and(|until| Instant::now() < until)
    }
}

#[derive(Debug, Clone, Copy)]
enum HealthEvent {
    Failure {
        index: usize,
        at_least: Option<Duration>,
        /// The breaker was open at this replica (a failed probe, or a failure while cooling).
        reopen: bool,
        probe: bool,
    },
    Success {
        index: usize,
        probe: bool,
    },
    /// A probe ended with nothing learnt (it was dropped): its lock is given back.
    Released {
        index: usize,
    },
}

/// What the background task needs, until it is started.
struct HealthTask {
    rx: mpsc::Receiver<HealthEvent>,
    link: Link,
}

impl fmt::Debug for RedisHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisHealth")
            .field("link", &self.link)
            .field("cooldowns", &self.cooldowns)
            .field("probe_lock", &self.probe_lock)
            .field("bound", &self.core.is_some())
            .finish()
    }
}

impl RedisHealth {
    /// A store on the Redis at `url` (`redis://[:password@]host:port[/db]`), with its keys under
    /// `prefix`. Nothing connects yet; an invalid URL or prefix is an error.
    pub fn new(url: &str, prefix: &str) -> Result<Self, ConfigError> {
        Ok(RedisHealth {
            link: Link::new(url, prefix)?,
            cooldowns: Cooldowns::new(),
            probe_lock: DEFAULT_PROBE_LOCK,
            core: None,
        })
    }

    /// TLS settings for a `rediss://` URL: a private CA, a client certificate (cargo feature
    /// `redis-tls`). A bare `rediss://` URL needs none: it trusts the webpki roots. An error for
    /// a `redis://` URL or a PEM that holds no certificate.
    #[cfg(feature = "redis-tls")]
    pub fn tls(mut self, tls: &RedisTls) -> Result<Self, ConfigError> {
        self.link.tls(tls)?;
        Ok(self)
    }

    /// The failure threshold, window and cooldowns (default [`Cooldowns::new`]); they apply to
    /// the shared counts as well as the local ones.
    pub fn cooldowns(mut self, cooldowns: Cooldowns) -> Self {
        self.cooldowns = cooldowns;
        self
    }

    /// How often the local state is refreshed from Redis (default 200 ms): how long a cooldown
    /// learnt by another replica may take to arrive, and one Redis round trip per interval.
    pub fn refresh(mut self, every: Duration) -> Result<Self, ConfigError> {
        self.link.refresh(every)?;
        Ok(self)
    }

    /// How long the replica that sends a target's probe holds the fleet's lock on it (default
    /// 30 s): long enough for one attempt. If the probe outlives it (or the replica dies), another
    /// replica may probe after it.
    pub fn probe_lock(mut self, lock: Duration) -> Result<Self, ConfigError> {
        if lock < Duration::from_millis(1) {
            return Err(ConfigError::new("probe_lock_ms", "must be at least 1"));
        }
        self.probe_lock = lock;
        Ok(self)
    }

    /// The cooldown after a 429 `insufficient_quota`.
    pub(crate) fn quota_cooldown(&self) -> Duration {
        self.cooldowns.settings().quota_cooldown
    }

    /// Failures that could not be queued for Redis (the queue was full); the local state still
    /// has them.
    pub fn dropped_events(&self) -> u64 {
        self.core
            .as_ref()
            .map_or(0, |c| c.dropped.load(Ordering::Relaxed))
    }

    /// Connections to Redis that failed and commands it did not answer, since the start: each
    /// one left this process on its local state until the next refresh.
    pub fn redis_errors(&self) -> u64 {
        self.core
            .as_ref()
            .map_or(0, |c| c.errors.load(Ordering::Relaxed))
    }

    fn core(&self) -> Option<&Arc<HealthCore>> {
        let core = self.core.as_ref()?;
        if !core.started.load(Ordering::Acquire) {
            start_health(core);
        }
        Some(core)
    }

    fn send(&self, event: HealthEvent) {
        if let Some(core) = self.core() {
            if core.tx.try_send(event).is_err() {
                core.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Starts the background task if a tokio runtime is at hand (otherwise a later call will).
fn start_health(core: &Arc<HealthCore>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let mut slot = core.task.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(task) = slot.take() {
        core.started.store(true, Ordering::Release);
        runtime.spawn(health_task(Arc::downgrade(core), task));
    }
}

impl HealthStore for RedisHealth {
    fn bind(&mut self, targets: &[TargetId<'_>]) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let core = Arc::new(HealthCore {
            local: self.cooldowns.clone_settings().for_targets(targets.len()),
            keys: targets.iter().map(|t| t.key.to_owned()).collect(),
            tx,
            task: Mutex::new(Some(HealthTask {
                rx,
                link: self.link.clone(),
            })),
            started: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            fleet: targets.iter().map(|_| FleetProbe::default()).collect(),
            token: replica_token(),
            probe_lock: self.probe_lock,
            linked: AtomicBool::new(false),
        });
        start_health(&core);
        self.core = Some(core);
    }

    fn admit(&self, target: TargetId<'_>) -> Admission {
        let Some(core) = self.core() else {
            return Admission::Open;
        };
        match core.local.admit(target) {
            Admission::Probe if core.gated(target.index) && !core.take_grant(target.index) => {
                // The fleet sends one probe: this replica asks for the lock and skips the
                // target meanwhile, giving back the local probe it was just handed.
                core.local.record(target, HealthOutcome::Neutral, true);
                if let Some(fleet) = core.fleet.get(target.index) {
                    fleet.wanted.store(true, Ordering::Release);
                }
                Admission::Cooling(Duration::ZERO)
            }
            admission => admission,
        }
    }

    fn cooling_for(&self, target: TargetId<'_>) -> Duration {
        self.core()
            .map_or(Duration::ZERO, |core| core.local.cooling_for(target))
    }

    fn record(&self, target: TargetId<'_>, outcome: HealthOutcome, probe: bool) {
        let Some(core) = self.core() else {
            return;
        };
        match outcome {
            HealthOutcome::Failure { at_least } => {
                let reopen = probe || core.local.is_open(target.index);
                core.local.record(target, outcome, probe);
                self.send(HealthEvent::Failure {
                    index: target.index,
                    at_least,
                    reopen,
                    probe,
                });
            }
            HealthOutcome::Success => {
                // Only a success after failures is news for Redis: the success path of a healthy
                // target never queues anything.
                let news = probe || !core.local.is_clean(target.index);
                core.local.record(target, outcome, probe);
                if news {
                    self.send(HealthEvent::Success {
                        index: target.index,
                        probe,
                    });
                }
            }
            HealthOutcome::Neutral => {
                core.local.record(target, outcome, probe);
                if probe {
                    self.send(HealthEvent::Released {
                        index: target.index,
                    });
                }
            }
        }
    }
}

/// A value no other replica's probe lock holds.
fn replica_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

/// The Redis side of a health store: its keys and scripts.
struct HealthKeys {
    cool: Vec<String>,
    fails: Vec<String>,
    open: Vec<String>,
    probe: Vec<String>,
    settings: crate::resilience::health::CooldownSettings,
    failure: Script,
    extend: Script,
    settle: Script,
    bid: Script,
    /// How long a won bid may wait for a request to probe with (two refreshes, within the lock).
    grant: Duration,
}

/// The keys of one target.
struct TargetKeys<'a> {
    fails: &'a str,
    cool: &'a str,
    open: &'a str,
    probe: &'a str,
}

impl HealthKeys {
    fn of(&self, index: usize) -> Option<TargetKeys<'_>> {
        Some(TargetKeys {
            fails: self.fails.get(index)?,
            cool: self.cool.get(index)?,
            open: self.open.get(index)?,
            probe: self.probe.get(index)?,
        })
    }

    fn new(core: &HealthCore, link: &Link) -> Self {
        let prefix = &link.prefix;
        let keys = |kind: &str| {
            core.keys
                .iter()
                .map(|k| format!("{prefix}:{kind}:{k}"))
                .collect()
        };
        HealthKeys {
            cool: keys("cool"),
            fails: keys("fails"),
            open: keys("open"),
            probe: keys("probe"),
            settings: core.local.settings(),
            failure: Script::new(FAILURE_SCRIPT),
            extend: Script::new(EXTEND_SCRIPT),
            settle: Script::new(SETTLE_SCRIPT),
            bid: Script::new(BID_SCRIPT),
            grant: (link.refresh * 2).min(core.probe_lock / 2),
        }
    }
}

async fn health_task(core: Weak<HealthCore>, task: HealthTask) {
    let HealthTask { mut rx, link } = task;
    let keys = match core.upgrade() {
        Some(core) => HealthKeys::new(&core, &link),
        None => return,
    };
    let mut conn = Connection::new(link.clone(), "health store");
    let mut tick = tokio::time::interval(link.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 64) => {
                if n == 0 {
                    return;
                }
            }
            _ = tick.tick() => {}
        }
        let Some(core) = core.upgrade() else {
            return;
        };
        let mut fresh = false;
        let result = match conn.get(&mut fresh).await {
            Some(c) => sync_health(&core, &keys, c, &mut batch, fresh).await,
            None => Err(None),
        };
        core.linked.store(result.is_ok(), Ordering::Release);
        if let Err(e) = result {
            core.errors.fetch_add(1, Ordering::Relaxed);
            // What the failed round did not get to.
            core.dropped
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            batch.clear();
            if let Some(e) = e {
                conn.failed(&e);
            }
        }
    }
}

/// One round with Redis: the events of `batch`, then every target's shared cooldown read back.
/// An error of `None` means there was no connection.
async fn sync_health(
    core: &HealthCore,
    keys: &HealthKeys,
    c: &mut MultiplexedConnection,
    batch: &mut Vec<HealthEvent>,
    fresh: bool,
) -> Result<(), Option<redis::RedisError>> {
    if fresh {
        // Back after an outage (or the first time): hand Redis what this process learnt
        // meanwhile; the script never shortens a longer cooldown.
        for (i, key) in keys.cool.iter().enumerate() {
            let left = core.local.cooling_for(TargetId {
                index: i,
                key: &core.keys[i],
            });
            if !left.is_zero() {
                keys.extend
                    .key(key)
                    .arg(ttl_ms(left))
                    .invoke_async::<i64>(c)
                    .await?;
            }
        }
    }
    for event in batch.drain(..) {
        send_event(core, keys, c, event).await?;
    }
    let mut pipe = redis::pipe();
    for (cool, open) in keys.cool.iter().zip(&keys.open) {
        pipe.cmd("PTTL").arg(cool).cmd("EXISTS").arg(open);
    }
    let read: Vec<i64> = pipe.query_async(c).await?;
    for (index, pair) in read.chunks(2).enumerate() {
        let (ttl, open) = (pair[0], pair.get(1) == Some(&1));
        let ttl = u64::try_from(ttl).unwrap_or(0);
        apply(core, index, ttl);
        follow_probe(core, keys, c, index, open, ttl == 0).await?;
    }
    Ok(())
}

/// One event of this replica, written to Redis.
async fn send_event(
    core: &HealthCore,
    keys: &HealthKeys,
    c: &mut MultiplexedConnection,
    event: HealthEvent,
) -> Result<(), redis::RedisError> {
    let token = |probe: bool| if probe { core.token.as_str() } else { "" };
    match event {
        HealthEvent::Failure {
            index,
            at_least,
            reopen,
            probe,
        } => {
            let Some(k) = keys.of(index) else {
                return Ok(());
            };
            let settings = &keys.settings;
            let left: u64 = keys
                .failure
                .key(k.fails)
                .key(k.cool)
                .key(k.open)
                .key(k.probe)
                .arg(ttl_ms(settings.window).max(1))
                .arg(settings.failures)
                .arg(ttl_ms(settings.cooldown))
                .arg(at_least.map_or(0, ttl_ms))
                .arg(u8::from(reopen))
                .arg(token(probe))
                .arg(ttl_ms(OPEN_MARK_SLACK))
                .invoke_async(c)
                .await?;
            apply(core, index, left);
        }
        HealthEvent::Success { index, probe } => settle(keys, c, index, true, token(probe)).await?,
        HealthEvent::Released { index } => settle(keys, c, index, false, &core.token).await?,
    }
    Ok(())
}

async fn settle(
    keys: &HealthKeys,
    c: &mut MultiplexedConnection,
    index: usize,
    success: bool,
    token: &str,
) -> Result<(), redis::RedisError> {
    let Some(k) = keys.of(index) else {
        return Ok(());
    };
    keys.settle
        .key(k.fails)
        .key(k.open)
        .key(k.probe)
        .key(k.cool)
        .arg(u8::from(success))
        .arg(token)
        .invoke_async::<i64>(c)
        .await
        .map(drop)
}

/// The fleet's probe of target `index`, as Redis has it: `open`, a cooldown began that no probe
/// has closed yet; `over`, no shared cooldown runs. A target this replica saw open and now sees
/// closed was closed by another replica's probe; one open whose cooldown is over, here and in
/// Redis, and that a request wanted, gets this replica's bid for the lock.
async fn follow_probe(
    core: &HealthCore,
    keys: &HealthKeys,
    c: &mut MultiplexedConnection,
    index: usize,
    open: bool,
    over: bool,
) -> Result<(), redis::RedisError> {
    let (Some(fleet), Some(lock)) = (core.fleet.get(index), keys.probe.get(index)) else {
        return Ok(());
    };
    let was_open = fleet.open.swap(open, Ordering::AcqRel);
    if !open {
        if over && was_open && core.local.is_open(index) {
            core.local.close(index);
        }
        return Ok(());
    }
    if !over {
        return Ok(());
    }
    if !core.local.awaits_probe(index) || !fleet.wanted.swap(false, Ordering::AcqRel) {
        return Ok(());
    }
    let won: i64 = keys
        .bid
        .key(lock)
        .arg(&core.token)
        .arg(ttl_ms(core.probe_lock).max(1))
        .invoke_async(c)
        .await?;
    if won == 1 {
        // Taken by a request soon, or bid for again: the probe it starts has the rest of the
        // lock to finish in before another replica may probe.
        let until = Instant::now() + keys.grant;
        *fleet.granted.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
    }
    Ok(())
}

/// Extends the local cooldown of target `index` to at least `left_ms` from now.
fn apply(core: &HealthCore, index: usize, left_ms: u64) {
    if left_ms > 0 {
        core.local
            .extend_cooldown(index, Duration::from_millis(left_ms));
    }
}

/// A retry budget shared through Redis by every process that uses the same Redis and prefix
/// (cargo feature `redis`): tower's [`TpsBudget`] rule over the deposits and withdrawals of all of
/// them in the last `ttl`.
///
/// Each process decides locally from the totals it last read (every `refresh`) plus its own
/// activity since, so between two refreshes the replicas together may overspend by what each
/// saw as left. While Redis cannot be reached, a local [`TpsBudget`] with the same parameters
/// decides, and what it decides stays local: an outage's requests are not written to the shared
/// window afterwards.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_model_fallback::RedisBudget;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // Retries and fallbacks up to 20 % of all replicas' requests of the last 10 s, plus 1 a second.
/// let budget = RedisBudget::new("redis://127.0.0.1:6379/", "llm-gateway", Duration::from_secs(10), 1, 0.2)?;
/// # let _ = budget;
/// # Ok(())
/// # }
/// ```
pub struct RedisBudget {
    core: Arc<BudgetCore>,
}

struct BudgetCore {
    local: TpsBudget,
    reserve: f64,
    percent: f64,
    /// Not yet written to Redis.
    deposits: AtomicU64,
    withdrawals: AtomicU64,
    /// The window's totals when last read from Redis.
    shared_deposits: AtomicU64,
    shared_withdrawals: AtomicU64,
    /// Whether the shared totals are current (Redis answered at the last refresh).
    synced: AtomicBool,
    task: Mutex<Option<BudgetTask>>,
    started: AtomicBool,
}

struct BudgetTask {
    link: Link,
    ttl: Duration,
}

impl fmt::Debug for RedisBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBudget")
            .field("reserve", &self.core.reserve)
            .field("percent", &self.core.percent)
            .field("synced", &self.core.synced.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisBudget {
    /// Retries and fallbacks up to `percent` (0 to 1000, as a fraction: 0.2 is 20 %) of all
    /// replicas' requests of the last `ttl` (1 to 60 s), plus `min_per_sec` a second, with the
    /// totals kept in the Redis at `url` under `prefix`. Nothing connects yet.
    pub fn new(
        url: &str,
        prefix: &str,
        ttl: Duration,
        min_per_sec: u32,
        percent: f32,
    ) -> Result<Self, ConfigError> {
        let link = Link::new(url, prefix)?;
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            return Err(ConfigError::new("ttl", "must be between 1 and 60 seconds"));
        }
        if !(0.0..=1000.0).contains(&percent) {
            return Err(ConfigError::new("percent", "must be between 0 and 1000"));
        }
        if min_per_sec >= i32::MAX as u32 {
            return Err(ConfigError::new("min_per_sec", "is too large"));
        }
        Ok(RedisBudget {
            core: Arc::new(BudgetCore {
                local: TpsBudget::new(ttl, min_per_sec, percent),
                reserve: f64::from(min_per_sec) * ttl.as_secs_f64(),
                percent: f64::from(percent),
                deposits: AtomicU64::new(0),
                withdrawals: AtomicU64::new(0),
                shared_deposits: AtomicU64::new(0),
                shared_withdrawals: AtomicU64::new(0),
                synced: AtomicBool::new(false),
                task: Mutex::new(Some(BudgetTask { link, ttl })),
                started: AtomicBool::new(false),
            }),
        })
    }

    /// How often the totals are exchanged with Redis (default 200 ms).
    pub fn refresh(self, every: Duration) -> Result<Self, ConfigError> {
        self.with_link(|link| link.refresh(every))
    }

    /// TLS settings for a `rediss://` URL, as [`RedisHealth::tls`] (cargo feature `redis-tls`).
    #[cfg(feature = "redis-tls")]
    pub fn tls(self, tls: &RedisTls) -> Result<Self, ConfigError> {
        self.with_link(|link| link.tls(tls))
    }

    /// Changes the link before the task has started (after it, the change has no effect).
    fn with_link(
        self,
        change: impl FnOnce(&mut Link) -> Result<(), ConfigError>,
    ) -> Result<Self, ConfigError> {
        let mut slot = self.core.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = slot.as_mut() {
            change(&mut task.link)?;
        }
        drop(slot);
        Ok(self)
    }

    fn start(&self) {
        if self.core.started.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut slot = self.core.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = slot.take() {
            self.core.started.store(true, Ordering::Release);
            runtime.spawn(budget_task(Arc::downgrade(&self.core), task));
        }
    }
}

impl Budget for RedisBudget {
    fn deposit(&self) {
        self.start();
        self.core.local.deposit();
        self.core.deposits.fetch_add(1, Ordering::SeqCst);
    }

    fn withdraw(&self) -> bool {
        self.start();
        let core = &self.core;
        if !core.synced.load(Ordering::SeqCst) {
            // Redis is out of reach: the local budget decides, and it stays local.
            return core.local.withdraw();
        }
        // Read in the opposite order to the refresh's writes (see `budget_task`), so that a
        // refresh in between can only make deposits look fewer or withdrawals more.
        let deposits = core.shared_deposits.load(Ordering::SeqCst);
        let deposits = deposits + core.deposits.load(Ordering::SeqCst);
        let withdrawals = core.withdrawals.load(Ordering::SeqCst);
        let withdrawals = withdrawals + core.shared_withdrawals.load(Ordering::SeqCst);
        // u64 counts of requests in a window of at most 60 s are exact in an f64.
        #[allow(clippy::cast_precision_loss)]
        let left = core.reserve + core.percent * deposits as f64 - withdrawals as f64;
        if left >= 1.0 {
            core.withdrawals.fetch_add(1, Ordering::SeqCst);
            // Keep the local budget near the shared one, for an outage.
            let _ = core.local.withdraw();
            true
        } else {
            false
        }
    }
}

/// Redis cannot be reached: the local budget decides until it can, and what happens meanwhile
/// stays local. Flushed later into one slot, an outage's counts would distort the shared window
/// for a whole `ttl` (refusing every retry just as the upstream recovers, or granting a burst).
fn discard_unsent(core: &BudgetCore) {
    core.synced.store(false, Ordering::SeqCst);
    core.deposits.store(0, Ordering::SeqCst);
    core.withdrawals.store(0, Ordering::SeqCst);
}

async fn budget_task(core: Weak<BudgetCore>, task: BudgetTask) {
    const SLOTS: u64 = 10;
    let BudgetTask { link, ttl } = task;
    let slot_ms = (ttl_ms(ttl) / SLOTS).max(1);
    let key = format!("{}:budget", link.prefix);
    let script = Script::new(BUDGET_SCRIPT);
    let mut conn = Connection::new(link.clone(), "retry budget");
    let mut tick = tokio::time::interval(link.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else {
            return;
        };
        let mut fresh = false;
        let Some(c) = conn.get(&mut fresh).await else {
            discard_unsent(&core);
            continue;
        };
        let deposits = core.deposits.load(Ordering::SeqCst);
        let withdrawals = core.withdrawals.load(Ordering::SeqCst);
        let result: redis::RedisResult<(u64, u64)> = script
            .key(&key)
            .arg(slot_ms)
            .arg(SLOTS)
            .arg(deposits)
            .arg(withdrawals)
            .invoke_async(c)
            .await;
        match result {
            Ok((d, w)) => {
                // The totals now include what was sent. `withdraw` reads shared deposits before
                // local ones and local withdrawals before shared ones, so with these writes in
                // this order a refresh in between can only make it refuse, never overspend.
                core.deposits.fetch_sub(deposits, Ordering::SeqCst);
                core.shared_deposits.store(d, Ordering::SeqCst);
                core.shared_withdrawals.store(w, Ordering::SeqCst);
                core.withdrawals.fetch_sub(withdrawals, Ordering::SeqCst);
                core.synced.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                discard_unsent(&core);
                conn.failed(&e);
            }
        }
    }
}
