//! One controller, two proxies: the life of ApiProxies and MockTargets — Ready and served,
//! a missing reference reported until it appears, an edit, a deletion, and objects the API
//! server accepts but Kanali cannot use.

use http::StatusCode;
use serde_json::Value;

use crate::support::yaml::{endpoint_proxy, mock_proxy, users_mock};
use crate::support::{
    Answer, Env, NO_MOCK, NO_PROXY, check_condition, check_current, condition, eventually, http_get,
};

/// ApiProxies become Ready (all four conditions True at the current generation), `kubectl
/// wait` and `kubectl get` say so, and both proxies serve them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_api_proxies_become_ready_and_are_served_by_both_proxies() {
    let Some(env) = Env::with("ready", 1).await else {
        return;
    };
    let yaml = [
        endpoint_proxy("api", "/api", &env.endpoint(), "/v1"),
        mock_proxy("users", "/mock", "users"),
        users_mock("users"),
    ]
    .join("---\n");
    env.apply(&yaml).await;
    for (kind, name) in [
        ("apiproxy", "api"),
        ("apiproxy", "users"),
        ("mocktarget", "users"),
    ] {
        env.kubectl_wait_ready(kind, name).await;
    }

    // Ready includes Programmed: both connected proxies applied this generation, so they
    // serve it now, without waiting.
    env.now_everywhere("/api/hello?x=1", |a| a.check_echo("/v1/hello", Some("x=1")))
        .await;
    env.now_everywhere("/mock/users", Answer::check_users_mock)
        .await;

    // `kubectl get` shows the Ready printer column.
    let table = env.kubectl(&["get", "apiproxy"]).await.unwrap();
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let col = header
        .find("READY")
        .unwrap_or_else(|| panic!("no READY column in:\n{table}"));
    let mut rows = 0;
    for row in lines {
        let cell = row.get(col..).unwrap_or_default();
        assert!(
            cell.starts_with("True"),
            "READY is not True in row {row:?}:\n{table}"
        );
        rows += 1;
    }
    assert_eq!(rows, 2, "{table}");

    // The status itself.
    for (name, backend) in [
        ("api", format!("endpoint:{}", env.endpoint())),
        ("users", "mock:users".to_owned()),
    ] {
        let obj = env.get_json("apiproxy", name).await.unwrap();
        check_current(&obj).unwrap_or_else(|e| panic!("apiproxy/{name}: {e}"));
        for type_ in ["Accepted", "ResolvedRefs", "Programmed", "Ready"] {
            check_condition(&obj, type_, "True", None)
                .unwrap_or_else(|e| panic!("apiproxy/{name}: {e}"));
        }
        assert_eq!(obj["status"]["backend"], backend.as_str(), "{name}");
        let programmed = condition(&obj, "Programmed").unwrap();
        assert_eq!(
            programmed["message"],
            format!(
                "2 of 2 connected proxies applied generation {}",
                obj["metadata"]["generation"]
            ),
            "apiproxy/{name}"
        );
    }
}

/// A missing MockTarget is reported on the ApiProxy (and requests get error 02) until it is
/// created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_mock_target_is_reported_until_it_is_created() {
    let Some(env) = Env::with("missing-mock", 1).await else {
        return;
    };
    env.apply(&mock_proxy("orders", "/orders", "orders-mock"))
        .await;
    let obj = env
        .wait_condition(
            "apiproxy",
            "orders",
            "Ready",
            "False",
            Some("MockTargetNotFound"),
        )
        .await;
    let ready = condition(&obj, "Ready").unwrap();
    let named = format!("MockTarget {}/orders-mock", env.ns);
    assert!(
        ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&named),
        "the message names {named}: {ready}"
    );
    check_condition(&obj, "ResolvedRefs", "False", Some("MockTargetNotFound")).unwrap();
    check_condition(&obj, "Accepted", "True", None).unwrap();
    env.eventually_everywhere("/orders/1", |a| a.check_error(2, 404, NO_MOCK))
        .await;
    // `kubectl describe` shows a Warning event for it.
    eventually("a MockTargetNotFound Warning event", || async {
        let out = env
            .kubectl(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=orders",
                "-o",
                "json",
            ])
            .await?;
        let events: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let found = events["items"].as_array().into_iter().flatten().any(|e| {
            e["type"] == "Warning"
                && e["reason"] == "MockTargetNotFound"
                && e["involvedObject"]["kind"] == "ApiProxy"
        });
        if found {
            Ok(())
        } else {
            Err(format!("events: {}", events["items"]))
        }
    })
    .await;

    env.apply(
        r#"apiVersion: kanali.io/v2
kind: MockTarget
metadata: {name: orders-mock}
spec:
  routes:
  - path: /
    status: 200
    headers: {content-type: text/plain}
    body: "all orders"
"#,
    )
    .await;
    env.kubectl_wait_ready("apiproxy", "orders").await;
    let obj = env.get_json("apiproxy", "orders").await.unwrap();
    check_condition(&obj, "ResolvedRefs", "True", Some("ResolvedRefs")).unwrap();
    env.eventually_everywhere("/orders/1", |a| {
        if a.status == StatusCode::OK && a.text() == "all orders" {
            Ok(())
        } else {
            Err(format!("wanted the orders mock, got {}", a.describe()))
        }
    })
    .await;
}

/// An edit of `source.path` is observed (new generation) and served by both proxies; the old
/// path answers error 00.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_source_path_is_observed_and_served_by_both_proxies() {
    let Some(env) = Env::with("edit", 1).await else {
        return;
    };
    env.apply(&endpoint_proxy("api", "/old", &env.endpoint(), "/"))
        .await;
    env.kubectl_wait_ready("apiproxy", "api").await;
    env.now_everywhere("/old/x", |a| a.check_echo("/x", None))
        .await;
    let before = env.get_json("apiproxy", "api").await.unwrap();
    let g1 = check_current(&before).unwrap();

    env.kubectl(&[
        "patch",
        "apiproxy",
        "api",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"source":{"path":"/new"}}}"#,
    ])
    .await
    .unwrap();
    let g2 = env.get_json("apiproxy", "api").await.unwrap()["metadata"]["generation"]
        .as_i64()
        .unwrap();
    assert!(g2 > g1, "the edit made a new generation ({g1} -> {g2})");
    let obj = eventually("status.observedGeneration advances", || async {
        let obj = env.get_json("apiproxy", "api").await?;
        if obj["metadata"]["generation"].as_i64() != Some(g2) {
            return Err(format!("generation moved on: {}", obj["metadata"]));
        }
        check_condition(&obj, "Ready", "True", None)?;
        Ok(obj)
    })
    .await;
    assert_eq!(obj["status"]["observedGeneration"], g2);
    // Programmed at g2: both proxies already serve it.
    env.now_everywhere("/new/x", |a| a.check_echo("/x", None))
        .await;
    env.now_everywhere("/old/x", |a| a.check_error(0, 404, NO_PROXY))
        .await;
}

/// Objects the 1.20 API server accepts but Kanali cannot use are reported `Accepted=False`
/// (reason Invalid, with why), and nothing else is disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_objects_are_reported_and_do_not_disturb_other_routes() {
    let Some(mut env) = Env::with("malformed", 1).await else {
        return;
    };
    env.apply(&endpoint_proxy("api", "/api", &env.endpoint(), "/"))
        .await;
    env.kubectl_wait_ready("apiproxy", "api").await;

    let bad = format!(
        r#"{spaced}---
apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: wildcard}}
spec:
  source: {{path: /wild, virtualHost: "*.example.org"}}
  target: {{backend: {{endpoint: "{endpoint}"}}}}
---
apiVersion: kanali.io/v2
kind: ApiKeyBinding
metadata: {{name: badregex}}
spec:
  keys:
  - name: somekey
    subpaths:
    - path: "/foo("
      rule: {{global: true}}
"#,
        spaced = endpoint_proxy("spaced", "/a b", &env.endpoint(), "/"),
        endpoint = env.endpoint(),
    );
    env.apply(&bad).await;

    for (kind, name, says) in [
        ("apiproxy", "spaced", vec!["spec.source.path", "\"/a b\""]),
        (
            "apiproxy",
            "wildcard",
            vec!["spec.source.virtualHost", "wildcards are not supported"],
        ),
        (
            "apikeybinding",
            "badregex",
            vec!["\"/foo(\"", "is not a valid regular expression"],
        ),
    ] {
        let obj = env
            .wait_condition(kind, name, "Accepted", "False", Some("Invalid"))
            .await;
        let message = condition(&obj, "Accepted").unwrap()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        for s in says {
            assert!(
                message.contains(s),
                "{kind}/{name}: {s:?} not in {message:?}"
            );
        }
        check_condition(&obj, "Ready", "False", Some("Invalid"))
            .unwrap_or_else(|e| panic!("{kind}/{name}: {e}"));
    }

    // The controller is still running and ready, and still compiles new objects.
    let c = &mut env.controllers[0];
    assert!(c.exited().is_none(), "the controller exited");
    let ready = http_get(&env.http, c.admin, "/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{}", ready.describe());
    env.apply(&endpoint_proxy(
        "after",
        "/after",
        &env.endpoint(),
        "/later",
    ))
    .await;
    env.kubectl_wait_ready("apiproxy", "after").await;

    env.now_everywhere("/api/x", |a| a.check_echo("/x", None))
        .await;
    env.now_everywhere("/after/x", |a| a.check_echo("/later/x", None))
        .await;
    // The invalid ones route nothing.
    env.now_everywhere("/wild", |a| a.check_error(0, 404, NO_PROXY))
        .await;
    env.now_everywhere("/a%20b", |a| a.check_error(0, 404, NO_PROXY))
        .await;
}

/// A deleted ApiProxy's route disappears from every proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_api_proxy_disappears_from_every_proxy() {
    let Some(env) = Env::with("delete", 1).await else {
        return;
    };
    let yaml = [
        endpoint_proxy("api", "/api", &env.endpoint(), "/"),
        endpoint_proxy("keep", "/keep", &env.endpoint(), "/kept"),
    ]
    .join("---\n");
    env.apply(&yaml).await;
    env.kubectl_wait_ready("apiproxy", "api").await;
    env.kubectl_wait_ready("apiproxy", "keep").await;
    env.now_everywhere("/api/x", |a| a.check_echo("/x", None))
        .await;

    env.kubectl(&["delete", "apiproxy", "api", "--wait=true"])
        .await
        .unwrap();
    env.eventually_everywhere("/api/x", |a| a.check_error(0, 404, NO_PROXY))
        .await;
    env.now_everywhere("/keep/x", |a| a.check_echo("/kept/x", None))
        .await;
    eventually("the controller forgets the deleted object", || async {
        let status = env.controller_status(0).await?;
        let names: Vec<&Value> = status["objects"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| &o["object"]["name"])
            .collect();
        if names.iter().any(|n| *n == "api") {
            Err(format!("objects: {names:?}"))
        } else {
            Ok(())
        }
    })
    .await;
}
