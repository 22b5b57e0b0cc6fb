//! Several controller replicas: the Lease moves when its holder dies, proxies move to a
//! surviving replica without failing a request, and `Programmed`/`Ready` mean what the
//! connected proxies actually serve, whichever replica they chose.

use std::time::Duration;

use tokio::time::Instant;

use crate::support::yaml::{endpoint_proxy, mock_proxy, users_mock};
use crate::support::{Answer, Env, FakeProxy, NO_MOCK, condition, eventually, http_get, through};

/// Applies an ApiProxy on `/api` to the echo (upstream path `target`), one on `/mock` to the
/// `users` MockTarget, and that MockTarget; waits until every proxy serves both.
async fn serve_api_and_users_mock(env: &Env, target: &str) {
    let yaml = [
        endpoint_proxy("api", "/api", &env.endpoint(), target),
        mock_proxy("users", "/mock", "users"),
        users_mock("users"),
    ]
    .join("---\n");
    env.apply(&yaml).await;
    let upstream_path = format!("{}/x", target.trim_end_matches('/'));
    env.eventually_everywhere("/api/x", |a| a.check_echo(&upstream_path, None))
        .await;
    env.eventually_everywhere("/mock/users", Answer::check_users_mock)
        .await;
}

/// Two replicas: kill -9 the Lease holder; the other takes the Lease, keeps writing status,
/// and the proxies move to it and serve the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_surviving_replica_takes_the_lease_and_keeps_status_and_proxies_current() {
    let Some(mut env) = Env::with("failover", 2).await else {
        return;
    };
    serve_api_and_users_mock(&env, "/").await;
    let holder = eventually("a controller holds the Lease", || async {
        let h = env.lease_holder().await?;
        if h == "c1" || h == "c2" {
            Ok(h)
        } else {
            Err(format!("holderIdentity is {h:?}"))
        }
    })
    .await;
    // The leader writes status (Ready may also depend on which replica the proxies chose).
    env.wait_condition("apiproxy", "users", "ResolvedRefs", "True", None)
        .await;

    let dead = env.controller_index(&holder);
    let survivor_name = if holder == "c1" { "c2" } else { "c1" };
    let survivor = env.controller_index(survivor_name);
    // Each replica's /metrics says which one leads.
    let leaders = |expected: [f64; 2]| {
        let env = &env;
        async move {
            let mut found = [0.0; 2];
            for (i, f) in found.iter_mut().enumerate() {
                *f = env.controller_metric(i, "kanali_controller_leader").await?;
            }
            if found == expected {
                Ok(())
            } else {
                Err(format!(
                    "kanali_controller_leader {found:?}, not {expected:?}"
                ))
            }
        }
    };
    let mut expected = [0.0; 2];
    expected[dead] = 1.0;
    eventually("the holder's /metrics says it leads", || leaders(expected)).await;
    // The binary counts what it logs (at least "taking the lease", at info).
    let info = env
        .controller_metric(dead, "kanali_log_count{level=\"info\"}")
        .await
        .unwrap();
    assert!(info >= 1.0, "kanali_log_count{{level=\"info\"}} is {info}");
    env.controllers[dead].kill();

    env.wait_lease_holder(survivor_name).await;
    eventually("the survivor's /metrics says it leads", || async {
        match env
            .controller_metric(survivor, "kanali_controller_leader")
            .await
        {
            Ok(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Status writes continue: break the MockTarget reference.
    env.kubectl(&[
        "patch",
        "apiproxy",
        "users",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"target":{"backend":{"mock":{"mockTargetName":"gone"}}}}}"#,
    ])
    .await
    .unwrap();
    let obj = env
        .wait_condition(
            "apiproxy",
            "users",
            "Ready",
            "False",
            Some("MockTargetNotFound"),
        )
        .await;
    let named = format!("MockTarget {}/gone", env.ns);
    let message = condition(&obj, "ResolvedRefs").unwrap()["message"].clone();
    assert!(
        message.as_str().unwrap_or_default().contains(&named),
        "{message} names {named}"
    );

    // Both proxies are on the survivor now, and serve the change.
    eventually("the survivor sees both proxies connected", || async {
        let status = env.controller_status(survivor).await?;
        let proxies = &status["proxies"];
        if proxies["p1"]["connected"] == true && proxies["p2"]["connected"] == true {
            Ok(())
        } else {
            Err(format!("proxies: {proxies}"))
        }
    })
    .await;
    env.eventually_everywhere("/mock/users", |a| a.check_error(2, 404, NO_MOCK))
        .await;
    env.now_everywhere("/api/b", |a| a.check_echo("/b", None))
        .await;
    // With every proxy on the leader, the healthy route is Ready (Programmed 2 of 2).
    env.wait_condition("apiproxy", "api", "Ready", "True", None)
        .await;
}

/// The controllers die under steady traffic: not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_while_the_controllers_die() {
    let Some(mut env) = Env::with("no-controller", 2).await else {
        return;
    };
    serve_api_and_users_mock(&env, "/v1").await;

    let start = Instant::now();
    let kill_at = [300usize, 900];
    let mut killed = 0;
    let mut last_kill = 0;
    let mut failures: Vec<String> = Vec::new();
    let mut i = 0usize;
    loop {
        // Kill at a request count, or by time on a slow machine: both kills always happen.
        if killed < kill_at.len()
            && (i >= kill_at[killed]
                || start.elapsed() > Duration::from_secs(3 + 3 * killed as u64))
        {
            env.controllers[killed].kill();
            killed += 1;
            last_kill = i;
        }
        let done = i >= 2000 || start.elapsed() > Duration::from_secs(10);
        if killed == kill_at.len() && done && i >= last_kill + 200 {
            break;
        }
        let p = env.proxies[i % 2].addr;
        let result = if i.is_multiple_of(3) {
            through(&env.http, p, "/mock/users")
                .await
                .and_then(|a| a.check_users_mock())
        } else {
            let path = format!("/api/r/{i}");
            through(&env.http, p, &path)
                .await
                .and_then(|a| a.check_echo(&format!("/v1/r/{i}"), None))
        };
        if let Err(e) = result {
            failures.push(format!("request {i} via {p}: {e}"));
        }
        i += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {i} requests failed while the controllers died; first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    for p in &env.proxies {
        let ready = http_get(&env.http, p.admin, "/readyz").await.unwrap();
        assert_eq!(
            ready.status,
            200,
            "{} /readyz: {}",
            p.name,
            ready.describe()
        );
    }
    eprintln!("{i} requests, none failed");
}

/// Two replicas, and the proxies happen to be connected only to the one that does not hold the
/// Lease (with a Service in front of two replicas, each proxy picks one): the route is served
/// everywhere, so it must become Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_does_not_depend_on_which_replica_the_proxies_chose() {
    let Some(mut env) = Env::new("replica-choice").await else {
        return;
    };
    env.start_controller("c1").await;
    env.wait_lease_holder("c1").await;
    let follower = env.start_controller("c2").await;
    env.start_proxy("p1", &[follower]).await;
    env.start_proxy("p2", &[follower]).await;
    env.apply(&endpoint_proxy("api", "/api", &env.endpoint(), "/"))
        .await;
    env.eventually_everywhere("/api/x", |a| a.check_echo("/x", None))
        .await;
    env.wait_condition("apiproxy", "api", "Ready", "True", None)
        .await;
}

/// `Programmed` (and so `Ready`) must mean the proxies serve what the status says: when a
/// MockTarget appears, the ApiProxy using it is not Programmed before the connected proxies
/// applied the snapshot in which the reference resolves (until then they answer error 02).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programmed_waits_for_the_snapshot_that_resolves_a_reference() {
    let Some(mut env) = Env::new("lagging").await else {
        return;
    };
    let c = env.start_controller("c1").await;
    env.wait_lease_holder("c1").await;
    let mut laggard = FakeProxy::open(env.controllers[c].addr, "laggard").await;
    let first = laggard.snapshot_where(|_| true).await;
    laggard.ack(&first.version).await;

    env.apply(&mock_proxy("orders", "/orders", "orders-mock"))
        .await;
    let failing = laggard
        .snapshot_where(|s| s.routes.iter().any(|r| r.path == "/orders"))
        .await;
    laggard.ack(&failing.version).await;
    env.wait_condition(
        "apiproxy",
        "orders",
        "ResolvedRefs",
        "False",
        Some("MockTargetNotFound"),
    )
    .await;
    env.wait_condition("apiproxy", "orders", "Programmed", "True", None)
        .await;

    // The MockTarget appears; the proxy receives the new snapshot but has not applied it yet.
    env.apply(&users_mock("orders-mock")).await;
    let resolved = laggard
        .snapshot_where(|s| s.version != failing.snapshot.version)
        .await;
    let obj = env
        .wait_condition("apiproxy", "orders", "ResolvedRefs", "True", None)
        .await;
    let programmed = condition(&obj, "Programmed").unwrap();
    let ready = condition(&obj, "Ready").unwrap();
    assert!(
        programmed["status"] != "True" && ready["status"] != "True",
        "the only proxy still serves {} (where /orders answers error 02), not {}, yet: {programmed} {ready}",
        failing.version,
        resolved.version
    );
}
