//! Client-side commands of the `pgstore` binary: `health`, `tail` and `config check`.

pub mod health;
pub mod tail;
