//! fhirgate-core: the pure heart of fhirgate.
//!
//! Request classification, AccessPolicy compilation, decisions, criteria matching and response
//! filtering are plain functions over data. Invariant: nothing in this crate does I/O, reads the
//! clock or the environment, or depends on tokio, pingora, axum or sqlx. Time, when needed, is a
//! parameter.

#![forbid(unsafe_code)]

pub mod fhir;
pub mod policy;
