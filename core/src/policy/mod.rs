//! Medplum AccessPolicy semantics: wire model, effective policy, SMART scopes, IP rules,
//! decisions and response filtering.

pub mod criteria;
pub mod model;
