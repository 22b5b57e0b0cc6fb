//! The API key credentials a proxy checks requests against: for each key revision, only the
//! SHA-256 digest of the key, with what every ApiKeyBinding that lists it grants.
//!
//! Kept as the controller sends them, in 256 shards by the digest's first byte. An update
//! replaces the shards that changed and shares the rest, so a change to one key rebuilds one
//! shard (a few hundred entries of a hundred thousand), and the routing table is untouched.
//! A lookup hashes the presented key and probes one shard's map: no allocation, and the work
//! does not depend on the key's content beyond its length (the map compares digests, which
//! tell an attacker nothing about keys that would match).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_queue::SegQueue;
use http::Method;
use kanali_proto::v1 as pb;
use regex::Regex;
use sha2::{Digest as _, Sha256};

use super::rate_limit::{Limiter, LimiterId, Rate, RateLimits, Unit};

/// Number of shards, one per first byte of a digest.
pub const SHARDS: usize = 256;

/// Which methods a rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// None (an absent default rule, or `global: false`).
    Deny,
    /// Every method.
    All,
    /// These (uppercase) methods.
    Methods(Box<[Method]>),
}

impl Rule {
    fn from_pb(rule: Option<&pb::Rule>) -> Rule {
        match rule {
            None => Rule::Deny,
            Some(r) if r.all => Rule::All,
            Some(r) if r.methods.is_empty() => Rule::Deny,
            Some(r) => Rule::Methods(
                r.methods
                    .iter()
                    .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                    .collect(),
            ),
        }
    }

    /// Whether `method` is allowed (method names compared ignoring case, as v2 did).
    pub fn allows(&self, method: &Method) -> bool {
        match self {
            Rule::Deny => false,
            Rule::All => true,
            Rule::Methods(methods) => methods
                .iter()
                .any(|m| m.as_str().eq_ignore_ascii_case(method.as_str())),
        }
    }
}

/// What one ApiKeyBinding grants one key.
#[derive(Debug)]
pub struct Grant {
    /// The binding's namespace.
    pub namespace: Arc<str>,
    /// The binding's name.
    pub binding: Arc<str>,
    /// Tried in order on the upstream path; the first match decides.
    pub subpaths: Box<[(Arc<Regex>, Rule)]>,
    /// When no subpath matches.
    pub default_rule: Rule,
    /// The limit shared by every revision of the key under this binding, on every proxy.
    pub limiter: Option<Arc<Limiter>>,
}

impl Grant {
    /// The rule for an upstream path: the first subpath whose pattern matches its start,
    /// else the default rule.
    pub fn rule_for(&self, upstream_path: &str) -> &Rule {
        self.subpaths
            .iter()
            .find(|(re, _)| re.is_match(upstream_path))
            .map_or(&self.default_rule, |(_, rule)| rule)
    }
}

/// When a key revision was last presented, for the controller (which shows it as the
/// revision's `lastUsed`).
#[derive(Debug)]
pub struct UsageCell {
    /// The ApiKey.
    pub key: Arc<str>,
    /// The revision id.
    pub revision: u64,
    last: AtomicU64,
    queued: AtomicBool,
}

/// Revisions used since the last report, each once.
#[derive(Debug, Default)]
pub struct UsageLog {
    queue: SegQueue<Arc<UsageCell>>,
}

impl UsageLog {
    /// Records a use of `cell` at `now` (seconds since the epoch): a store, plus a push the
    /// first time since the last report.
    pub fn record(&self, cell: &Arc<UsageCell>, now: u64) {
        cell.last.store(now, Ordering::Relaxed);
        if !cell.queued.swap(true, Ordering::AcqRel) {
            self.queue.push(cell.clone());
        }
    }

    /// Everything used since the last call, as a report (`None` when nothing was).
    pub fn drain(&self) -> Option<pb::Usage> {
        let mut keys = Vec::new();
        while let Some(cell) = self.queue.pop() {
            cell.queued.store(false, Ordering::Release);
            keys.push(pb::KeyUsage {
                key: cell.key.to_string(),
                revision: cell.revision,
                last_used_unix: cell.last.load(Ordering::Relaxed),
            });
        }
        (!keys.is_empty()).then_some(pb::Usage { keys })
    }
}

/// One revision of one key.
#[derive(Debug)]
pub struct Credential {
    /// The ApiKey's name.
    pub key: Arc<str>,
    /// Whether it authenticates (an Inactive one is recognised, reported, and refused).
    pub active: bool,
    /// Per binding, sorted by (namespace, binding).
    pub grants: Box<[Grant]>,
    /// Its last use.
    pub usage: Arc<UsageCell>,
}

impl Credential {
    /// The grant of binding `namespace/binding`, if it lists this key.
    pub fn grant(&self, namespace: &str, binding: &str) -> Option<&Grant> {
        self.grants
            .iter()
            .find(|g| &*g.binding == binding && &*g.namespace == namespace)
    }
}

/// One shard.
#[derive(Debug, Default)]
pub struct Shard {
    version: String,
    by_digest: HashMap<[u8; 32], Credential>,
}

/// Every credential of one configuration.
#[derive(Debug)]
pub struct Credentials {
    shards: Box<[Arc<Shard>]>,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            shards: (0..SHARDS).map(|_| Arc::new(Shard::default())).collect(),
        }
    }
}

/// What a new shard's entries refer to across shards and configurations: compiled patterns
/// (one per distinct pattern) and rate limiters (one per binding and key, kept by the registry
/// so counts survive updates).
pub struct Builder<'a> {
    limits: &'a RateLimits,
    patterns: HashMap<String, Arc<Regex>>,
}

impl<'a> Builder<'a> {
    /// A builder drawing limiters from `limits`.
    pub fn new(limits: &'a RateLimits) -> Self {
        Builder {
            limits,
            patterns: HashMap::new(),
        }
    }

    fn pattern(&mut self, pattern: &str) -> Result<Arc<Regex>, String> {
        if let Some(re) = self.patterns.get(pattern) {
            return Ok(re.clone());
        }
        // Anchored at the start only; the group keeps an alternation anchored as a whole.
        let re = Regex::new(&format!("^(?:{pattern})"))
            .map(Arc::new)
            .map_err(|e| format!("subpath {pattern:?} is not a valid regular expression: {e}"))?;
        self.patterns.insert(pattern.to_owned(), re.clone());
        Ok(re)
    }

    fn shard(&mut self, shard: &pb::CredentialShard) -> Result<Shard, String> {
        let mut by_digest = HashMap::with_capacity(shard.entries.len());
        for entry in &shard.entries {
            let digest: [u8; 32] = entry
                .digest
                .as_slice()
                .try_into()
                .map_err(|_| format!("a digest of key {} is not 32 bytes", entry.key))?;
            if usize::from(digest[0]) != shard.index as usize {
                return Err(format!(
                    "a digest of key {} is in shard {} instead of {}",
                    entry.key, shard.index, digest[0]
                ));
            }
            let key: Arc<str> = Arc::from(entry.key.as_str());
            let mut grants = Vec::with_capacity(entry.grants.len());
            for g in &entry.grants {
                let subpaths = g
                    .subpaths
                    .iter()
                    .map(|s| Ok((self.pattern(&s.pattern)?, Rule::from_pb(s.rule.as_ref()))))
                    .collect::<Result<Box<[_]>, String>>()?;
                let namespace: Arc<str> = Arc::from(g.namespace.as_str());
                let binding: Arc<str> = Arc::from(g.binding.as_str());
                let limiter = match &g.rate {
                    None => None,
                    Some(rate) => {
                        let unit = match pb::RateUnit::try_from(rate.unit) {
                            Ok(pb::RateUnit::Second) => Unit::Second,
                            Ok(pb::RateUnit::Minute) => Unit::Minute,
                            Ok(pb::RateUnit::Hour) => Unit::Hour,
                            _ => {
                                return Err(format!(
                                    "key {}: unknown rate unit {}",
                                    entry.key, rate.unit
                                ));
                            }
                        };
                        let id = LimiterId {
                            namespace: namespace.clone(),
                            binding: binding.clone(),
                            key: key.clone(),
                        };
                        Some(self.limits.limiter(
                            id,
                            Rate {
                                amount: rate.amount.max(1),
                                unit,
                            },
                        ))
                    }
                };
                grants.push(Grant {
                    namespace,
                    binding,
                    subpaths,
                    default_rule: Rule::from_pb(g.default_rule.as_ref()),
                    limiter,
                });
            }
            let credential = Credential {
                usage: Arc::new(UsageCell {
                    key: key.clone(),
                    revision: entry.revision,
                    last: AtomicU64::new(0),
                    queued: AtomicBool::new(false),
                }),
                key,
                active: entry.active,
                grants: grants.into_boxed_slice(),
            };
            if by_digest.insert(digest, credential).is_some() {
                return Err(format!("shard {} lists a digest twice", shard.index));
            }
        }
        Ok(Shard {
            version: shard.version.clone(),
            by_digest,
        })
    }
}

impl Credentials {
    /// The credentials after replacing the shards in `update` (the others are shared with
    /// `self`), or why they cannot be used.
    pub fn update(
        &self,
        update: &[pb::CredentialShard],
        limits: &RateLimits,
    ) -> Result<Credentials, String> {
        let mut shards = self.shards.clone();
        let mut builder = Builder::new(limits);
        for shard in update {
            let index = shard.index as usize;
            let Some(slot) = shards.get_mut(index) else {
                return Err(format!("shard index {index} is out of range"));
            };
            *slot = Arc::new(builder.shard(shard)?);
        }
        Ok(Credentials { shards })
    }

    /// Each shard's version, by index (what this proxy says it holds when it subscribes).
    pub fn versions(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.version.clone()).collect()
    }

    /// The version of the whole set, as the controller computes it.
    pub fn version(&self) -> String {
        kanali_proto::version::credentials_version(self.shards.iter().map(|s| s.version.as_str()))
    }

    /// The credential of the presented key, if any.
    pub fn lookup(&self, presented: &[u8]) -> Option<&Credential> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        self.shards
            .get(usize::from(digest[0]))
            .and_then(|shard| shard.by_digest.get(&digest))
    }

    /// How many revisions are known.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.by_digest.len()).sum()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
