//! The admin API (docs/medplum-compat.md §8.2, §8.3): project info, members, client creation, invites and
//! the admins' `setpassword`. Callers must be project admins or super admins (403 otherwise). For
//! project admins the `:projectId` of the URL is ignored and their own project is used; super
//! admins act on the project the URL names.

pub mod clients;
pub mod invite;
pub mod members;
pub mod password;
pub mod project;
