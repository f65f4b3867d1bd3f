//! The window engine: event-time windows over mergeable aggregates, closed
//! by a watermark. Pure code, no I/O: the metrics processor feeds it events
//! and the runner's clock, and stores what it hands back.
//!
//! Windows are `[start, end)` in milliseconds since the epoch, aligned to
//! the epoch (calendar windows to local midnight in their zone). Hopping
//! and trailing windows are built from slices of `gcd(size, slide)`, so an
//! event updates one slice and a window is the merge of its slices.
//! Sessions merge when an event falls between two. A window closes when
//! the watermark passes its end plus the allowed lateness; an event whose
//! window has closed is reported late, never dropped silently.

pub mod aggregate;
mod calendar;
mod engine;
mod session;
mod slices;

#[cfg(test)]
mod tests;

pub use aggregate::{Aggregate, Partial, Stamp};
pub use calendar::{CalendarUnit, calendar_span};
pub use engine::{Closed, Engine, GroupState, Late, Observed, OpenWindow};

use std::sync::Arc;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// Milliseconds since the epoch: event time and watermarks.
pub type Millis = i64;

/// Timers by when they are due, each with whose it is (a metric's group,
/// a rule's key). The name is the one its entry in the engine holds, so
/// a timer moves without copying it.
pub type Timers = std::collections::BTreeSet<(Millis, Arc<str>)>;

/// Moves `name`'s timer in `timers` from `old` to `new` (`None`: none).
pub fn move_timer(timers: &mut Timers, name: &Arc<str>, old: Option<Millis>, new: Option<Millis>) {
    if old == new {
        return;
    }
    if let Some(old) = old {
        timers.remove(&(old, name.clone()));
    }
    if let Some(new) = new {
        timers.insert((new, name.clone()));
    }
}

/// A window's bounds, `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Span {
    pub start: Millis,
    pub end: Millis,
}

/// How events are grouped in time (DESIGN.md, "Definitions": `window`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum WindowKind {
    /// Back-to-back windows of `size`.
    Tumbling { size: Millis },
    /// Windows of `size` starting every `slide`.
    Hopping { size: Millis, slide: Millis },
    /// Activity separated by less than `gap`, at most `max` long.
    Session { gap: Millis, max: Option<Millis> },
    /// Calendar days, weeks (from Monday) or months in a time zone.
    Calendar { unit: CalendarUnit, zone: Tz },
    /// The last `size`, moving on every `step`: the window that holds now
    /// is the current value (a computed trait such as "orders in the last
    /// 30 days"), and it goes down as old slices leave it.
    Trailing { size: Millis, step: Millis },
}

/// A window definition the engine cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("`{0}` must be longer than zero")]
    NotPositive(&'static str),
    #[error("`slide` must not be longer than `size`")]
    SlideLongerThanSize,
    #[error("`size` must be a whole number of `{0}`s")]
    NotAMultiple(&'static str),
    #[error("`max` must be longer than `gap`")]
    MaxShorterThanGap,
}

impl WindowKind {
    /// Checks the durations fit together; the error names the field.
    pub fn validate(&self) -> Result<(), WindowError> {
        let positive = |name, value: Millis| {
            if value > 0 {
                Ok(())
            } else {
                Err(WindowError::NotPositive(name))
            }
        };
        match *self {
            WindowKind::Tumbling { size } => positive("size", size),
            WindowKind::Hopping { size, slide } => {
                positive("size", size)?;
                positive("slide", slide)?;
                if slide > size {
                    return Err(WindowError::SlideLongerThanSize);
                }
                Ok(())
            }
            WindowKind::Session { gap, max } => {
                positive("gap", gap)?;
                match max {
                    Some(max) if max <= gap => Err(WindowError::MaxShorterThanGap),
                    _ => Ok(()),
                }
            }
            WindowKind::Calendar { .. } => Ok(()),
            WindowKind::Trailing { size, step } => {
                positive("size", size)?;
                positive("step", step)?;
                if size % step != 0 {
                    return Err(WindowError::NotAMultiple("step"));
                }
                Ok(())
            }
        }
    }

    /// The default step of a trailing window: a thirtieth of its size,
    /// whole seconds, so "30d" moves daily and "1h" every two minutes.
    pub fn trailing_step(size: Millis) -> Millis {
        let step = (size / 30 / 1000).max(1) * 1000;
        if size % step == 0 {
            step
        } else {
            gcd(size, step)
        }
    }
}

pub(crate) fn gcd(a: Millis, b: Millis) -> Millis {
    let (mut a, mut b) = (a.abs(), b.abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `a` rounded down to a multiple of a positive `b`, also for negative
/// `a`; at the ends of the range (the engine's "never" and "everything"
/// watermarks) it saturates.
pub(crate) fn floor_to(a: Millis, b: Millis) -> Millis {
    a.saturating_sub(a.rem_euclid(b))
}
