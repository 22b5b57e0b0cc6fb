//! The install manifests, applied to the API server.

use kanali_e2e::kubectl::Kubectl;

use crate::support::{ensure_crds, kubeconfig, random_suffix, repo_root};

/// The install (`kubectl apply -k manifests/`) applies cleanly, and with a context whose
/// default namespace is a throwaway one nothing lands there: every object names its namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_install_kustomization_applies() {
    let Some(kubeconfig) = kubeconfig() else {
        return;
    };
    let manifests = repo_root().join("manifests");
    if !manifests.join("kustomization.yaml").is_file() {
        eprintln!("skipped: no manifests/kustomization.yaml");
        return;
    }
    let k = Kubectl::new(kubeconfig.clone());
    tokio::task::block_in_place(|| ensure_crds(&k));
    let ns = format!("kanali-e2e-install-{}", random_suffix());
    k.run(&["create", "namespace", &ns], None).await.unwrap();
    // A copy of the kubeconfig whose context defaults to the throwaway namespace.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kubeconfig");
    std::fs::copy(&kubeconfig, &config).unwrap();
    let scoped = Kubectl::new(config.clone());
    scoped
        .run(
            &["config", "set-context", "--current", "--namespace", &ns],
            None,
        )
        .await
        .unwrap();
    let existed = k
        .run(
            &[
                "get",
                "namespace",
                "kanali-system",
                "--ignore-not-found",
                "-o",
                "name",
            ],
            None,
        )
        .await
        .unwrap();

    let m = manifests.to_str().unwrap();
    let result = scoped.run(&["apply", "-k", m], None).await;
    let listed = scoped.run(&["get", "-k", m, "-o", "name"], None).await;
    let stray = k
        .run(
            &[
                "get",
                "deployments,services,serviceaccounts,configmaps,roles,rolebindings,poddisruptionbudgets,horizontalpodautoscalers",
                "-n",
                &ns,
                "-o",
                "name",
            ],
            None,
        )
        .await;

    // Clean up before asserting: the namespace always, the install only if it was ours.
    let _ = k
        .run(&["delete", "namespace", &ns, "--wait=false"], None)
        .await;
    if existed.trim().is_empty() {
        let base = manifests.join("base");
        let _ = k
            .run(
                &[
                    "delete",
                    "-k",
                    base.to_str().unwrap(),
                    "--wait=false",
                    "--ignore-not-found",
                ],
                None,
            )
            .await;
    }

    let applied = result.unwrap_or_else(|e| panic!("{e}"));
    let listed = listed.unwrap_or_else(|e| panic!("every applied object exists: {e}"));
    assert!(
        listed.contains("deployment.apps/"),
        "the install has deployments:\n{listed}\n(apply said:\n{applied})"
    );
    let stray: Vec<&str> = stray
        .as_deref()
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            !l.starts_with("serviceaccount/default") && !l.starts_with("configmap/kube-root-ca.crt")
        })
        .collect();
    assert!(
        stray.is_empty(),
        "objects landed in the context's namespace {ns}: {stray:?}"
    );
}
