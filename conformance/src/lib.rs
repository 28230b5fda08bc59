//! The conformance kit: plays one side of each behaviour of PROTOCOL.md Part A against a peer
//! built by someone else, and reports PASS / FAIL / SKIP per case with a reason. `causeway
//! conformance` is its command line; the logic is here so it can be driven from tests too.
//!
//! - [`edge_role`]: the kit is an edge and tests a **cloud** (session opening, capability
//!   negotiation, keepalive and its timeout, upstream ACK and dedup, downstream ACK and resend,
//!   takeover, identity refusal, node limit, shutdown).
//! - [`cloud_role`]: the kit is a cloud and tests an **edge** (session opening, capability offer,
//!   keepalive, downstream ACK and dedup, upstream resend until ACK, and the edge's reaction to
//!   each session close code).
//!
//! It is built on the real transport adapters and proto codecs only, never on the `edgehub` /
//! `cloudhub` sessions it is meant to check, so it tests the wire, not our implementation of it.

pub mod cloud_role;
pub mod edge_role;
mod http;
mod link;

use std::fmt;
use std::time::Duration;

/// The verdict of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The peer behaved as PROTOCOL.md says; the text says what was observed.
    Pass(String),
    /// It did not; the text says what was expected and what happened.
    Fail(String),
    /// The case could not run (an option is missing, or an earlier case left nothing to test).
    Skip(String),
}

/// One case's name and verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// Stable case name, such as `takeover`.
    pub name: &'static str,
    /// The verdict.
    pub outcome: Outcome,
}

impl CaseResult {
    /// Whether the case failed.
    pub fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Fail(_))
    }
}

impl fmt::Display for CaseResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            Outcome::Pass(why) => write!(f, "PASS {}: {why}", self.name),
            Outcome::Fail(why) => write!(f, "FAIL {}: {why}", self.name),
            Outcome::Skip(why) => write!(f, "SKIP {}: {why}", self.name),
        }
    }
}

/// Collects verdicts and hands each to a callback as soon as it is known (the command line
/// prints it at once, so a long run shows progress).
pub struct Report<'a> {
    results: Vec<CaseResult>,
    on_result: Box<dyn FnMut(&CaseResult) + Send + 'a>,
}

impl<'a> Report<'a> {
    /// A report calling `on_result` for every verdict.
    pub fn new(on_result: impl FnMut(&CaseResult) + Send + 'a) -> Self {
        Self {
            results: Vec::new(),
            on_result: Box::new(on_result),
        }
    }

    /// Records a verdict.
    pub fn record(&mut self, name: &'static str, outcome: Outcome) {
        let result = CaseResult { name, outcome };
        (self.on_result)(&result);
        self.results.push(result);
    }

    /// Records `Pass` or `Fail` from a case's result.
    pub fn check(&mut self, name: &'static str, result: Result<String, String>) {
        self.record(
            name,
            match result {
                Ok(why) => Outcome::Pass(why),
                Err(why) => Outcome::Fail(why),
            },
        );
    }

    /// Every verdict so far.
    pub fn results(&self) -> &[CaseResult] {
        &self.results
    }

    /// The verdicts, consuming the report.
    pub fn into_results(self) -> Vec<CaseResult> {
        self.results
    }
}

/// Milliseconds of `d`, for verdict texts.
fn ms(d: Duration) -> u128 {
    d.as_millis()
}
