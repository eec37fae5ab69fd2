//! gust: the binary's library half — the server wiring (`server`), the admin/Invoke API client
//! and code packing (`client`), and project scaffolding (`scaffold`). `main.rs` is the CLI on
//! top; the end-to-end tests use the same functions.

pub mod client;
pub mod doctor;
pub mod scaffold;
pub mod server;
