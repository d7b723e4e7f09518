//! Medplum AccessPolicy semantics: wire model, effective policy, SMART scopes, IP rules,
//! decisions and response filtering.

pub mod compiled;
pub mod criteria;
pub mod decide;
pub mod effective;
pub mod fhirpath;
pub mod filter;
pub mod ip;
pub mod isolation;
pub mod model;
pub mod scope;
pub mod write;

pub use effective::EffectivePolicy;
