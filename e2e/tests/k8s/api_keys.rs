//! API keys (issue #9) against a real API server, driven as an operator would: `kanalictl`
//! makes the key pair (its Secret applied with kubectl) and the key, an ApiKeyBinding and an
//! ApiProxy with the `apikey` plugin use it, `kanalictl apikey rotate` rotates it, and the
//! status says which revision is still in use.

use std::path::Path;

use super::support::{Answer, Env, binary, check_condition, eventually};

/// The decryption key's Secret (in the test namespace).
const SECRET: &str = "kanali-decryption-key";
const DENIED: &str = "Api key is not authorized.";

/// Runs `kanalictl` with `args`, `stdin` piped in; returns stdout (stderr on failure).
fn kanalictl(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new(binary("kanalictl"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kanalictl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn read_key(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

/// ApiKeys are cluster-scoped: deleted at the end, whatever happens (the namespace's deletion
/// would not take them).
struct DeleteApiKey(String, std::path::PathBuf);

impl Drop for DeleteApiKey {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kubectl")
            .env("KUBECONFIG", &self.1)
            .args([
                "delete",
                "apikey",
                &self.0,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

fn check_key(a: &Answer, allowed: bool) -> Result<(), String> {
    if allowed {
        a.check_upstream("echo")
    } else {
        a.check_error(13, 401, DENIED)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_kanalictl_are_enforced_rotated_and_their_use_reported() {
    let Some(mut env) = Env::new("apikeys").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("kanali.pub");
    let public = public.to_str().unwrap();
    // 1. The key pair; its Secret goes to the cluster.
    let secret = kanalictl(
        &[
            "keypair",
            "generate",
            "--public-key-out",
            public,
            "--secret-name",
            SECRET,
            "--namespace",
            &env.ns,
        ],
        None,
    );
    env.apply(&secret).await;
    env.controller_args = vec![
        "--decryption-key-secret".into(),
        format!("{}/{SECRET}", env.ns),
        "--key-usage-interval-secs".into(),
        "1".into(),
    ];
    env.start_controller("c1").await;
    // Two workers each, both ways: the key's usage and its shared rate limit are the
    // proxy's, whichever worker a request lands on.
    env.proxy_args = vec!["--worker-threads".into(), "2".into()];
    env.start_proxy("p1", &[0]).await;
    env.proxy_args.push("--work-stealing".into());
    env.start_proxy("p2", &[0]).await;

    // 2. A key, 3. granted to an ApiProxy.
    let name = format!("{}-app", env.ns);
    let _cleanup = DeleteApiKey(name.clone(), super::support::kubeconfig().unwrap());
    let first_key = dir.path().join("first");
    let api_key = kanalictl(
        &[
            "apikey",
            "generate",
            "--name",
            &name,
            "--public-key",
            public,
            "--plaintext-out",
            first_key.to_str().unwrap(),
        ],
        None,
    );
    env.apply(&api_key).await;
    let first_key = read_key(&first_key);
    env.apply(&format!(
        r#"apiVersion: kanali.io/v2
kind: ApiKeyBinding
metadata: {{name: app-keys}}
spec:
  keys:
  - name: {name}
    defaultRule: {{granular: {{verbs: [GET]}}}}
---
apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: keyed}}
spec:
  source: {{path: /keyed}}
  target:
    backend: {{endpoint: "{}"}}
  plugins:
  - name: apikey
    config: {{apiKeyBindingName: app-keys}}
"#,
        env.endpoint()
    ))
    .await;
    env.kubectl_wait_ready("apiproxy", "keyed").await;
    env.kubectl_wait_ready("apikeybinding", "app-keys").await;
    env.kubectl_wait_ready("apikey", &name).await;
    env.now_everywhere_with("/keyed/x", &[("apikey", &first_key)], |a| {
        check_key(a, true)
    })
    .await;
    env.now_everywhere("/keyed/x", |a| {
        a.check_error(12, 403, "My lips are sealed.")
    })
    .await;
    env.now_everywhere_with("/keyed/x", &[("apikey", "not-a-key")], |a| {
        check_key(a, false)
    })
    .await;

    // 4. Rotate, as the help says: get | rotate | apply.
    let current = env
        .kubectl(&["get", "apikey", &name, "-o", "yaml"])
        .await
        .unwrap();
    let second_key = dir.path().join("second");
    let rotated = kanalictl(
        &[
            "apikey",
            "rotate",
            "-f",
            "-",
            "--public-key",
            public,
            "--plaintext-out",
            second_key.to_str().unwrap(),
        ],
        Some(&current),
    );
    env.apply(&rotated).await;
    let second_key = read_key(&second_key);
    env.eventually_everywhere_with("/keyed/x", &[("apikey", &second_key)], |a| {
        check_key(a, true)
    })
    .await;
    // The old revision is Inactive now: refused, but its use is still seen.
    env.eventually_everywhere_with("/keyed/x", &[("apikey", &first_key)], |a| {
        check_key(a, false)
    })
    .await;

    // lastUsed: both revisions, and the older one shows in its own column.
    let status = eventually("both revisions' lastUsed in status", || async {
        let obj = env.get_json("apikey", &name).await?;
        let s = &obj["status"];
        let used: Vec<bool> = s["revisions"]
            .as_array()
            .map(|r| r.iter().map(|r| r["lastUsed"].is_string()).collect())
            .unwrap_or_default();
        if used == [true, true]
            && s["olderRevisionsLastUsed"].is_string()
            && s["lastUsed"].is_string()
        {
            Ok(s.clone())
        } else {
            Err(format!("status now: {s}"))
        }
    })
    .await;
    assert_eq!(status["revisions"][0]["status"], "Inactive");
    assert_eq!(status["revisions"][1]["status"], "Active");
    let table = env.kubectl(&["get", "apikey", &name]).await.unwrap();
    assert!(
        table.contains("LAST USED") && table.contains("OLDER USED"),
        "{table}"
    );

    // 5. The decryption key is replaced: every revision is re-decrypted with it, and fails.
    let other = kanalictl(
        &[
            "keypair",
            "generate",
            "--public-key-out",
            dir.path().join("other.pub").to_str().unwrap(),
            "--secret-name",
            SECRET,
            "--namespace",
            &env.ns,
        ],
        None,
    );
    env.apply(&other).await;
    let obj = env
        .wait_condition(
            "apikey",
            &name,
            "Accepted",
            "False",
            Some("DecryptionFailed"),
        )
        .await;
    check_condition(&obj, "Ready", "False", Some("DecryptionFailed")).unwrap();
    env.eventually_everywhere_with("/keyed/x", &[("apikey", &second_key)], |a| {
        check_key(a, false)
    })
    .await;
    // And back: the original key works again, without a restart.
    env.apply(&secret).await;
    env.wait_condition("apikey", &name, "Ready", "True", None)
        .await;
    env.eventually_everywhere_with("/keyed/x", &[("apikey", &second_key)], |a| {
        check_key(a, true)
    })
    .await;
}
