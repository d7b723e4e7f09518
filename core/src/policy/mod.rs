//! Medplum AccessPolicy semantics: wire model, effective policy, SMART scopes, IP rules,
//! decisions and response filtering.

pub mod criteria;
pub mod model;
pub mod compiled;
pub mod effective;
pub mod ip;
pub mod scope;

pub use effective::EffectivePolicy;
