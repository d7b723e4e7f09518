//! FHIR R4 vocabulary: request classification, search parameters, resources, OperationOutcomes.

pub mod classify;
pub mod outcome;
pub mod page;
pub mod patch;
pub mod path;
pub mod permission;
pub mod request;
pub mod search;
pub mod searchparam;
pub mod subset;
pub mod types;
