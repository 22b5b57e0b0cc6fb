//! ApiKeys and ApiKeyBindings: validation, and the credentials the proxies check keys against.
//!
//! Proxies never see a key: each revision becomes the SHA-256 digest of its plaintext (decrypted
//! by the controller before compile, see [`crate::keys`]), with the grants of every valid
//! ApiKeyBinding that lists the key. The credentials are split into 256 shards by the first byte
//! of the digest, each with a content version, so one changed key resends one or two shards of
//! a hundred thousand keys, never all of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use base64::Engine as _;
use kanali_crds::{ApiKey, ApiKeyBinding, RateUnit, RevisionStatus, Rule};
use kanali_proto::v1 as pb;
use kube::ResourceExt as _;
use prost::Message as _;
use sha2::{Digest as _, Sha256};

use super::diagnostics::{Condition, Diagnostic, Kind, condition};
use super::{Objects, accepted, namespace_of, object_ref};
use kanali_proto::version::hex;

/// Number of credential shards: one per first byte of a key digest.
pub const SHARDS: usize = 256;

/// The hasher of the maps a compile fills per key: SipHash over 100 000 long ciphertexts was
/// a tenth of a recompile. foldhash is seeded per map, and the keys come from the cluster's
/// operators, not from the network.
pub type FastHash = foldhash::fast::RandomState;

/// Revision data (the ciphertext, trimmed) to its decryption.
pub type DigestMap = HashMap<Arc<str>, Decryption, FastHash>;

/// What compile knows of the revisions' plaintexts, filled in by [`crate::keys::KeyVault`].
#[derive(Clone, Debug, Default)]
pub struct Decrypted {
    /// Why no revision can be decrypted, when that is so (no key configured, or it is
    /// unusable); `None`: the controller holds a key.
    pub no_key: Option<String>,
    /// Per revision `data` (trimmed): what decrypting it gave.
    pub digests: DigestMap,
}

/// One revision, decrypted (or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decryption {
    /// Its [`revision_id`], computed once with the decryption.
    pub revision: u64,
    /// The SHA-256 digest of its plaintext, or why it could not be decrypted.
    pub digest: Result<[u8; 32], String>,
}

impl Decryption {
    /// The decryption of `data` that gave `digest`.
    pub fn new(data: &str, digest: Result<[u8; 32], String>) -> Decryption {
        Decryption {
            revision: revision_id(data),
            digest,
        }
    }
}

/// The identity of a revision: the first 8 bytes of SHA-256 of its `data`. It survives
/// reordering of the revisions, and names one without revealing anything.
pub fn revision_id(data: &str) -> u64 {
    let digest = Sha256::digest(data.trim().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Problems with an ApiKey's spec. `found` is what decrypting each revision gave, by index:
/// a revision that decrypted needs no more checking of its form.
pub fn validate_api_key(key: &ApiKey, found: &[Option<&Decryption>]) -> Vec<String> {
    let mut errors = Vec::new();
    if key.spec.revisions.is_empty() {
        errors.push("spec.revisions must list at least one revision".to_owned());
    }
    let mut seen = BTreeMap::new();
    for (i, rev) in key.spec.revisions.iter().enumerate() {
        let decrypted_ok = found
            .get(i)
            .copied()
            .flatten()
            .is_some_and(|d| d.digest.is_ok());
        if rev.data.is_empty() {
            errors.push(format!("spec.revisions[{i}].data must not be empty"));
        } else if !decrypted_ok
            && base64::engine::general_purpose::STANDARD
                .decode(rev.data.trim())
                .is_err()
        {
            errors.push(format!(
                "spec.revisions[{i}].data is not base64 (expected the output of kanalictl apikey generate)"
            ));
        } else if let Some(first) = seen.insert(rev.data.trim(), i) {
            errors.push(format!(
                "spec.revisions[{i}] repeats spec.revisions[{first}]"
            ));
        }
    }
    errors
}

/// Problems with an ApiKeyBinding's spec.
pub fn validate_binding(binding: &ApiKeyBinding) -> Vec<String> {
    let mut errors = Vec::new();
    if binding.spec.keys.is_empty() {
        errors.push("spec.keys must list at least one key".to_owned());
    }
    let mut seen = BTreeSet::new();
    for (i, key) in binding.spec.keys.iter().enumerate() {
        if key.name.is_empty() {
            errors.push(format!("spec.keys[{i}].name must not be empty"));
        } else if !seen.insert(key.name.as_str()) {
            errors.push(format!(
                "spec.keys[{i}]: key {:?} is listed more than once",
                key.name
            ));
        }
        if let Some(rule) = &key.default_rule {
            check_rule(rule, || format!("spec.keys[{i}].defaultRule"), &mut errors);
        }
        for (j, sub) in key.subpaths.iter().enumerate() {
            let at = || format!("spec.keys[{i}].subpaths[{j}]");
            if !sub.path.starts_with('/') {
                errors.push(format!("{}.path {:?} must start with '/'", at(), sub.path));
            }
            if let Some(e) = pattern_error(&sub.path) {
                errors.push(format!(
                    "{}.path {:?} is not a valid regular expression: {e}",
                    at(),
                    sub.path
                ));
            }
            check_rule(&sub.rule, || format!("{}.rule", at()), &mut errors);
        }
        if let Some(rate) = &key.rate
            && rate.amount < 1
        {
            errors.push(format!("spec.keys[{i}].rate.amount must be at least 1"));
        }
    }
    errors
}

/// Why a subpath pattern is not a valid regular expression, anchored as the proxies anchor
/// it; `None` when it is. Remembered across compiles: a pattern is compiled once, not once
/// per compile (bindings with many keys repeat the same few patterns).
fn pattern_error(pattern: &str) -> Option<String> {
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashMap<String, Option<String>>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Mutex::default);
    if let Some(known) = seen.lock().unwrap_or_else(|p| p.into_inner()).get(pattern) {
        return known.clone();
    }
    let error = regex::Regex::new(&format!("^(?:{pattern})"))
        .err()
        .map(|e| e.to_string());
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    // Bounded: edits that keep changing patterns must not grow it forever.
    if seen.len() >= 100_000 {
        seen.clear();
    }
    seen.insert(pattern.to_owned(), error.clone());
    error
}

/// `at` names the rule in messages; it is only built for one.
fn check_rule(rule: &Rule, at: impl Fn() -> String, errors: &mut Vec<String>) {
    match (&rule.global, &rule.granular) {
        (Some(_), Some(_)) => errors.push(format!(
            "{} must set either global or granular, not both",
            at()
        )),
        (None, None) => errors.push(format!("{} must set global or granular", at())),
        (None, Some(g)) => {
            for verb in &g.verbs {
                if http::Method::from_bytes(verb.to_ascii_uppercase().as_bytes()).is_err() {
                    errors.push(format!(
                        "{}.granular.verbs: {verb:?} is not an HTTP method",
                        at()
                    ));
                }
            }
        }
        (Some(_), None) => {}
    }
}

fn rule(rule: &Rule) -> pb::Rule {
    match (&rule.global, &rule.granular) {
        (Some(all), _) => pb::Rule {
            all: *all,
            methods: Vec::new(),
        },
        (None, Some(g)) => {
            let methods: BTreeSet<String> =
                g.verbs.iter().map(|v| v.to_ascii_uppercase()).collect();
            pb::Rule {
                all: false,
                methods: methods.into_iter().collect(),
            }
        }
        (None, None) => pb::Rule::default(),
    }
}

/// The credentials of one compile and what each ApiKey and ApiKeyBinding gets as status.
#[derive(Clone)]
pub struct CompiledKeys {
    /// The 256 shards, by index, versions filled in. Shared: a compile that changed no key
    /// reuses them, and with 100 000 keys copying them would cost as much as making them.
    pub shards: Arc<Vec<pb::CredentialShard>>,
    /// Hash of the shard versions in index order.
    pub version: String,
    /// One per ApiKey and ApiKeyBinding.
    pub diagnostics: Vec<Diagnostic>,
    /// (namespace, name) of every ApiKeyBinding, and whether it is valid.
    pub bindings: HashMap<(String, String), bool>,
}

/// Compiles the ApiKeys and ApiKeyBindings into credential shards and diagnostics.
pub fn compile_keys(objects: &Objects) -> CompiledKeys {
    let mut diagnostics = Vec::new();

    // Grants per key name, from every valid binding.
    let mut grants: HashMap<&str, Vec<pb::Grant>, FastHash> = HashMap::default();
    let mut bindings = HashMap::new();
    let key_names: std::collections::HashSet<&str> = objects
        .api_keys
        .iter()
        .filter_map(|k| k.metadata.name.as_deref())
        .collect();
    let mut listed_by: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    for binding in &objects.api_key_bindings {
        let namespace = namespace_of(binding);
        let name = binding.name_any();
        let (ns_ref, name_ref) = (
            binding.metadata.namespace.as_deref().unwrap_or("default"),
            binding.metadata.name.as_deref().unwrap_or_default(),
        );
        let errors = validate_binding(binding);
        let valid = errors.is_empty();
        bindings.insert((namespace.clone(), name.clone()), valid);
        let missing: Vec<&str> = binding
            .spec
            .keys
            .iter()
            .map(|k| k.name.as_str())
            .filter(|n| !key_names.contains(n))
            .collect();
        let refs = if missing.is_empty() {
            Condition::ok(
                condition::RESOLVED_REFS,
                "ResolvedRefs",
                "every listed ApiKey exists",
            )
        } else {
            Condition::failed(
                condition::RESOLVED_REFS,
                "ApiKeyNotFound",
                format!(
                    "ApiKey {} does not exist; requests with it get error 13",
                    missing.join(", ")
                ),
            )
        };
        diagnostics.push(Diagnostic {
            object: object_ref(Kind::ApiKeyBinding, binding),
            generation: binding.metadata.generation,
            conditions: vec![accepted(errors, "ApiKeyBinding"), refs],
            backend: None,
        });
        if !valid {
            continue;
        }
        for key in &binding.spec.keys {
            listed_by
                .entry(key.name.as_str())
                .or_default()
                .push((ns_ref, name_ref));
            grants
                .entry(key.name.as_str())
                .or_default()
                .push(pb::Grant {
                    namespace: namespace.clone(),
                    binding: name.clone(),
                    default_rule: key.default_rule.as_ref().map(rule),
                    subpaths: key
                        .subpaths
                        .iter()
                        .map(|s| pb::SubpathRule {
                            pattern: s.path.clone(),
                            rule: Some(rule(&s.rule)),
                        })
                        .collect(),
                    rate: key.rate.as_ref().map(|r| pb::RateLimit {
                        amount: u64::try_from(r.amount).unwrap_or(1),
                        unit: match r.unit {
                            RateUnit::Second => pb::RateUnit::Second,
                            RateUnit::Minute => pb::RateUnit::Minute,
                            RateUnit::Hour => pb::RateUnit::Hour,
                        } as i32,
                    }),
                });
        }
    }
    for list in grants.values_mut() {
        list.sort_by(|a, b| (&a.namespace, &a.binding).cmp(&(&b.namespace, &b.binding)));
    }

    // Older keys first: when two ApiKeys hold the same plaintext, the older one keeps it.
    let mut keys: Vec<&ApiKey> = objects.api_keys.iter().collect();
    keys.sort_by(|a, b| super::age_order(&a.metadata).cmp(&super::age_order(&b.metadata)));
    let decrypted = &objects.decrypted;
    let mut owner: HashMap<[u8; 32], (String, usize), FastHash> = HashMap::default();
    let mut shards: Vec<Vec<pb::Credential>> = vec![Vec::new(); SHARDS];
    for key in keys {
        let name = key.name_any();
        // One lookup per revision: the data is long, and hashing it is most of the cost.
        let found: Vec<Option<&Decryption>> = key
            .spec
            .revisions
            .iter()
            .map(|r| decrypted.digests.get(r.data.trim()))
            .collect();
        let errors = validate_api_key(key, &found);
        let object = object_ref(Kind::ApiKey, key);
        let generation = key.metadata.generation;
        if !errors.is_empty() {
            diagnostics.push(Diagnostic {
                object,
                generation,
                conditions: vec![accepted(errors, "ApiKey")],
                backend: None,
            });
            continue;
        }
        if let Some(why) = &decrypted.no_key {
            diagnostics.push(Diagnostic {
                object,
                generation,
                conditions: vec![Condition::failed(
                    condition::ACCEPTED,
                    "NoDecryptionKey",
                    format!("{why}; requests with this key get error 13"),
                )],
                backend: None,
            });
            continue;
        }
        let mut failed = Vec::new();
        let mut duplicates = Vec::new();
        let mut usable = 0;
        let mut active = 0;
        for (i, rev) in key.spec.revisions.iter().enumerate() {
            let (digest, revision) = match found.get(i).copied().flatten() {
                Some(Decryption {
                    digest: Ok(digest),
                    revision,
                }) => (*digest, *revision),
                Some(Decryption { digest: Err(e), .. }) => {
                    failed.push(format!("spec.revisions[{i}]: {e}"));
                    continue;
                }
                None => {
                    failed.push(format!("spec.revisions[{i}] has not been decrypted"));
                    continue;
                }
            };
            match owner.get(&digest) {
                Some((other, j)) => {
                    duplicates.push(format!(
                        "spec.revisions[{i}] holds the same key as ApiKey {other} spec.revisions[{j}], which is older and keeps it"
                    ));
                    continue;
                }
                None => {
                    owner.insert(digest, (name.clone(), i));
                }
            }
            let is_active = rev.status == RevisionStatus::Active;
            usable += 1;
            active += usize::from(is_active);
            shards[usize::from(digest[0])].push(pb::Credential {
                digest: digest.to_vec(),
                key: name.clone(),
                revision,
                active: is_active,
                grants: grants.get(name.as_str()).cloned().unwrap_or_default(),
            });
        }
        let accepted = if !failed.is_empty() {
            Condition::failed(
                condition::ACCEPTED,
                "DecryptionFailed",
                format!(
                    "{}; requests with those revisions get error 13, the other revisions keep working",
                    failed.join("; ")
                ),
            )
        } else if !duplicates.is_empty() {
            Condition::failed(
                condition::ACCEPTED,
                "DuplicateKey",
                format!(
                    "{}; requests with it authenticate as that ApiKey",
                    duplicates.join("; ")
                ),
            )
        } else {
            Condition::ok(
                condition::ACCEPTED,
                "Accepted",
                format!("{usable} revision(s), {active} active"),
            )
        };
        let refs = match listed_by.get_mut(name.as_str()) {
            Some(by) => Condition::ok(
                condition::RESOLVED_REFS,
                "ResolvedRefs",
                format!("granted by ApiKeyBinding {}", {
                    by.sort_unstable();
                    by.iter()
                        .map(|(ns, n)| format!("{ns}/{n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }),
            ),
            None => Condition::ok(
                condition::RESOLVED_REFS,
                "ResolvedRefs",
                "no valid ApiKeyBinding lists this key yet",
            ),
        };
        diagnostics.push(Diagnostic {
            object,
            generation,
            conditions: vec![accepted, refs],
            backend: None,
        });
    }

    let shards: Vec<pb::CredentialShard> = shards
        .into_iter()
        .enumerate()
        .map(|(index, mut entries)| {
            entries.sort_by(|a, b| a.digest.cmp(&b.digest));
            let mut shard = pb::CredentialShard {
                index: u32::try_from(index).unwrap_or(0),
                version: String::new(),
                entries,
            };
            shard.version = hex(&Sha256::digest(shard.encode_to_vec()));
            shard
        })
        .collect();
    CompiledKeys {
        version: credentials_version(&shards),
        shards: Arc::new(shards),
        diagnostics,
        bindings,
    }
}

/// The version of a whole set of shards (the proxy computes it the same way).
pub fn credentials_version(shards: &[pb::CredentialShard]) -> String {
    kanali_proto::version::credentials_version(shards.iter().map(|s| s.version.as_str()))
}
