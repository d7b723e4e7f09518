//! Helpers shared by the integration tests (`mod common;` in each test file).
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod assertion;
pub mod browser;
pub mod compat;
pub mod gateway;
pub mod hapi;
pub mod http;
pub mod inprocess;
pub mod keycloak;
pub mod mail;
pub mod page;
pub mod people;
pub mod pg;
pub mod upstream;
