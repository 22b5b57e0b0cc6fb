//! The install as users run it, and what it must look like once it runs: the overlay changes
//! nothing but image tags, the pods come up Ready with the manifests' security context, the
//! controller gets exactly the RBAC of `manifests/` and the proxies none, and the examples
//! answer through the gateway's ClusterIP.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use kanali_e2e::kubectl::Kubectl;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::ROLLOUT;
use crate::cluster::{
    CONTROLLERS, NS, PROXIES, get_json, kubectl, pods, repo_path, settled, wait_for,
};

const IMAGES: [&str; 3] = [
    "ghcr.io/kanali/kanali-controller",
    "ghcr.io/kanali/kanali-proxy",
    "ghcr.io/kanali/kanali-echo",
];

/// `kubectl kustomize dir`, or `None` when there is no kubectl to run.
fn kustomize(dir: &str) -> Option<String> {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned());
    let out = match std::process::Command::new(&kubectl)
        .args(["kustomize", &repo_path(dir)])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("{kubectl} kustomize {dir}: {e}"),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// What users install names the release's images, and the e2e overlays change only their
/// tags: the suite tests the manifests themselves (security context, probes, resources).
/// Skipped, loudly, without kubectl (unless `REQUIRE_NODE=1`).
pub fn overlay_changes_only_the_images() {
    let version = env!("CARGO_PKG_VERSION");
    for (base, overlay) in [
        ("manifests", "e2e/node/overlay/install"),
        ("manifests/examples/cluster", "e2e/node/overlay/examples"),
    ] {
        let Some(base) = kustomize(base) else {
            assert!(
                std::env::var("REQUIRE_NODE").as_deref() != Ok("1"),
                "REQUIRE_NODE=1 but kubectl is not installed"
            );
            eprintln!("skipped: no kubectl to render the manifests with");
            return;
        };
        for line in base
            .lines()
            .filter(|l| l.trim_start().starts_with("image:"))
        {
            let image = line.trim_start().trim_start_matches("image:").trim();
            let (name, tag) = image.rsplit_once(':').unwrap_or((image, ""));
            assert!(
                IMAGES.contains(&name) && tag == version,
                "{image}: manifests must name ghcr.io/kanali images at the workspace version {version}"
            );
        }
        let mut retagged = kustomize(overlay).expect("kubectl ran a moment ago");
        for name in IMAGES {
            retagged = retagged.replace(&format!("{name}:e2e"), &format!("{name}:{version}"));
        }
        if let Some(i) = (0..retagged.lines().count().max(base.lines().count()))
            .find(|&i| retagged.lines().nth(i) != base.lines().nth(i))
        {
            let around = |text: &str| -> Vec<String> {
                text.lines()
                    .skip(i.saturating_sub(3))
                    .take(7)
                    .map(str::to_owned)
                    .collect()
            };
            panic!(
                "{overlay} may change image tags only; first difference at line {}:\n\
                 manifests: {:#?}\noverlay:   {:#?}",
                i + 1,
                around(&base),
                around(&retagged)
            );
        }
    }
}

/// `kubectl apply -k` the install overlay; both Deployments reach Ready.
pub async fn install(k: &Kubectl) {
    let overlay = repo_path("e2e/node/overlay/install");
    kubectl(k, &["apply", "-k", &overlay]).await;
    kubectl(
        k,
        &[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/apiproxies.kanali.io",
            "crd/mocktargets.kanali.io",
            "crd/apikeys.kanali.io",
            "crd/apikeybindings.kanali.io",
        ],
    )
    .await;
    settled(k, NS, CONTROLLERS, 2, ROLLOUT).await;
    settled(k, NS, PROXIES, 2, ROLLOUT).await;
}

/// The running pods as the manifests describe them, and their rights.
pub async fn check_pods(k: &Kubectl) {
    for pod in pods(k, NS, "app.kubernetes.io/part-of=kanali").await {
        let name = &pod["metadata"]["name"];
        let spec = &pod["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(spec["securityContext"]["runAsUser"], 65532, "{name}");
        let c = &spec["containers"][0]["securityContext"];
        assert_eq!(c["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(c["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(
            c["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}"
        );
        let component = &pod["metadata"]["labels"]["app.kubernetes.io/component"];
        let mounts = spec["containers"][0]["volumeMounts"].to_string();
        if component == "proxy" {
            assert_eq!(spec["serviceAccountName"], "kanali-proxy", "{name}");
            assert!(
                !mounts.contains("serviceaccount"),
                "{name}: no API token: {mounts}"
            );
        } else {
            assert_eq!(spec["serviceAccountName"], "kanali-controller", "{name}");
            assert!(
                mounts.contains("serviceaccount"),
                "{name}: its own token: {mounts}"
            );
        }
        check_process(&pod);
    }
    let sa = |who: &str| format!("--as=system:serviceaccount:{NS}:{who}");
    for (who, verb, what, sub, allowed) in [
        (
            "kanali-controller",
            "watch",
            "apiproxies.kanali.io",
            "",
            true,
        ),
        (
            "kanali-controller",
            "patch",
            "apiproxies.kanali.io",
            "status",
            true,
        ),
        (
            "kanali-controller",
            "update",
            "apiproxies.kanali.io",
            "",
            false,
        ),
        ("kanali-controller", "create", "pods", "", false),
        ("kanali-proxy", "get", "secrets", "", false),
        ("kanali-proxy", "list", "apiproxies.kanali.io", "", false),
    ] {
        let sub = format!("--subresource={sub}");
        let out = k
            .command(&["auth", "can-i", verb, what, &sub, "-A", &sa(who)])
            .output()
            .expect("kubectl auth can-i");
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(
            answer == "yes",
            allowed,
            "{who} {verb} {what} {sub}: {answer}"
        );
    }
}

/// The container's process on this host: runs as 65532 with a read-only root. Only with
/// `CONTAINERD_ADDRESS` (the node's containerd, which knows the container's PID).
fn check_process(pod: &Value) {
    let Ok(sock) = std::env::var("CONTAINERD_ADDRESS") else {
        return;
    };
    let name = &pod["metadata"]["name"];
    let id = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("containerd://"))
        .unwrap_or_else(|| panic!("{name}: no containerd container id"));
    let tasks = std::process::Command::new("ctr")
        .args(["-a", &sock, "-n", "k8s.io", "tasks", "ls"])
        .output()
        .expect("ctr");
    let tasks = String::from_utf8_lossy(&tasks.stdout);
    let pid = tasks
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(id)).then(|| f.next().map(str::to_owned))?
        })
        .unwrap_or_else(|| panic!("{name}: container {id} not in `ctr tasks ls`: {tasks}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65532"),
        "{name}: runs as {uid}"
    );
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap();
    let options = root.split_whitespace().nth(5).unwrap();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "{name}: root is not read-only: {root}"
    );
}

/// Applies the examples (a mock, and a Service backend whose pods run the echo image) and
/// checks that they answer through the gateway's ClusterIP; returns that address.
pub async fn examples(k: &Kubectl) -> SocketAddr {
    kubectl(
        k,
        &[
            "apply",
            "-f",
            &repo_path("manifests/examples/echo-mock.yaml"),
        ],
    )
    .await;
    kubectl(k, &["apply", "-k", &repo_path("e2e/node/overlay/examples")]).await;
    settled(k, "default", "app=echo-pods", 2, ROLLOUT).await;
    for ap in ["users", "echo-pods"] {
        let ap = format!("apiproxy/{ap}");
        kubectl(
            k,
            &[
                "wait",
                "--for=condition=Ready",
                "--timeout=60s",
                "-n",
                "default",
                &ap,
            ],
        )
        .await;
    }
    let svc = get_json(k, &["get", "svc", "kanali-gateway", "-n", NS]).await;
    let ip = svc["spec"]["clusterIP"].as_str().expect("a ClusterIP");
    let gateway: SocketAddr = format!("{ip}:80").parse().unwrap();

    let (status, body) = get(gateway, "/mock/users").await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ada\""), "{body}");
    let echo_pods: BTreeSet<String> = pods(k, "default", "app=echo-pods")
        .await
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    // Balanced over the pod IPs: both pods answer (each names itself).
    wait_for(
        "both echo pods answer through the gateway",
        Duration::from_secs(60),
        || async {
            let mut seen = BTreeSet::new();
            for _ in 0..20 {
                let (status, body) = get(gateway, "/pods/hello").await?;
                let json: Value =
                    serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
                if status != 200 || json["path"] != "/hello" {
                    return Err(format!("{status}: {body}"));
                }
                seen.insert(json["upstream"].as_str().unwrap_or_default().to_owned());
            }
            if seen == echo_pods {
                Ok(())
            } else {
                Err(format!("answered by {seen:?}, pods {echo_pods:?}"))
            }
        },
    )
    .await;
    gateway
}

/// `GET path` through the gateway on a new connection: status and body.
async fn get(gateway: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let stream = TcpStream::connect(gateway)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", "gateway.e2e")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within 10 s"))?
}
