//! Service backends (issue #4): a fixed Service reaches the addresses of its Endpoints, and a
//! dynamic one picks the Service whose labels match the request's header (or the proxies'
//! default for it). The API server runs no endpoints controller, so the Services have no
//! selector and their Endpoints are written by the test.

use kanali_e2e::start_echo_on;

use crate::support::yaml::{Label, dynamic_service_proxy, endpoints, service, service_proxy};
use crate::support::{Answer, Env, NO_SERVICE, condition, test_host};

/// Requests with `x-track: canary` reach the canary Service's upstream, `stable` and no header
/// (the proxies' `--default-header-value x-track=stable`) the stable one, anything else error
/// 10; a fixed Service follows its Endpoints; a missing one is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_backends_follow_endpoints_and_dynamic_ones_the_request_header() {
    let Some(env) =
        Env::with_proxy_args("services", 1, &["--default-header-value", "x-track=stable"]).await
    else {
        return;
    };
    let host = test_host();
    let ip = host.ip();
    let stable = start_echo_on(host.listen(0).unwrap(), "stable").unwrap();
    let canary = start_echo_on(host.listen(0).unwrap(), "canary").unwrap();
    let plain = start_echo_on(host.listen(0).unwrap(), "plain").unwrap();
    let yaml = [
        service(
            "shop-stable",
            &[("app", "shop"), ("track", "stable")],
            80,
            stable.addr.port(),
        ),
        endpoints("shop-stable", ip, stable.addr.port()),
        service(
            "shop-canary",
            &[("app", "shop"), ("track", "canary")],
            80,
            canary.addr.port(),
        ),
        endpoints("shop-canary", ip, canary.addr.port()),
        service("plain", &[("app", "plain")], 8080, plain.addr.port()),
        endpoints("plain", ip, plain.addr.port()),
        dynamic_service_proxy(
            "shop",
            "/shop",
            &[
                ("app", Label::Value("shop")),
                ("track", Label::Header("x-track")),
            ],
            80,
        ),
        dynamic_service_proxy(
            "any-shop",
            "/any-shop",
            &[("app", Label::Value("shop"))],
            80,
        ),
        service_proxy("plain", "/plain", "plain", 8080, None),
        service_proxy("ghost", "/ghost", "nowhere", 80, None),
    ]
    .join("---\n");
    env.apply(&yaml).await;

    // What the controller says.
    for name in ["shop", "any-shop", "plain"] {
        env.kubectl_wait_ready("apiproxy", name).await;
    }
    let obj = env.get_json("apiproxy", "shop").await.unwrap();
    let message = condition(&obj, "ResolvedRefs").unwrap()["message"].clone();
    assert!(
        message
            .as_str()
            .unwrap_or_default()
            .starts_with("2 Service(s)"),
        "apiproxy/shop: {message} counts both candidates"
    );
    let obj = env
        .wait_condition(
            "apiproxy",
            "ghost",
            "ResolvedRefs",
            "False",
            Some("ServiceNotFound"),
        )
        .await;
    let message = condition(&obj, "ResolvedRefs").unwrap()["message"].clone();
    let named = format!("Service {}/nowhere", env.ns);
    assert!(
        message.as_str().unwrap_or_default().contains(&named),
        "apiproxy/ghost: {message} names {named}"
    );

    // What the proxies do. Ready includes Programmed, so both serve it now.
    let track = |value| [("x-track", value)];
    env.now_everywhere_with("/shop/x", &track("canary"), |a| {
        a.check_upstream("canary")?;
        a.check_echo("/x", None)
    })
    .await;
    env.now_everywhere_with("/shop/x", &track("stable"), |a| a.check_upstream("stable"))
        .await;
    env.now_everywhere("/shop/x", |a| a.check_upstream("stable"))
        .await;
    env.now_everywhere_with("/shop/x", &track("beta"), |a| {
        a.check_error(10, 500, NO_SERVICE)
    })
    .await;
    // Two matches: the first by name, and the header says how many.
    env.now_everywhere("/any-shop/x", |a| {
        a.check_upstream("canary")?;
        a.check_header("x-kanali-service-cardinality", "2")
    })
    .await;
    env.now_everywhere("/plain/x", |a| {
        a.check_upstream("plain")?;
        a.check_echo("/x", None)
    })
    .await;
    env.eventually_everywhere("/ghost/x", |a| a.check_error(10, 500, NO_SERVICE))
        .await;

    // The fixed Service's Endpoints move to another upstream.
    let moved = start_echo_on(host.listen(0).unwrap(), "moved").unwrap();
    env.apply(&endpoints("plain", ip, moved.addr.port())).await;
    env.eventually_everywhere("/plain/x", |a| a.check_upstream("moved"))
        .await;

    // The canary Service goes away: its header value matches nothing, and the label-only
    // backend has one match left.
    env.kubectl(&["delete", "service", "shop-canary", "--wait=true"])
        .await
        .unwrap();
    env.eventually_everywhere_with("/shop/x", &track("canary"), |a| {
        a.check_error(10, 500, NO_SERVICE)
    })
    .await;
    env.eventually_everywhere("/any-shop/x", |a: &Answer| {
        a.check_upstream("stable")?;
        match a.headers.get("x-kanali-service-cardinality") {
            None => Ok(()),
            Some(v) => Err(format!(
                "one match, yet x-kanali-service-cardinality: {v:?}"
            )),
        }
    })
    .await;
    env.now_everywhere("/shop/x", |a| a.check_upstream("stable"))
        .await;
}
