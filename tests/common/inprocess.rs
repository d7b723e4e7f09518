//! The control API in process: `control::router` over a bootstrapped store in a temp dir, driven
//! with `tower::ServiceExt::oneshot`, and its answers read as [`Resp`].
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode, header};
use fhirgate::config::{Config, ConfigFile};
use fhirgate::control::bootstrap::{BootstrapReport, bootstrap};
use fhirgate::state::State;
use fhirgate::store::Store;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// The public base URL of an in-process control API.
pub const BASE: &str = "http://gw.test/";

/// The peer of a request unless a test names another: loopback, i.e. the gateway.
pub const PEER: &str = "127.0.0.1:40000";

/// A bootstrapped control API on its own store; the temp dir lives as long as it.
pub struct InProcess {
    pub state: Arc<State>,
    pub app: Router,
    pub boot: BootstrapReport,
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// On the store `store(dir)` names (e.g. `pg::store_for`), else SQLite in the temp dir;
    /// `tweak` sets more of the configuration than `base_url` ([`BASE`]) and `data_dir`.
    pub async fn start(
        store: impl FnOnce(&Path) -> Option<String>,
        tweak: impl FnOnce(&mut ConfigFile),
    ) -> InProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = store(dir.path())
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("t.db").display()));
        let store = Store::open(&url).await.expect("the store opens");
        let mut file = ConfigFile {
            base_url: Some(BASE.into()),
            store: Some(url.clone()),
            data_dir: Some(dir.path().to_path_buf()),
            // The test identity providers and JWK Sets listen on loopback.
            outbound_allow: vec!["127.0.0.0/8".into()],
            ..Default::default()
        };
        tweak(&mut file);
        let config = Config::from_file(file).expect("valid test config");
        let kek = fhirgate::sealed::KeyEncryptionKey::from_bytes(&[5; 32]).expect("a key");
        let state = State::new(
            config,
            store,
            std::sync::Arc::new(kek),
            b"test-secret-hash-key".to_vec(),
        )
        .await
        .expect("state");
        let boot = bootstrap(&state).await.expect("bootstrap");
        let app = fhirgate::control::router(state.clone());
        InProcess {
            state,
            app,
            boot,
            _dir: dir,
        }
    }

    /// Runs `req` through the router.
    pub async fn send(&self, req: Request<Body>) -> Resp {
        let resp = self
            .app
            .clone()
            .oneshot(req)
            .await
            .expect("the router answers");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .expect("the body is read")
            .to_bytes();
        Resp {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

/// A request from `peer`.
pub fn request(
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
    peer: &str,
) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let mut req = b.body(body.into()).expect("a valid request");
    let peer: SocketAddr = peer.parse().expect("a socket address");
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

/// An answer of the router.
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `details.text` of the body's first issue ("" when there is none).
    pub fn outcome_text(&self) -> String {
        super::http::outcome_text(&self.json()).to_string()
    }

    /// [`Resp::outcome_text`] of a body that must be an OperationOutcome.
    pub fn operation_outcome_text(&self) -> String {
        let v = self.json();
        assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
        super::http::outcome_text(&v).to_string()
    }

    /// `(error, error_description)` of an OAuth error body.
    pub fn oauth_error(&self) -> (String, String) {
        let v = self.json();
        (
            v["error"].as_str().unwrap_or_default().into(),
            v["error_description"].as_str().unwrap_or_default().into(),
        )
    }

    pub fn location(&self) -> String {
        self.headers
            .get(header::LOCATION)
            .unwrap_or_else(|| panic!("no Location ({}): {}", self.status, self.text))
            .to_str()
            .expect("an ASCII Location")
            .to_string()
    }
}
