//! Kanali as pods on a real single-node cluster (issue #10): `manifests/` installed as users
//! install it (only the image tags changed by `e2e/node/overlay/`), the examples answering
//! through the gateway's ClusterIP, the proxies scaled to four, and steady load that must lose
//! no request while the proxies roll, the controllers roll, the Lease holder's pod is deleted
//! and a backend pod is deleted. The figures of each event are printed.
//!
//! Needs a node (`e2e/node/start-node.sh`) with the images imported (`e2e/node/image.sh`):
//! `e2e/node/test-node.sh` does all of it and runs this suite. Configuration (environment):
//! - `KANALI_E2E_NODE_KUBECONFIG`: the node's admin kubeconfig. Unset: the suite prints
//!   "skipped" and passes, unless `REQUIRE_NODE=1`, which makes it fail instead.
//! - `CONTAINERD_ADDRESS`: the node's containerd socket; when set, the users the proxies and
//!   controllers run as and their read-only root are checked on the processes themselves.
//! - `KANALI_E2E_NODE_RATE`: requests per second of the load (default 40).
//!
//! One test, because every phase builds on the cluster the previous one left.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod cluster;
mod install;
mod load;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use cluster::{
    CONTROLLERS, NS, PROXIES, condition_messages, kubeconfig, kubectl, lease_holder, names, pods,
    serving, settled, wait_for,
};
use kanali_e2e::check::{samples, sum_of};
use kanali_e2e::kubectl::Kubectl;
use load::{Figures, Load};
use serde_json::Value;
use tokio::time::Instant;

/// Limit for a rollout or replacement to finish (debug binaries on 2 busy cores).
const ROLLOUT: Duration = Duration::from_secs(240);
/// The load path: through a proxy to the echo pods.
const LOAD_PATH: &str = "/pods/load";

/// Needs no node (only kubectl, for `kubectl kustomize`): runs with the fast suites.
#[test]
fn manifests_name_the_release_images_and_the_overlays_change_only_their_tags() {
    install::overlay_changes_only_the_images();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kanali_runs_as_pods_and_loses_no_request_when_pods_come_and_go() {
    let Some(kubeconfig) = kubeconfig() else {
        return;
    };
    let k = Kubectl::new(kubeconfig);
    let t0 = Instant::now();
    install::install(&k).await;
    install::check_pods(&k).await;
    eprintln!(
        "== installed: 2 controllers and 2 proxies Ready at {:?}",
        t0.elapsed()
    );
    let gateway = install::examples(&k).await;
    eprintln!("== examples answer through {gateway} at {:?}", t0.elapsed());

    let spread = scale_to_four(&k, gateway).await;
    eprintln!(
        "== 4 proxies, all counted and all serving at {:?}",
        t0.elapsed()
    );
    metrics_where_annotated(&k, &spread).await;
    eprintln!(
        "== every pod's /metrics answers where its annotations say, at {:?}",
        t0.elapsed()
    );

    let rate = std::env::var("KANALI_E2E_NODE_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(40);
    let mut report = Vec::new();
    let figures = under_load(gateway, rate, "rolling restart of the proxies", || async {
        rollout_restart(&k, "kanali-proxy", PROXIES, 4).await;
    })
    .await;
    report.push(figures);
    let figures = under_load(
        gateway,
        rate,
        "rolling restart of the controllers",
        || async {
            rollout_restart(&k, "kanali-controller", CONTROLLERS, 2).await;
        },
    )
    .await;
    report.push(figures);
    let mut failover = Duration::ZERO;
    let figures = under_load(gateway, rate, "Lease holder's pod deleted", || async {
        failover = delete_lease_holder(&k).await;
    })
    .await;
    report.push(figures);
    let figures = under_load(gateway, rate, "backend (echo) pod deleted", || async {
        delete_backend_pod(&k).await;
    })
    .await;
    report.push(figures);

    eprintln!(
        "\n== figures at {rate} req/s, one new connection per request, through the ClusterIP"
    );
    for (event, figures) in &report {
        eprintln!("{}", figures.line(event));
    }
    eprintln!("status writes resumed {failover:?} after the Lease holder's pod was deleted");
    eprintln!("node suite total: {:?}\n", t0.elapsed());
    for (event, figures) in &report {
        assert!(figures.sent > 0, "{event}: no request sent");
        assert_eq!(
            figures.failed, 0,
            "{event}: {} of {} requests failed: {:#?}",
            figures.failed, figures.sent, figures.errors
        );
    }
}

/// `kubectl scale` to four proxies: all four connected and counted by every ApiProxy's
/// `Programmed`, and traffic through the ClusterIP reaches each of them. Returns the load run
/// that showed it.
async fn scale_to_four(k: &Kubectl, gateway: SocketAddr) -> Figures {
    kubectl(
        k,
        &["scale", "deploy/kanali-proxy", "-n", NS, "--replicas=4"],
    )
    .await;
    settled(k, NS, PROXIES, 4, ROLLOUT).await;
    wait_for(
        "every ApiProxy's Programmed counts 4 of 4 proxies",
        Duration::from_secs(60),
        || async {
            let messages = condition_messages(k, "default", "Programmed").await;
            if !messages.is_empty()
                && messages
                    .iter()
                    .all(|(_, m)| m.starts_with("4 of 4 connected proxies"))
            {
                Ok(())
            } else {
                Err(format!("{messages:?}"))
            }
        },
    )
    .await;
    let proxies: Vec<String> = pods(k, NS, PROXIES)
        .await
        .iter()
        .filter_map(|p| p["status"]["podIP"].as_str().map(str::to_owned))
        .collect();
    // kube-proxy may lag the Ready condition by a moment: spread is checked until it shows.
    wait_for(
        "requests through the ClusterIP reach all 4 proxies",
        Duration::from_secs(60),
        || async {
            let load = Load::start(gateway, LOAD_PATH, 50, Duration::from_secs(10));
            tokio::time::sleep(Duration::from_secs(2)).await;
            let figures = load.finish().await;
            let missing: Vec<_> = proxies
                .iter()
                .filter(|ip| !figures.by_proxy.contains_key(*ip))
                .collect();
            if figures.failed == 0 && missing.is_empty() {
                eprintln!("spread over the 4 proxies: {:?}", figures.by_proxy);
                Ok(figures)
            } else {
                Err(format!(
                    "by proxy {:?}, none for {missing:?}, errors {:?}",
                    figures.by_proxy, figures.errors
                ))
            }
        },
    )
    .await
}

/// Scrapes every proxy and controller pod where its `prometheus.io/*` annotations point, as
/// Prometheus's pod discovery would: a wrong port or path there loses the metrics silently.
/// Each proxy counted at least the 200s the spread run got from it, and exactly one
/// controller, the Lease holder, reports itself leader.
async fn metrics_where_annotated(k: &Kubectl, spread: &Figures) {
    let holder = wait_for("the Lease has a holder", ROLLOUT, || lease_holder(k)).await;
    let mut leaders = Vec::new();
    for (selector, n) in [(PROXIES, 4), (CONTROLLERS, 2)] {
        let ready: Vec<Value> = pods(k, NS, selector)
            .await
            .into_iter()
            .filter(serving)
            .collect();
        assert_eq!(ready.len(), n, "{selector}: {:?}", names(&ready));
        for pod in &ready {
            let name = pod["metadata"]["name"].as_str().unwrap_or("?");
            let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
            let samples = wait_for(
                &format!("{name}: /metrics where its annotations say"),
                Duration::from_secs(30),
                || scrape_annotated(pod),
            )
            .await;
            if selector == PROXIES {
                let counted = sum_of(
                    &samples,
                    "kanali_http_request_latency_milliseconds_count",
                    &["code=\"200\""],
                );
                let served = spread.by_proxy.get(ip).copied().unwrap_or(0);
                assert!(
                    counted >= served as f64,
                    "{name} counted {counted} requests answered 200, the spread run got {served} from it"
                );
                eprintln!(
                    "{name}: {counted} requests answered 200 counted (the spread run: {served})"
                );
            } else if sum_of(&samples, "kanali_controller_leader", &[]) == 1.0 {
                leaders.push(name.to_owned());
            }
        }
    }
    assert_eq!(
        leaders,
        [holder],
        "controllers reporting kanali_controller_leader 1"
    );
}

/// GET `prometheus.io/path` on `prometheus.io/port` at the pod's IP, parsed.
async fn scrape_annotated(pod: &Value) -> Result<HashMap<String, f64>, String> {
    let annotations = &pod["metadata"]["annotations"];
    if annotations["prometheus.io/scrape"] != "true" {
        return Err(format!(
            "prometheus.io/scrape is {}",
            annotations["prometheus.io/scrape"]
        ));
    }
    let port: u16 = annotations["prometheus.io/port"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            format!(
                "prometheus.io/port is {}",
                annotations["prometheus.io/port"]
            )
        })?;
    let path = annotations["prometheus.io/path"]
        .as_str()
        .unwrap_or("/metrics");
    let ip: std::net::IpAddr = pod["status"]["podIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .ok_or("no pod IP")?;
    let text = load::get_text(SocketAddr::new(ip, port), path).await?;
    samples(&text)
}

/// Runs `event` under steady load (2 s of load before and after it) and returns its figures.
async fn under_load<F, Fut>(
    gateway: SocketAddr,
    rate: u32,
    event: &'static str,
    run: F,
) -> (&'static str, Figures)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let load = Load::start(gateway, LOAD_PATH, rate, ROLLOUT + Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    run().await;
    let took = start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let figures = load.finish().await;
    eprintln!("{} (event took {took:.1?})", figures.line(event));
    (event, figures)
}

/// `kubectl rollout restart`, then wait until the rollout is over and every old pod is gone.
async fn rollout_restart(k: &Kubectl, deploy: &str, selector: &str, n: usize) {
    let before = names(&pods(k, NS, selector).await);
    kubectl(
        k,
        &["rollout", "restart", &format!("deploy/{deploy}"), "-n", NS],
    )
    .await;
    let limit = format!("--timeout={}s", ROLLOUT.as_secs());
    kubectl(
        k,
        &[
            "rollout",
            "status",
            &format!("deploy/{deploy}"),
            "-n",
            NS,
            &limit,
        ],
    )
    .await;
    settled(k, NS, selector, n, ROLLOUT).await;
    let serving: Vec<_> = pods(k, NS, selector)
        .await
        .into_iter()
        .filter(cluster::serving)
        .collect();
    let after = names(&serving);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "every {deploy} pod was replaced: before {before:?}, serving now {after:?}"
    );
}

/// Deletes the Lease holder's pod and returns how long until the other replica wrote the
/// status of an ApiProxy applied right after (at most 15 s).
async fn delete_lease_holder(k: &Kubectl) -> Duration {
    let holder = wait_for("a Lease holder", Duration::from_secs(30), || {
        lease_holder(k)
    })
    .await;
    kubectl(k, &["delete", "pod", &holder, "-n", NS, "--wait=false"]).await;
    let deleted = Instant::now();
    let failover = r#"{"apiVersion": "kanali.io/v2", "kind": "ApiProxy",
      "metadata": {"name": "after-failover", "namespace": "default"},
      "spec": {"source": {"path": "/after-failover"},
               "target": {"backend": {"mock": {"mockTargetName": "users-mock"}}}}}"#;
    k.run(&["apply", "-f", "-"], Some(failover))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        "the new ApiProxy's status is written after the Lease holder's pod is deleted",
        Duration::from_secs(15),
        || async {
            let ap =
                cluster::get_json(k, &["get", "apiproxy", "after-failover", "-n", "default"]).await;
            let ready = ap["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if ready {
                Ok(())
            } else {
                Err(format!("{}", ap["status"]))
            }
        },
    )
    .await;
    let took = deleted.elapsed();
    let new_holder = lease_holder(k).await.unwrap_or_default();
    assert_ne!(new_holder, holder, "the other replica holds the Lease");
    settled(k, NS, CONTROLLERS, 2, ROLLOUT).await;
    eprintln!(
        "deleted {holder}: {new_holder} wrote status after {took:.1?}; replaced and exited after {:.1?}",
        deleted.elapsed()
    );
    took
}

/// Deletes one echo pod; the Deployment replaces it.
async fn delete_backend_pod(k: &Kubectl) {
    let echo = names(&pods(k, "default", "app=echo-pods").await);
    let victim = echo.first().expect("an echo pod");
    kubectl(
        k,
        &["delete", "pod", victim, "-n", "default", "--wait=false"],
    )
    .await;
    let deleted = Instant::now();
    settled(k, "default", "app=echo-pods", 2, ROLLOUT).await;
    eprintln!(
        "deleted {victim}: replaced and exited after {:.1?}",
        deleted.elapsed()
    );
}
