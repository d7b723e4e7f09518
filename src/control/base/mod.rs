//! Shared rules and lookups of the control API, below the Login lifecycle and the handlers:
//! the caller and its access, users, passwords, one-time links, guards, clients and their
//! authentication, domains, resource writes, the upstream FHIR server and outbound calls.
//! Imports only `web`.

pub mod access;
pub mod client_auth;
pub mod clients;
pub mod domains;
pub mod guards;
pub mod index;
pub mod links;
pub mod outbound;
pub mod passwords;
pub mod resources;
pub mod saml_idp;
pub mod upstream;
pub mod users;
