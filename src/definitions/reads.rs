//! Which of the envelope's fields a definition reads. A metric or a rule
//! reads a few top-level fields (`type`, `userId`, `properties`, ...); an
//! event from a Segment SDK carries a `context` of device, app, network
//! and library details that is often most of its bytes. Parsing an event
//! into a JSON tree costs by the node, so a runner parses the fields its
//! definitions read and skips the rest unbuilt ([`super::Envelope`]).

use super::ENVELOPE_FIELDS;

/// A set of the envelope's top-level fields ([`ENVELOPE_FIELDS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reads(u32);

const _: () = assert!(ENVELOPE_FIELDS.len() <= 32, "a bit a field");

impl Reads {
    /// None of them.
    pub const NONE: Reads = Reads(0);

    /// Every field, and anything else the event holds.
    pub const ALL: Reads = Reads(u32::MAX);

    /// The fields named (names that are not envelope fields are not
    /// read: a definition cannot name them).
    pub fn of<'a>(names: impl IntoIterator<Item = &'a str>) -> Reads {
        names.into_iter().fold(Reads::NONE, |reads, name| {
            match ENVELOPE_FIELDS.iter().position(|f| *f == name) {
                Some(bit) => Reads(reads.0 | 1 << bit),
                None => reads,
            }
        })
    }

    pub fn with(self, other: Reads) -> Reads {
        Reads(self.0 | other.0)
    }

    /// Whether the two have a field in common.
    pub fn meets(self, other: Reads) -> bool {
        self.0 & other.0 != 0
    }

    pub fn contains(self, name: &str) -> bool {
        self == Reads::ALL
            || ENVELOPE_FIELDS
                .iter()
                .position(|f| *f == name)
                .is_some_and(|bit| self.0 & 1 << bit != 0)
    }
}
