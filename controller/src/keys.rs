//! The controller's RSA private key and the digests of the ApiKey revisions it decrypts.
//!
//! Decryption is the one expensive step between the sources and compile (about 3 ms per
//! 2048-bit revision with a constant-time RSA), so it happens here, once per revision `data`,
//! and the result — only the SHA-256 digest of the plaintext; the plaintext itself is wiped
//! at once — is cached by that `data`: a changed ApiKey decrypts only its new revisions, and
//! compile stays pure. A replaced private key (a new file or Secret) starts over, since every
//! revision may decrypt differently now. Work that is new is spread over the cores.

use std::path::PathBuf;
use std::sync::Arc;

use kanali_crds::ApiKey;
use sha2::{Digest as _, Sha256};

use crate::compile::api_key::{Decrypted, Decryption, DigestMap};
use crate::crypto::PrivateKey;

/// Where the private key comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum KeySource {
    /// None configured: ApiKeys are not usable, and say so.
    #[default]
    None,
    /// A PEM file, re-read when it changes (a mounted Secret is updated in place).
    File(PathBuf),
    /// Data key `key.pem` of a Secret, watched (cluster mode).
    Secret {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::None => write!(f, "no decryption key"),
            KeySource::File(path) => write!(f, "file {}", path.display()),
            KeySource::Secret { namespace, name } => write!(f, "Secret {namespace}/{name}"),
        }
    }
}

/// The data key of the Secret that holds the private key (as `kanalictl keypair generate`
/// writes it).
pub const SECRET_KEY: &str = "key.pem";

/// The private key (or why there is none) and the digests decrypted with it.
pub struct KeyVault {
    source: KeySource,
    key: Result<Arc<PrivateKey>, String>,
    /// What compile gets: shared as it is as long as no revision comes or goes, so a
    /// recompile costs no copy of a hundred thousand digests.
    current: Arc<Decrypted>,
    /// The (name, generation) fingerprint of the ApiKeys `current` was made from, when every
    /// one had a generation (from the API server): equal next time means nothing to look at.
    seen: Option<u64>,
    /// How many revisions this vault decrypted (for logs and tests).
    decrypted: u64,
}

impl std::fmt::Debug for KeyVault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVault")
            .field("source", &self.source)
            .field("key", &self.key.as_ref().map(|k| k.fingerprint()))
            .field("cached", &self.current.digests.len())
            .finish()
    }
}

impl KeyVault {
    /// A vault for `source` that holds no key yet.
    pub fn new(source: KeySource) -> KeyVault {
        let key = Err(match &source {
            KeySource::None => "the controller has no decryption key (start it with --decryption-key-file or --decryption-key-secret)".to_owned(),
            other => format!("the decryption key ({other}) has not been read yet"),
        });
        KeyVault {
            source,
            key,
            current: Arc::default(),
            seen: None,
            decrypted: 0,
        }
    }

    /// Where the key comes from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Takes a new private key, in PEM, or the reason it is not there (the file or Secret is
    /// missing). Returns whether anything changed; a different key forgets every digest.
    pub fn set_key(&mut self, pem: Result<&[u8], String>) -> bool {
        let source = self.source.to_string();
        let key = pem.and_then(|pem| {
            PrivateKey::from_pem(pem)
                .map(Arc::new)
                .map_err(|e| format!("the decryption key ({source}) is unusable: {e}"))
        });
        let same = match (&self.key, &key) {
            (Ok(a), Ok(b)) => a.fingerprint() == b.fingerprint(),
            (Err(a), Err(b)) => a == b,
            _ => false,
        };
        if same {
            return false;
        }
        match &key {
            Ok(k) => {
                tracing::info!(%source, fingerprint = %k.fingerprint(), bits = k.bits(), "decryption key loaded")
            }
            Err(error) => tracing::error!(%error, "no usable decryption key"),
        }
        self.key = key;
        self.current = Arc::default();
        self.seen = None;
        true
    }

    /// The digests of every revision of `keys`, decrypting those not seen before (on all
    /// cores) and forgetting those no longer there.
    pub fn decrypt(&mut self, keys: &[ApiKey]) -> Arc<Decrypted> {
        let key = match &self.key {
            Ok(key) => key.clone(),
            Err(why) => {
                return Arc::new(Decrypted {
                    no_key: Some(why.clone()),
                    digests: DigestMap::default(),
                });
            }
        };
        // A generation changes with every spec edit: hashing names and generations is much
        // cheaper than hashing every revision's data.
        let fingerprint = generations(keys);
        if fingerprint.is_some() && fingerprint == self.seen {
            return self.current.clone();
        }
        let mut live = 0usize;
        let mut new: Vec<&str> = Vec::new();
        let mut seen_new = std::collections::HashSet::new();
        for data in keys
            .iter()
            .flat_map(|k| k.spec.revisions.iter().map(|r| r.data.trim()))
            .filter(|d| !d.is_empty())
        {
            if self.current.digests.contains_key(data) {
                live += 1;
            } else if seen_new.insert(data) {
                new.push(data);
            }
        }
        // `live` counts repeats too: only the exact count proves nothing went away.
        if new.is_empty() && live == self.current.digests.len() {
            self.seen = fingerprint;
            return self.current.clone();
        }
        let mut digests = self.current.digests.clone();
        if !new.is_empty() {
            let started = std::time::Instant::now();
            let results = decrypt_all(&key, &new);
            self.decrypted += results.len() as u64;
            tracing::info!(revisions = results.len(), elapsed = ?started.elapsed(), "decrypted ApiKey revisions");
            digests.extend(results);
        }
        if live + new.len() != digests.len() {
            let present: std::collections::HashSet<&str> = keys
                .iter()
                .flat_map(|k| k.spec.revisions.iter().map(|r| r.data.trim()))
                .collect();
            digests.retain(|data, _| present.contains(&**data));
        }
        self.current = Arc::new(Decrypted {
            no_key: None,
            digests,
        });
        self.seen = fingerprint;
        self.current.clone()
    }

    /// How many revisions were decrypted so far (not counting cache hits).
    pub fn decrypted(&self) -> u64 {
        self.decrypted
    }
}

/// The vault, shared by the compile loop and the task that keeps its key current.
pub type SharedVault = Arc<std::sync::Mutex<KeyVault>>;

/// Locks the vault (poisoning ignored: a panic mid-decrypt leaves a usable cache).
pub fn lock(vault: &SharedVault) -> std::sync::MutexGuard<'_, KeyVault> {
    vault.lock().unwrap_or_else(|p| p.into_inner())
}

/// The digests for `keys`, decrypting new revisions on blocking threads (at start-up with many
/// thousands of keys that takes a while, and must not stall the runtime).
pub async fn decrypt(vault: &SharedVault, keys: Vec<ApiKey>) -> Arc<Decrypted> {
    let vault = vault.clone();
    tokio::task::spawn_blocking(move || lock(&vault).decrypt(&keys))
        .await
        .unwrap_or_else(|e| {
            Arc::new(Decrypted {
                no_key: Some(format!("decryption failed: {e}")),
                digests: DigestMap::default(),
            })
        })
}

/// Keeps the vault's key equal to the file's content, checking every `interval` (a mounted
/// Secret is replaced in place, without an event a reader could rely on); `on_change` runs
/// when the key changed. Runs until `shutdown` turns true.
pub async fn watch_file(
    path: PathBuf,
    vault: SharedVault,
    interval: std::time::Duration,
    on_change: impl Fn() + Send,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut last: Option<Result<Vec<u8>, String>> = None;
    loop {
        let now = tokio::fs::read(&path).await.map_err(|e| {
            format!(
                "cannot read the decryption key file {}: {e}",
                path.display()
            )
        });
        if last.as_ref() != Some(&now) {
            let changed =
                lock(&vault).set_key(now.as_ref().map(Vec::as_slice).map_err(Clone::clone));
            last = Some(now);
            if changed {
                on_change();
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// The private key in a Secret's data: `key.pem`, else its only entry.
pub fn key_from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Result<Vec<u8>, String> {
    let name = format!(
        "Secret {}/{}",
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.metadata.name.as_deref().unwrap_or_default()
    );
    let data = secret.data.as_ref();
    match data.and_then(|d| d.get(SECRET_KEY)) {
        Some(v) => Ok(v.0.clone()),
        None => match data.map(|d| d.values().collect::<Vec<_>>()).as_deref() {
            Some([only]) => Ok(only.0.clone()),
            _ => Err(format!("{name} has no data key {SECRET_KEY}")),
        },
    }
}

/// Keeps the vault's key equal to data key `key.pem` of Secret `namespace/name`, watching it;
/// `on_change` runs when the key changed. Runs until `shutdown` turns true.
pub async fn watch_secret(
    client: kube::Client,
    namespace: String,
    name: String,
    vault: SharedVault,
    on_change: impl Fn() + Send,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use futures_util::StreamExt as _;
    use k8s_openapi::api::core::v1::Secret;
    use kube::runtime::watcher::{self, Event};
    let api: kube::Api<Secret> = kube::Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, config).boxed();
    let missing = || {
        Err(format!(
            "Secret {namespace}/{name} (the decryption key) does not exist"
        ))
    };
    let mut pending: Option<Result<Vec<u8>, String>> = None;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let key = match event {
            None => return,
            Some(Err(error)) => {
                tracing::warn!(%error, secret = %format!("{namespace}/{name}"), "watching the decryption key Secret");
                continue;
            }
            Some(Ok(Event::Apply(s) | Event::InitApply(s))) => {
                if pending.is_some() {
                    pending = Some(key_from_secret(&s));
                    continue;
                }
                key_from_secret(&s)
            }
            Some(Ok(Event::Delete(_))) => missing(),
            Some(Ok(Event::Init)) => {
                pending = Some(missing());
                continue;
            }
            Some(Ok(Event::InitDone)) => match pending.take() {
                Some(key) => key,
                None => missing(),
            },
        };
        let changed = lock(&vault).set_key(key.as_ref().map(Vec::as_slice).map_err(Clone::clone));
        if changed {
            on_change();
        }
    }
}

/// A hash of every ApiKey's name and generation, or `None` when one has no generation (files).
fn generations(keys: &[ApiKey]) -> Option<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    keys.len().hash(&mut h);
    for k in keys {
        k.metadata.name.hash(&mut h);
        k.metadata.generation?.hash(&mut h);
    }
    Some(h.finish())
}

/// Decrypts `data` with `key`, split over the available cores.
fn decrypt_all(key: &PrivateKey, data: &[&str]) -> Vec<(Arc<str>, Decryption)> {
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(data.len().div_ceil(16).max(1));
    let chunk = data.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = data
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|d| (Arc::from(*d), Decryption::new(d, digest(key, d))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    })
}

/// The digest of one revision's plaintext; the plaintext is wiped when it goes out of scope.
fn digest(key: &PrivateKey, data: &str) -> Result<[u8; 32], String> {
    let plaintext = key.decrypt(data).map_err(|e| e.to_string())?;
    if plaintext.is_empty() {
        return Err("the decrypted key is empty".to_owned());
    }
    Ok(Sha256::digest(&*plaintext).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kanali_crds::{ApiKeySpec, Revision};

    fn key_with(name: &str, data: &[&str]) -> ApiKey {
        ApiKey::new(
            name,
            ApiKeySpec {
                revisions: data
                    .iter()
                    .map(|d| Revision {
                        data: (*d).to_owned(),
                        ..Revision::default()
                    })
                    .collect(),
            },
        )
    }

    #[test]
    fn revisions_are_decrypted_once_and_a_new_key_starts_over() {
        let private = crate::crypto::generate_keypair(2048).unwrap();
        let pem = private.to_pkcs8_pem().unwrap();
        let public = private.public_key();
        let a = public.encrypt(b"alpha").unwrap();
        let b = public.encrypt(b"bravo").unwrap();
        let mut vault = KeyVault::new(KeySource::File("k.pem".into()));
        let no_key = vault.decrypt(&[key_with("a", &[&a])]);
        assert!(
            no_key
                .no_key
                .clone()
                .unwrap()
                .contains("has not been read yet")
        );

        assert!(vault.set_key(Ok(pem.as_bytes())));
        assert!(!vault.set_key(Ok(pem.as_bytes())), "the same key again");
        let got = vault.decrypt(&[key_with("a", &[&a, "bm90IGhleA=="])]);
        assert_eq!(
            got.digests[a.as_str()].digest,
            Ok(Sha256::digest(b"alpha").into())
        );
        assert!(got.digests["bm90IGhleA=="].digest.is_err());
        assert_eq!(vault.decrypted(), 2);
        // One key changed: only its new revision is decrypted; a's is cached.
        let got = vault.decrypt(&[key_with("a", &[&a]), key_with("b", &[&b])]);
        assert_eq!(vault.decrypted(), 3);
        assert_eq!(got.digests.len(), 2, "the gone revision is forgotten");
        // Nothing changed: the same digests, not a copy.
        let again = vault.decrypt(&[key_with("b", &[&b]), key_with("a", &[&a])]);
        assert!(Arc::ptr_eq(&got, &again));

        let other = crate::crypto::generate_keypair(2048).unwrap();
        assert!(vault.set_key(Ok(other.to_pkcs8_pem().unwrap().as_bytes())));
        let got = vault.decrypt(&[key_with("a", &[&a])]);
        assert!(
            got.digests[a.as_str()].digest.is_err(),
            "another key cannot decrypt it"
        );
        assert!(vault.set_key(Ok(b"not a key")));
        assert!(
            vault
                .decrypt(&[])
                .no_key
                .clone()
                .unwrap()
                .contains("unusable")
        );
    }
}
