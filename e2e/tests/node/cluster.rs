//! The cluster as `kubectl` shows it: configuration, waiting for pods and conditions, and the
//! few facts the scenario reads (the Lease holder, the gateway's ClusterIP, pod lists).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use kanali_e2e::kubectl::Kubectl;
use serde_json::Value;
use tokio::time::Instant;

/// The namespace the install creates.
pub const NS: &str = "kanali-system";
/// Label selectors of the two components.
pub const PROXIES: &str = "app.kubernetes.io/component=proxy";
pub const CONTROLLERS: &str = "app.kubernetes.io/component=controller";

/// The node's admin kubeconfig, or `None` (after saying so) when the suite should skip.
pub fn kubeconfig() -> Option<PathBuf> {
    match std::env::var_os("KANALI_E2E_NODE_KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "KANALI_E2E_NODE_KUBECONFIG={} does not exist (e2e/node/test-node.sh starts a node)",
                path.display()
            );
            Some(path)
        }
        None if std::env::var("REQUIRE_NODE").as_deref() == Ok("1") => panic!(
            "REQUIRE_NODE=1 but KANALI_E2E_NODE_KUBECONFIG is not set: run e2e/node/test-node.sh \
             (it starts a node, builds the images and runs this suite)"
        ),
        None => {
            eprintln!(
                "skipped: no node (run e2e/node/test-node.sh, or set KANALI_E2E_NODE_KUBECONFIG)"
            );
            None
        }
    }
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    kanali_e2e::repo_root()
}

/// `repo_root()/rel` as a string, for kubectl arguments.
pub fn repo_path(rel: &str) -> String {
    repo_root().join(rel).to_string_lossy().into_owned()
}

/// Runs kubectl, panicking with its error.
pub async fn kubectl(k: &Kubectl, args: &[&str]) -> String {
    k.run(args, None).await.unwrap_or_else(|e| panic!("{e}"))
}

/// `kubectl get ... -o json`, parsed.
pub async fn get_json(k: &Kubectl, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = kubectl(k, &all).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
}

/// Polls `check` every 250 ms until it returns `Ok`; panics with its last `Err` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if start.elapsed() >= limit => {
                panic!("{what}: not within {limit:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Pods matching `selector` in `ns`.
pub async fn pods(k: &Kubectl, ns: &str, selector: &str) -> Vec<Value> {
    let list = get_json(k, &["get", "pods", "-n", ns, "-l", selector]).await;
    list["items"].as_array().cloned().unwrap_or_default()
}

/// Whether the pod is Ready and not terminating.
pub fn serving(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Whether the pod is being deleted and none of its containers runs any more. The kubelet
/// v1.20 removes such a pod's object up to a minute later (once it reclaimed its cgroups);
/// its traffic ended when its containers did.
pub fn finished(pod: &Value) -> bool {
    !pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|c| c["state"]["running"].is_null())
}

/// Pod names.
pub fn names(pods: &[Value]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until exactly `n` pods match and are Ready, and every other matching pod is
/// [`finished`]: a rollout, scale or replacement is over, including the old pods' drain.
pub async fn settled(k: &Kubectl, ns: &str, selector: &str, n: usize, limit: Duration) {
    wait_for(
        &format!("{n} Ready pods and nothing terminating for {selector}"),
        limit,
        || async {
            let pods = pods(k, ns, selector).await;
            let ready = pods.iter().filter(|p| serving(p)).count();
            let finished = pods.iter().filter(|p| finished(p)).count();
            if ready == n && ready + finished == pods.len() {
                Ok(())
            } else {
                Err(format!(
                    "{} pods, {ready} serving, {finished} finished: {:?}",
                    pods.len(),
                    pods.iter()
                        .map(|p| format!(
                            "{} {} deleting={}",
                            p["metadata"]["name"],
                            p["status"]["phase"],
                            !p["metadata"]["deletionTimestamp"].is_null()
                        ))
                        .collect::<Vec<_>>()
                ))
            }
        },
    )
    .await
}

/// The holder of the controllers' Lease (a pod name).
pub async fn lease_holder(k: &Kubectl) -> Result<String, String> {
    let lease = k
        .run(
            &["get", "lease", "kanali-controller", "-n", NS, "-o", "json"],
            None,
        )
        .await?;
    let lease: Value = serde_json::from_str(&lease).map_err(|e| e.to_string())?;
    lease["spec"]["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("no holder: {}", lease["spec"]))
}

/// The `message` of each ApiProxy's `type_` condition in `ns`, by name.
pub async fn condition_messages(k: &Kubectl, ns: &str, type_: &str) -> Vec<(String, String)> {
    let list = get_json(k, &["get", "apiproxies", "-n", ns]).await;
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|ap| {
            let name = ap["metadata"]["name"].as_str().unwrap_or("?").to_owned();
            let message = ap["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == type_)
                .and_then(|c| c["message"].as_str())
                .unwrap_or("(none)")
                .to_owned();
            (name, message)
        })
        .collect()
}
