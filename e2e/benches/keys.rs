//! API keys at scale (issue #9): 100 000 ApiKeys in 10 bindings, with 100 ApiProxies.
//! Prints, in a release build:
//! - the first compile (decrypting every revision on all cores, then compiling),
//! - a recompile after one key changed (goal: under 1 s),
//! - the bytes a proxy is sent for a one-route edit and for a one-key edit, against the whole,
//! - the proxy's time and memory to take all the credentials, and one shard.
//!
//! `cargo bench -p kanali-e2e --bench keys` (`KEYS=N` for another count; `FAKE_RSA=1` skips
//! the RSA work — keys are random data "decrypted" by hashing it — to profile the rest). Not a
//! test: the figures go into the closing note and e2e/bench/RESULTS.md.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kanali_controller::compile::api_key::{Decrypted, Decryption};
use kanali_controller::compile::{Compiler, Objects, compile};
use kanali_controller::crypto::{PrivateKey, generate_keypair};
use kanali_controller::keys::{KeySource, KeyVault};
use kanali_controller::serve::{Holds, update};
use kanali_controller::state::{Published, Shared};
use kanali_crds::{
    ApiKey, ApiKeyBinding, ApiKeyBindingSpec, ApiKeySpec, ApiProxy, ApiProxySpec, Backend, Key,
    Plugin, Rate, RateUnit, Revision, Rule, Source, Target,
};
use kanali_dataplane::filter::credentials::Credentials;
use kanali_dataplane::filter::rate_limit::RateLimits;
use prost::Message as _;

// As in the controller and proxy binaries.
#[global_allocator]
static ALLOCATOR: std::alloc::System = std::alloc::System;
use mimalloc as _;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

fn api_key(name: &str, data: String) -> ApiKey {
    ApiKey::new(
        name,
        ApiKeySpec {
            revisions: vec![Revision {
                data,
                ..Revision::default()
            }],
        },
    )
}

fn proxy(i: usize) -> ApiProxy {
    let mut ap = ApiProxy::new(
        &format!("p{i}"),
        ApiProxySpec {
            source: Source {
                path: format!("/api{i}"),
                ..Source::default()
            },
            target: Target {
                backend: Backend {
                    endpoint: Some("http://127.0.0.1:9".to_owned()),
                    ..Backend::default()
                },
                ..Target::default()
            },
            plugins: vec![Plugin {
                name: "apikey".to_owned(),
                version: None,
                config: [("apiKeyBindingName".to_owned(), format!("b{}", i % 10))].into(),
            }],
        },
    );
    ap.metadata.namespace = Some("shop".to_owned());
    ap
}

fn published(c: &kanali_controller::compile::Compiled) -> Published {
    Published {
        version: c.version.clone(),
        snapshot: Arc::new(c.snapshot.clone()),
        credentials: c.credentials.clone(),
        credentials_version: c.credentials_version.clone(),
    }
}

fn bytes(messages: &[kanali_proto::v1::ControllerMessage]) -> usize {
    messages.iter().map(|m| m.encoded_len()).sum()
}

fn main() {
    let n: usize = std::env::var("KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!("{n} ApiKeys, 10 ApiKeyBindings, 100 ApiProxies; {cores} core(s)");
    let fake = std::env::var("FAKE_RSA").is_ok_and(|v| v == "1");
    let private: PrivateKey = generate_keypair(2048).unwrap();
    let public = private.public_key();
    // Real ciphertext is 684 base64 characters; the fake is as long, so hashing and copying
    // cost the same.
    let encrypt = |plaintext: &str| {
        if fake {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(format!("{plaintext:0>513}"))
        } else {
            public.encrypt(plaintext.as_bytes()).unwrap()
        }
    };
    let started = Instant::now();
    let keys: Vec<ApiKey> = (0..n)
        .map(|i| {
            api_key(
                &format!("key-{i}"),
                encrypt(&format!("plaintext-key-{i:08}")),
            )
        })
        .collect();
    println!(
        "encrypting the keys (setup): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let bindings: Vec<ApiKeyBinding> = (0..10)
        .map(|b| {
            let mut binding = ApiKeyBinding::new(
                &format!("b{b}"),
                ApiKeyBindingSpec {
                    keys: (b..n)
                        .step_by(10)
                        .map(|i| Key {
                            name: format!("key-{i}"),
                            default_rule: Some(Rule {
                                global: Some(true),
                                granular: None,
                            }),
                            subpaths: Vec::new(),
                            rate: Some(Rate {
                                amount: 100,
                                unit: RateUnit::Second,
                            }),
                        })
                        .collect(),
                },
            );
            binding.metadata.namespace = Some("shop".to_owned());
            binding
        })
        .collect();
    let mut objects = Objects {
        api_proxies: (0..100).map(proxy).collect(),
        api_keys: keys,
        api_key_bindings: bindings,
        ..Objects::default()
    };
    let pem = private.to_pkcs8_pem().unwrap();
    let vault = Mutex::new(KeyVault::new(KeySource::File("bench".into())));
    vault.lock().unwrap().set_key(Ok(pem.as_bytes()));
    // FAKE_RSA: "decrypt" by hashing the data (what compile sees is the same shape), cached by
    // content like the vault, so a recompile hashes only what is new.
    let fake_cache: Mutex<std::collections::HashMap<Arc<str>, Decryption>> = Mutex::default();
    let decrypt = |keys: &[ApiKey]| -> Arc<Decrypted> {
        if !fake {
            return vault.lock().unwrap().decrypt(keys);
        }
        use sha2::Digest as _;
        let mut cache = fake_cache.lock().unwrap();
        Arc::new(Decrypted {
            no_key: None,
            digests: keys
                .iter()
                .flat_map(|k| k.spec.revisions.iter())
                .map(|r| {
                    let d = r.data.trim();
                    if let Some((k, v)) = cache.get_key_value(d) {
                        return (k.clone(), v.clone());
                    }
                    let v = Decryption::new(d, Ok(sha2::Sha256::digest(d).into()));
                    let k: Arc<str> = Arc::from(d);
                    cache.insert(k.clone(), v.clone());
                    (k, v)
                })
                .collect(),
        })
    };
    let shared = Shared::default();

    // First compile: every revision decrypted, then compiled.
    let started = Instant::now();
    objects.decrypted = decrypt(&objects.api_keys);
    let decrypted = started.elapsed();
    // As the controller compiles: keeping what did not change between compiles.
    let mut compiler = Compiler::default();
    let first = compiler.compile(&objects);
    let compiled = started.elapsed();
    shared.publish(first.clone(), Vec::new(), Vec::new());
    println!(
        "first compile: {:.1} s ({:.1} s decrypting = {:.2} ms per revision over {cores} core(s), {:.0} ms compiling, {:.0} ms publishing)",
        started.elapsed().as_secs_f64(),
        decrypted.as_secs_f64(),
        decrypted.as_secs_f64() * 1000.0 * cores as f64 / n as f64,
        (compiled - decrypted).as_secs_f64() * 1000.0,
        (started.elapsed() - compiled).as_secs_f64() * 1000.0,
    );
    let full = update(&published(&first), &mut Holds::default());
    println!(
        "everything, to a new proxy: {:.1} MB in {} messages (largest {:.2} MB)",
        bytes(&full) as f64 / 1e6,
        full.len(),
        full.iter().map(|m| m.encoded_len()).max().unwrap_or(0) as f64 / 1e6
    );

    // One key changes (a rotation adds a revision).
    let mut changed = objects.clone();
    changed.api_keys[12_345 % n].spec.revisions.push(Revision {
        data: encrypt("rotated-key"),
        ..Revision::default()
    });
    let started = Instant::now();
    changed.decrypted = decrypt(&changed.api_keys);
    let decrypted = started.elapsed();
    let after_key = compiler.compile(&changed);
    let compiled = started.elapsed();
    shared.publish(after_key.clone(), Vec::new(), Vec::new());
    println!(
        "recompile after one key changed: {:.0} ms ({:.0} ms decrypting the new revision, {:.0} ms compiling, {:.0} ms publishing)",
        started.elapsed().as_secs_f64() * 1000.0,
        decrypted.as_secs_f64() * 1000.0,
        (compiled - decrypted).as_secs_f64() * 1000.0,
        (started.elapsed() - compiled).as_secs_f64() * 1000.0,
    );

    // What a proxy that holds the first version is sent for each edit.
    let holds = |c: &kanali_controller::compile::Compiled| Holds {
        snapshot: c.snapshot.version.clone(),
        shards: c.credentials.iter().map(|s| s.version.clone()).collect(),
    };
    let key_edit = update(&published(&after_key), &mut holds(&first));
    let mut route_edit = changed.clone();
    route_edit.api_proxies[0].spec.source.path = "/moved".to_owned();
    let started = Instant::now();
    let after_route = compiler.compile(&route_edit);
    let route_compile = started.elapsed();
    let started = Instant::now();
    let _ = compile(&route_edit);
    let route_from_scratch = started.elapsed();
    let route_msgs = update(&published(&after_route), &mut holds(&after_key));
    println!(
        "sent for a one-key edit: {} bytes ({} shard(s)); for a one-route edit: {} bytes (no shard; recompile {:.0} ms, {:.0} ms from scratch)",
        bytes(&key_edit),
        key_edit.iter().map(|m| m.credentials.len()).sum::<usize>(),
        bytes(&route_msgs),
        route_compile.as_secs_f64() * 1000.0,
        route_from_scratch.as_secs_f64() * 1000.0,
    );

    // The proxy's side.
    let limits = RateLimits::new(Default::default()).unwrap();
    let before = rss_kib();
    let started = Instant::now();
    let creds = Credentials::default()
        .update(&first.credentials, &limits)
        .unwrap();
    let took = started.elapsed();
    let after = rss_kib();
    println!(
        "proxy: all {} credentials applied in {:.0} ms, {:.1} MB of memory ({} B per key revision)",
        creds.len(),
        took.as_secs_f64() * 1000.0,
        (after.saturating_sub(before)) as f64 / 1024.0,
        (after.saturating_sub(before)) * 1024 / creds.len().max(1) as u64
    );
    let shard: Vec<_> = key_edit
        .iter()
        .flat_map(|m| m.credentials.clone())
        .collect();
    let started = Instant::now();
    let creds2 = creds.update(&shard, &limits).unwrap();
    println!(
        "proxy: a one-key update applied in {:.2} ms ({} shard(s) rebuilt, {} credentials)",
        started.elapsed().as_secs_f64() * 1000.0,
        shard.len(),
        creds2.len()
    );
}
