//! Session windows of one group: activity separated by less than a gap.
//!
//! Each event opens `[t, t + gap)`; sessions whose spans meet merge, so an
//! event between two sessions joins them into one, whatever the order the
//! events came in. With a maximum length a session is cut into pieces: a
//! piece starts at its first event and takes the events of the next `max`;
//! the next event after that starts the next piece. A session keeps its
//! events' partials by time (one a millisecond) so the cuts are made from
//! the events themselves, and out-of-order arrival gives the same pieces.

use serde::{Deserialize, Serialize};

use super::aggregate::Partial;
use super::{Millis, Span};

/// One open session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// The time of its first event.
    pub start: Millis,
    /// The time of its last event.
    pub last: Millis,
    /// Partials by event time, oldest first. Without a maximum length,
    /// one partial for the whole session (stamped with `start`).
    pub parts: Vec<Part>,
}

/// The events of a session at one time (or all of them, without `max`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub at: Millis,
    pub partial: Partial,
    pub events: u64,
}

/// A session's shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub gap: Millis,
    pub max: Option<Millis>,
}

impl Shape {
    /// Takes a session of one event into `sessions` (sorted by start, their
    /// spans disjoint), merging every session it meets.
    pub fn insert(&self, sessions: &mut Vec<Session>, new: Session) {
        let (gap, t) = (self.gap, new.start);
        let meets = |s: &Session| s.start < t.saturating_add(gap) && t < s.last.saturating_add(gap);
        let mut merged = new;
        let mut i = 0;
        while i < sessions.len() {
            if meets(&sessions[i]) {
                let other = sessions.remove(i);
                self.absorb(&mut merged, other);
            } else {
                i += 1;
            }
        }
        let at = sessions.partition_point(|s| s.start < merged.start);
        sessions.insert(at, merged);
    }

    /// Merges session `other` into `into`.
    pub fn absorb(&self, into: &mut Session, other: Session) {
        into.start = into.start.min(other.start);
        into.last = into.last.max(other.last);
        if self.max.is_none() {
            let part = &mut into.parts[0];
            for p in other.parts {
                part.partial.merge(&p.partial);
                part.events += p.events;
            }
            part.at = into.start;
            return;
        }
        for p in other.parts {
            match into.parts.binary_search_by_key(&p.at, |q| q.at) {
                Ok(i) => {
                    into.parts[i].partial.merge(&p.partial);
                    into.parts[i].events += p.events;
                }
                Err(i) => into.parts.insert(i, p),
            }
        }
    }

    /// Merges every pair of sessions in `sessions` whose spans meet (after
    /// two groups' sessions were put together).
    pub fn normalize(&self, sessions: Vec<Session>) -> Vec<Session> {
        let mut out: Vec<Session> = Vec::with_capacity(sessions.len());
        let mut sorted = sessions;
        sorted.sort_by_key(|s| s.start);
        for s in sorted {
            match out.last_mut() {
                Some(prev) if s.start < prev.last.saturating_add(self.gap) => self.absorb(prev, s),
                _ => out.push(s),
            }
        }
        out
    }

    /// The end of the piece of a session that starts at `start` and whose
    /// last event is at `last`.
    fn piece_end(&self, start: Millis, last: Millis) -> Millis {
        let end = last.saturating_add(self.gap);
        self.max
            .map_or(end, |max| end.min(start.saturating_add(max)))
    }

    /// Removes and returns what is final once windows ending at or before
    /// `limit` are closed: whole sessions, and the cut pieces of long ones.
    /// `closed_until` rises to the end of what closed (events before it
    /// are late from then on).
    pub fn close(
        &self,
        sessions: &mut Vec<Session>,
        limit: Millis,
        closed_until: &mut Millis,
    ) -> Vec<(Span, Partial, u64)> {
        let mut out = Vec::new();
        sessions.retain_mut(|s| {
            loop {
                let cut = self.max.and_then(|max| {
                    let end = s.start.saturating_add(max);
                    let n = s.parts.partition_point(|p| p.at < end);
                    (n < s.parts.len()).then_some((n, end))
                });
                match cut {
                    Some((n, end)) if end.saturating_add(self.gap) <= limit => {
                        let piece: Vec<Part> = s.parts.drain(..n).collect();
                        let last = piece.last().map_or(s.start, |p| p.at);
                        let span = Span {
                            start: s.start,
                            end: self.piece_end(s.start, last),
                        };
                        out.push(fold(span, piece));
                        *closed_until = (*closed_until).max(end);
                        s.start = s.parts[0].at;
                    }
                    Some(_) => return true,
                    None if s.last.saturating_add(self.gap) <= limit => {
                        let span = Span {
                            start: s.start,
                            end: self.piece_end(s.start, s.last),
                        };
                        *closed_until = (*closed_until).max(s.last.saturating_add(self.gap));
                        out.push(fold(span, std::mem::take(&mut s.parts)));
                        return false;
                    }
                    None => return true,
                }
            }
        });
        out
    }

    /// When the first of `sessions` can next close something: the limit at
    /// which its first piece (or the whole session) is final.
    pub fn next_close(&self, sessions: &[Session]) -> Option<Millis> {
        sessions
            .iter()
            .map(|s| {
                let until = self
                    .max
                    .map_or(s.last, |max| s.last.min(s.start.saturating_add(max)));
                until.saturating_add(self.gap)
            })
            .min()
    }

    /// The open sessions as they stand, each as one window (a long one's
    /// pieces are only cut when they close).
    pub fn open(&self, sessions: &[Session]) -> Vec<(Span, Partial, u64)> {
        sessions
            .iter()
            .map(|s| {
                let span = Span {
                    start: s.start,
                    end: self.piece_end(s.start, s.last),
                };
                fold(span, s.parts.clone())
            })
            .collect()
    }
}

fn fold(span: Span, parts: Vec<Part>) -> (Span, Partial, u64) {
    let mut iter = parts.into_iter();
    let first = iter.next().expect("a session has an event");
    let (mut partial, mut events) = (first.partial, first.events);
    for p in iter {
        partial.merge(&p.partial);
        events += p.events;
    }
    (span, partial, events)
}
