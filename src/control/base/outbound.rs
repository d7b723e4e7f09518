//! Calls from the control API to services outside fhirgate — external identity providers,
//! clients' JWK Sets, reCAPTCHA, the breached-password service. One way to make them: one
//! client held in `ControlState::outbound`, no redirect is followed, the whole call has a
//! deadline, and an answer is read only up to a bound.

/// The HTTP client of outside calls, built once at start (`ControlState::outbound`). It
/// follows no redirect; each call sets its own deadline (`RequestBuilder::timeout`).
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
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
