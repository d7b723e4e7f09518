//! Medplum's `/auth/*` endpoints: sign-in steps, MFA, `/auth/me`, registration, passwords,
//! external identity providers and `/auth/revoke`.

pub mod external;
pub mod google;
pub mod login;
pub mod me;
pub mod mfa;
pub mod password;
pub mod register;
pub mod revoke;
