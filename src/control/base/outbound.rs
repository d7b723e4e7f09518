//! Calls from the control API to services outside fhirgate — external identity providers,
//! clients' JWK Sets, reCAPTCHA, the breached-password service. One way to make them: no
//! redirect is followed, the whole call has a deadline, and an answer is read only up to a
//! bound.

use std::time::Duration;

/// An HTTP client for outside calls; `None` only if TLS cannot be set up (the call then fails).
pub fn client(timeout: Duration) -> Option<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .ok()
}

/// The body of `resp`, or `None` when it is longer than `max` bytes or cannot be read.
pub async fn read_bounded(mut resp: reqwest::Response, max: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.ok()? {
        if body.len() + chunk.len() > max {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}
