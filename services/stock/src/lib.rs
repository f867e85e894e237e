//! The stock service.

pub mod store;
