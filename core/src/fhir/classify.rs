//! Request classification (in progress).

use super::request::{FhirRequest, RequestParts, Unclassifiable};

/// Classifies a raw request.
pub fn classify(_parts: &RequestParts) -> Result<FhirRequest, Unclassifiable> {
    Err(Unclassifiable::Unsupported)
}
