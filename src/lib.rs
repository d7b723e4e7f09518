//! fhirgate
