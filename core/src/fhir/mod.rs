//! FHIR R4 vocabulary: request classification, search parameters, resources, OperationOutcomes.

pub mod outcome;
pub mod request;
