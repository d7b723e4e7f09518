//! The Login lifecycle as plain functions (docs/medplum-compat.md §1.5, §2.2–§2.5, §3): its flow state,
//! PKCE, MFA, the sign-in steps, token issuance, external identity providers and token exchange.
//! Every sign-in front end (`/auth/*`, the page of `/oauth2/authorize`, `/oauth2/token`) builds
//! on these. Imports only `web` and `base`.

pub mod exchange;
pub mod external;
pub mod flow;
pub mod google;
pub mod launch;
pub mod mfa;
pub mod otp;
pub mod pending;
pub mod pkce;
pub mod saml;
pub mod state;
pub mod tokens;
