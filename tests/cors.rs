#![allow(clippy::unwrap_used, clippy::expect_used)]
//! CORS for browser apps (issue 11), through the real gateway: preflights on discovery, the
//! token endpoint, `/auth/*`, metadata and FHIR paths are answered before authentication and
//! never reach the upstream; admitted origins get their CORS headers on every answer (the
//! gateway's own 401s included), others get none; `cors_origins` narrows or opens the default
//! (the origins of the registered clients).

mod common;

use common::gateway::TestGateway;
use common::http::rt;
use common::people::seed_client;
use common::upstream::FhirUpstream;
use reqwest::Method;
use serde_json::json;

const APP: &str = "http://app.example:3000";

async fn preflight(gw: &TestGateway, path: &str, origin: &str) -> reqwest::Response {
    TestGateway::client()
        .request(Method::OPTIONS, format!("{}{path}", gw.base))
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

#[test]
fn browser_apps_of_registered_clients_get_cors_and_nothing_else_changes() {
    let upstream = FhirUpstream::start();
    let gw = TestGateway::start(&upstream.base_url);
    let (client, secret) = seed_client(
        &gw,
        None,
        json!({"redirectUris": [format!("{APP}/callback")]}),
        None,
    );
    rt().block_on(async {
        upstream.reset();
        for path in [
            "fhir/R4/Patient",
            "fhir/R4/metadata",
            ".well-known/smart-configuration",
            "fhir/R4/.well-known/smart-configuration",
            "oauth2/token",
            "auth/me",
        ] {
            let r = preflight(&gw, path, APP).await;
            assert_eq!(r.status(), 204, "{path}");
            assert_eq!(
                header(&r, "access-control-allow-origin"),
                Some(APP),
                "{path}"
            );
            assert_eq!(header(&r, "access-control-allow-credentials"), Some("true"));
            assert!(
                header(&r, "access-control-allow-methods")
                    .unwrap()
                    .contains("POST")
            );
            assert_eq!(
                header(&r, "access-control-allow-headers"),
                Some("authorization, content-type")
            );
            assert_eq!(header(&r, "vary"), Some("Origin"));
            // An origin no client registered gets no CORS answer.
            let r = preflight(&gw, path, "http://evil.example").await;
            assert_eq!(r.status(), 403, "{path}");
            assert_eq!(header(&r, "access-control-allow-origin"), None);
        }
        // Preflights never travel to the upstream.
        assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());

        // Real requests: the answer is readable by the page, whoever wrote it.
        let token = gw.token(&client, &secret, None).await;
        let http = TestGateway::client();
        let read = http
            .get(format!("{}Patient", gw.fhir))
            .header("origin", APP)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 200);
        assert_eq!(header(&read, "access-control-allow-origin"), Some(APP));
        assert!(
            header(&read, "access-control-expose-headers")
                .unwrap()
                .contains("ETag")
        );
        let unauthenticated = http
            .get(format!("{}Patient", gw.fhir))
            .header("origin", APP)
            .send()
            .await
            .unwrap();
        assert_eq!(unauthenticated.status(), 401);
        assert_eq!(
            header(&unauthenticated, "access-control-allow-origin"),
            Some(APP)
        );
        let tokens = http
            .post(format!("{}oauth2/token", gw.base))
            .header("origin", APP)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client.as_str()),
                ("client_secret", secret.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(tokens.status(), 200);
        assert_eq!(header(&tokens, "access-control-allow-origin"), Some(APP));
        let discovery = http
            .get(format!("{}.well-known/smart-configuration", gw.base))
            .header("origin", APP)
            .send()
            .await
            .unwrap();
        assert_eq!(header(&discovery, "access-control-allow-origin"), Some(APP));
        // Without an Origin, or from another origin: no CORS headers.
        let plain = http
            .get(format!("{}Patient", gw.fhir))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(header(&plain, "access-control-allow-origin"), None);
        let foreign = http
            .get(format!("{}Patient", gw.fhir))
            .header("origin", "http://evil.example")
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(foreign.status(), 200);
        assert_eq!(header(&foreign, "access-control-allow-origin"), None);
        // An OPTIONS that is not a preflight is an ordinary request: authenticated first.
        let options = http
            .request(Method::OPTIONS, format!("{}Patient", gw.fhir))
            .header("origin", APP)
            .send()
            .await
            .unwrap();
        assert_eq!(options.status(), 401);
    });
}

#[test]
fn cors_origins_narrows_the_default_or_opens_it_without_credentials() {
    let upstream = FhirUpstream::start();
    let listed = TestGateway::start_with(&upstream.base_url, |c| {
        c.cors_origins = vec!["https://portal.example".into()]
    });
    // A registered client's origin is not enough once the operator lists origins.
    seed_client(
        &listed,
        None,
        json!({"redirectUris": [format!("{APP}/callback")]}),
        None,
    );
    let any = TestGateway::start_with(&upstream.base_url, |c| c.cors_origins = vec!["*".into()]);
    rt().block_on(async {
        let r = preflight(&listed, "oauth2/token", "https://portal.example").await;
        assert_eq!(r.status(), 204);
        assert_eq!(
            header(&r, "access-control-allow-origin"),
            Some("https://portal.example")
        );
        let r = preflight(&listed, "oauth2/token", APP).await;
        assert_eq!(r.status(), 403);

        let r = preflight(&any, "fhir/R4/Patient", "http://anywhere.example").await;
        assert_eq!(r.status(), 204);
        assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
        assert_eq!(header(&r, "access-control-allow-credentials"), None);
    });
    // A value that is not an origin stops the start.
    let bad = fhirgate::config::Config::from_file(fhirgate::config::ConfigFile {
        cors_origins: vec!["https://portal.example/path".into()],
        ..Default::default()
    });
    assert!(bad.unwrap_err().to_string().contains("cors_origins"));
}
