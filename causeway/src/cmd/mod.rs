//! One module per command group; each exposes `Args` (clap) and `run(Args) -> anyhow::Result<()>`.
//! [`BadInput`] marks errors that are the input's fault, which `main` reports as one line with
//! exit code 2.

pub(crate) mod api;
pub(crate) mod api_token;
pub(crate) mod certs;
pub(crate) mod conformance;
pub(crate) mod frame;
pub(crate) mod objects;
pub(crate) mod token;

use std::fmt;

/// Input that cannot be decoded: reported as one line naming where and why, exit code 2.
#[derive(Debug)]
pub(crate) struct BadInput {
    /// The input's name: a file path or `stdin`.
    pub(crate) source: String,
    /// Byte offset in the input where the problem is.
    pub(crate) offset: usize,
    /// What is wrong there.
    pub(crate) reason: String,
}

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line whatever the reason says.
        let reason = self.reason.replace(['\n', '\r'], " ");
        write!(f, "{}: byte {}: {reason}", self.source, self.offset)
    }
}

impl std::error::Error for BadInput {}
