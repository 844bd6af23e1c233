//! The binary's subcommands, apart from the library: `serve` (its flags and TOML file,
//! [`config`]), `predict` (offline classification of files) and `bench`.

pub mod bench;
pub mod config;
pub mod predict;
