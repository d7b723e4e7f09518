//! fhirgate: an authorization gateway for FHIR servers. See ARCHITECTURE.md for the map.

pub mod allocator;
pub mod cli;
pub mod config;
pub mod control;
pub mod email;
pub mod explain;
pub mod feed;
pub mod gateway;
pub mod net;
pub mod obs;
pub mod outbound;
pub mod password_policy;
pub mod policies_dir;
pub mod sealed;
pub mod server;
pub mod state;
pub mod store;
pub mod tokens;
pub mod upstream_headers;
