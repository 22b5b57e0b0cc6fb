//! Upstream TLS from a Secret (issue #4): a private CA, an upstream that requires a client
//! certificate from it, and a Secret whose changes reach running proxies — broken material is
//! reported on the ApiProxy and answered with its error code, and fixed material is used again
//! without a restart.

use kanali_e2e::tls::{Ca, Issued, start_tls_echo, start_tls_echo_on};

use crate::support::yaml::{endpoints, service, service_proxy, tls_endpoint_proxy, tls_secret};
use crate::support::{
    Answer, BAD_KEY_PAIR, Env, NO_SECRET, NO_UPSTREAM, check_condition, condition, test_host,
};

const SECRET: &str = "upstream-tls";

/// The two ApiProxies under test and the path each serves: one to an `https://127.0.0.1:port`
/// endpoint (server name: the IP), one to a Service (server name: its cluster DNS name).
const ROUTES: [(&str, &str); 2] = [("by-endpoint", "/endpoint"), ("by-service", "/service")];

/// Whether the TLS echo answered `GET /x` over a connection on which the proxy presented a
/// client certificate from the CA (the echo refuses connections without one).
fn check_mtls_echo(a: &Answer) -> Result<(), String> {
    a.check_upstream("tls-echo")?;
    a.check_echo("/x", None)?;
    a.check_header("x-echo-client-cert", "present")?;
    // The upstream offers h2 by ALPN, so the proxy speaks HTTP/2 to it.
    a.check_header("x-echo-version", "HTTP/2.0")
}

fn secret(enabled: bool, ca: &Ca, client: &Issued, key_pem: &str) -> String {
    tls_secret(SECRET, enabled, &ca.cert_pem(), &client.cert_pem, key_pem)
}

/// Ready, then 08, 07 and 06 as the Secret is broken in three ways, then Ready again with
/// rotated material — all on the same proxy processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_follows_its_secret_without_restarts() {
    let Some(mut env) = Env::with("upstream-tls", 1).await else {
        return;
    };
    let ca = Ca::new("kanali-e2e upstream CA");
    let service_dns = format!("secure.{}.svc.cluster.local", env.ns);
    let server = ca.issue_server(&["127.0.0.1", &service_dns]);
    let upstream = start_tls_echo(&server, Some(&ca), &["h2", "http/1.1"]).await;
    // Endpoints cannot name 127.0.0.1: the Service leads to the same upstream on a test host.
    let host = test_host();
    let behind_service = start_tls_echo_on(
        host.listen(0).unwrap(),
        &server,
        Some(&ca),
        &["h2", "http/1.1"],
    );
    let relayed = behind_service.addr;
    let client = ca.issue_client("kanali-proxy");
    let endpoint = format!("https://127.0.0.1:{}", upstream.addr.port());
    let yaml = [
        secret(true, &ca, &client, &client.key_pem),
        tls_endpoint_proxy("by-endpoint", "/endpoint", &endpoint, SECRET),
        service("secure", &[("app", "secure")], 443, relayed.port()),
        endpoints("secure", relayed.ip(), relayed.port()),
        service_proxy("by-service", "/service", "secure", 443, Some(SECRET)),
    ]
    .join("---\n");
    env.apply(&yaml).await;

    for (name, path) in ROUTES {
        env.kubectl_wait_ready("apiproxy", name).await;
        let obj = env.get_json("apiproxy", name).await.unwrap();
        let message = condition(&obj, "ResolvedRefs").unwrap()["message"].clone();
        let named = format!("TLS from Secret {}/{SECRET}", env.ns);
        assert!(
            message.as_str().unwrap_or_default().contains(&named),
            "apiproxy/{name}: {message} names {named}"
        );
        // Ready includes Programmed: both proxies serve it now.
        env.now_everywhere(&format!("{path}/x"), check_mtls_echo)
            .await;
    }

    // A CA that did not sign the upstream's certificate: the material is valid, so the
    // reference resolves, but no handshake succeeds.
    let stranger = Ca::new("another CA");
    env.apply(&tls_secret(
        SECRET,
        true,
        &stranger.cert_pem(),
        &client.cert_pem,
        &client.key_pem,
    ))
    .await;
    for (name, path) in ROUTES {
        env.eventually_everywhere(&format!("{path}/x"), |a| a.check_error(8, 502, NO_UPSTREAM))
            .await;
        let obj = env.get_json("apiproxy", name).await.unwrap();
        check_condition(&obj, "ResolvedRefs", "True", None)
            .unwrap_or_else(|e| panic!("apiproxy/{name}: {e}"));
    }

    // A key that does not belong to the certificate: 07.
    let other = ca.issue_client("someone-else");
    env.apply(&secret(true, &ca, &client, &other.key_pem)).await;
    for (name, path) in ROUTES {
        let obj = env
            .wait_condition(
                "apiproxy",
                name,
                "ResolvedRefs",
                "False",
                Some("InvalidKeyPair"),
            )
            .await;
        check_condition(&obj, "Ready", "False", None)
            .unwrap_or_else(|e| panic!("apiproxy/{name}: {e}"));
        env.eventually_everywhere(&format!("{path}/x"), |a| {
            a.check_error(7, 500, BAD_KEY_PAIR)
        })
        .await;
    }

    // The Secret no longer opts in: 06.
    env.kubectl(&["annotate", "secret", SECRET, "kanali.io/enabled-"])
        .await
        .unwrap();
    for (name, path) in ROUTES {
        let obj = env
            .wait_condition(
                "apiproxy",
                name,
                "ResolvedRefs",
                "False",
                Some("SecretNotEnabled"),
            )
            .await;
        check_condition(&obj, "Ready", "False", None)
            .unwrap_or_else(|e| panic!("apiproxy/{name}: {e}"));
        env.eventually_everywhere(&format!("{path}/x"), |a| a.check_error(6, 500, NO_SECRET))
            .await;
    }

    // Restored, with a newly issued client certificate: served again by the same processes.
    let rotated = ca.issue_client("kanali-proxy-rotated");
    env.apply(&secret(true, &ca, &rotated, &rotated.key_pem))
        .await;
    for (name, path) in ROUTES {
        env.wait_condition("apiproxy", name, "Ready", "True", None)
            .await;
        env.eventually_everywhere(&format!("{path}/x"), check_mtls_echo)
            .await;
    }
    for p in &mut env.proxies {
        assert!(p.exited().is_none(), "{} exited", p.name);
    }
}
