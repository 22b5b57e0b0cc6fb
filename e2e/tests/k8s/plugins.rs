//! Custom plugins (issue #11) against a real API server: proxies with a `--plugins-dir`, two
//! controller replicas, ApiProxies whose plugin loads, does not exist anywhere, or exists on
//! one proxy only. The failing ApiProxy shows `Programmed=False` with the reason and the proxy
//! that reported it — also when that proxy is connected to the replica that does not write
//! status — while the other routes keep serving.

use std::path::Path;

use kanali_dataplane::filter::wasm::testkit::header_plugin;

use super::support::{Env, check_condition, condition, eventually, through};

const PLUGIN_OPEN: &str = "Could not open or load plugin.";

fn write_module(dir: &Path, name: &str, wat: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, wat::parse_str(wat).unwrap()).unwrap();
    std::fs::rename(tmp, dir.join(format!("{name}.wasm"))).unwrap();
}

fn plugin_proxy(name: &str, path: &str, endpoint: &str, plugin: &str) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: {name}}}
spec:
  source: {{path: {path}}}
  target:
    path: /
    backend: {{endpoint: "{endpoint}"}}
  plugins:
  - {{name: {plugin}, config: {{mode: test}}}}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_does_not_load_shows_on_its_api_proxy_while_others_serve() {
    let Some(mut env) = Env::new("plugins").await else {
        return;
    };
    // Both proxies have `hello`; only p-full has `onlyfull`.
    let full = tempfile::tempdir().unwrap();
    let partial = tempfile::tempdir().unwrap();
    for dir in [full.path(), partial.path()] {
        write_module(dir, "hello", &header_plugin("x-hello", "world"));
    }
    write_module(full.path(), "onlyfull", &header_plugin("x-only", "full"));

    env.start_controller("c1").await;
    env.start_controller("c2").await;
    let holder = eventually("a controller holds the Lease", || async {
        let h = env.lease_holder().await?;
        if h == "c1" || h == "c2" {
            Ok(h)
        } else {
            Err(format!("holderIdentity is {h:?}"))
        }
    })
    .await;
    let leader = env.controller_index(&holder);
    let other = 1 - leader;
    // p-partial talks only to the replica that does not write status: its problems reach
    // the leader through the replicas' proxy reports.
    let args = |dir: &Path| {
        vec![
            "--plugins-dir".to_owned(),
            dir.display().to_string(),
            "--plugins-poll-ms".to_owned(),
            "100".to_owned(),
        ]
    };
    env.proxy_args = args(full.path());
    env.start_proxy("p-full", &[leader]).await;
    env.proxy_args = args(partial.path());
    env.start_proxy("p-partial", &[other]).await;

    let endpoint = env.endpoint();
    env.apply(
        &[
            plugin_proxy("good", "/good", &endpoint, "hello"),
            plugin_proxy("broken", "/broken", &endpoint, "absent"),
            plugin_proxy("partial", "/partial", &endpoint, "onlyfull"),
        ]
        .join("---\n"),
    )
    .await;

    env.kubectl_wait_ready("apiproxy", "good").await;
    env.eventually_everywhere("/good/x", |a| {
        a.check_upstream("echo")?;
        a.check_header("x-hello", "world")
    })
    .await;

    let obj = env
        .wait_condition(
            "apiproxy",
            "broken",
            "Programmed",
            "False",
            Some("PluginNotFound"),
        )
        .await;
    let message = condition(&obj, "Programmed").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.starts_with("proxy p-")
            && message.contains("plugin \"absent\"")
            && message.contains("absent.wasm does not exist")
            && message.ends_with("requests get error 03"),
        "{message}"
    );
    check_condition(&obj, "Ready", "False", Some("PluginNotFound")).unwrap();
    // Accepted and resolved: the spec is fine, the proxies cannot run it.
    check_condition(&obj, "ResolvedRefs", "True", None).unwrap();
    // The condition turns False on the first proxy's report; the other may not have applied
    // the route yet (CI saw p-partial report while p-full still answered 404).
    env.eventually_everywhere("/broken/x", |a| a.check_error(3, 500, PLUGIN_OPEN))
        .await;

    // Works on p-full, not on p-partial, which only the other replica hears from.
    let obj = env
        .wait_condition(
            "apiproxy",
            "partial",
            "Programmed",
            "False",
            Some("PluginNotFound"),
        )
        .await;
    let message = condition(&obj, "Programmed").unwrap()["message"].clone();
    assert!(
        message
            .as_str()
            .unwrap()
            .starts_with("proxy p-partial: plugin \"onlyfull\""),
        "{message}"
    );
    // (A problem shows as soon as one proxy reports it; the other may still be applying.)
    let (p_full, p_partial) = (env.proxies[0].addr, env.proxies[1].addr);
    eventually("p-full runs onlyfull", || async {
        through(&env.http, p_full, "/partial/x")
            .await?
            .check_header("x-only", "full")
    })
    .await;
    through(&env.http, p_partial, "/partial/x")
        .await
        .unwrap()
        .check_error(3, 500, PLUGIN_OPEN)
        .unwrap();
    // The events tell it too.
    let events = env
        .kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=broken",
            "-o",
            "json",
        ])
        .await
        .unwrap();
    assert!(events.contains("PluginNotFound"), "{events}");

    // The module arrives on p-partial: the proxy Acks again and the condition follows.
    write_module(
        partial.path(),
        "onlyfull",
        &header_plugin("x-only", "partial"),
    );
    env.wait_condition(
        "apiproxy",
        "partial",
        "Programmed",
        "True",
        Some("Programmed"),
    )
    .await;
    env.eventually_everywhere("/partial/x", |a| a.check_upstream("echo"))
        .await;
    env.now_everywhere("/good/x", |a| a.check_header("x-hello", "world"))
        .await;
}
