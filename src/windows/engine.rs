//! The engine of one metric over one partition's events: groups' window
//! state, the watermark, and the timers that close windows.

use std::collections::HashSet;
use std::sync::Arc;

use hashbrown::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::aggregate::{Aggregate, Partial, Stamp};
use super::calendar::calendar_span;
use super::session::{Part, Session, Shape};
use super::slices::Slices;
use super::{Millis, Span, Timers, WindowKind, floor_to, gcd, move_timer};
use crate::KeyHasher;

/// What became of one event.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// It is in at least one open window.
    pub counted: bool,
    /// A window it belongs to had closed already.
    pub late: Option<Late>,
}

/// An event that came after a window it belongs to closed.
#[derive(Clone, Debug, PartialEq)]
pub struct Late {
    /// The (latest) closed window the event missed.
    pub window: Span,
    /// How long after that window closed the event came, by the watermark.
    pub late_by: Millis,
}

/// A window closed by the watermark: its final value.
#[derive(Clone, Debug, PartialEq)]
pub struct Closed {
    pub group: String,
    pub window: Span,
    pub value: Value,
    /// The partial behind `value`, for combining partitions.
    pub partial: Partial,
    pub events: u64,
}

/// A window still open, as it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenWindow {
    pub window: Span,
    pub value: Value,
    /// The partial behind `value`, for combining partitions.
    pub partial: Partial,
    pub events: u64,
}

/// One slice of a group's events (a whole window, for tumbling and
/// calendar windows).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slice {
    pub end: Millis,
    pub partial: Partial,
    pub events: u64,
}

/// What the engine holds for one group; what the store keeps of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    /// Slices by start (every kind but sessions).
    #[serde(default, skip_serializing_if = "Slices::is_empty")]
    pub slices: Slices,
    /// Open sessions by start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<Session>,
    /// Sessions: events before this time are late (a session they would
    /// join has closed).
    #[serde(default = "beginning", skip_serializing_if = "is_beginning")]
    pub closed_until: Millis,
}

impl Default for GroupState {
    fn default() -> GroupState {
        GroupState {
            slices: Slices::default(),
            sessions: Vec::new(),
            closed_until: beginning(),
        }
    }
}

fn beginning() -> Millis {
    Millis::MIN
}

fn is_beginning(at: &Millis) -> bool {
    *at == Millis::MIN
}

/// How windows are laid out over slices.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// A window is one slice: tumbling and calendar windows.
    Single,
    /// Windows of `size` every `slide`, over slices of `slice`.
    Hopping {
        size: Millis,
        slide: Millis,
        slice: Millis,
    },
    /// Sessions.
    Sessions(Shape),
}

impl Layout {
    /// The end of the first and of the last window holding slice `s`.
    fn window_ends(self, s: Span) -> (Millis, Millis) {
        match self {
            Layout::Hopping { size, slide, .. } => (
                first_end(s.start, size, slide),
                floor_to(s.start, slide).saturating_add(size),
            ),
            _ => (s.end, s.end),
        }
    }

    /// The first window end after `limit`.
    fn next_end_after(self, limit: Millis) -> Millis {
        match self {
            Layout::Hopping { size, slide, .. } => first_end(limit, size, slide),
            _ => limit.saturating_add(1),
        }
    }
}

/// A group the engine holds: its state, when it next has something to
/// close (its entry in [`Engine::timers`]), and whether it is in
/// [`Engine::changed`], kept together so a held group costs one table
/// entry and an event one lookup of its name.
#[derive(Debug, Default)]
struct Group {
    state: GroupState,
    timer: Option<Millis>,
    changed: bool,
    /// The group's name, as its timer names it (made with its first
    /// timer).
    name: Option<Arc<str>>,
}

/// The window state of one metric over the partitions one engine is fed.
#[derive(Debug)]
pub struct Engine {
    kind: WindowKind,
    layout: Layout,
    aggregate: Aggregate,
    /// Trailing windows move with the watermark and have no lateness.
    trailing: bool,
    lateness: Millis,
    watermark: Option<Millis>,
    /// Windows ending at or before this are closed: the watermark less the
    /// lateness.
    limit: Millis,
    groups: HashMap<String, Group, KeyHasher>,
    /// When to look at a group again (a limit), as each group's timer.
    timers: Timers,
    /// Groups changed since [`Engine::take_changed`].
    changed: HashSet<String, KeyHasher>,
}

impl Engine {
    /// An engine for `kind` (validated) windows of `aggregate`, closing a
    /// window when the watermark passes its end plus `lateness`.
    pub fn new(kind: WindowKind, aggregate: Aggregate, lateness: Millis) -> Engine {
        let layout = match kind {
            WindowKind::Tumbling { .. } | WindowKind::Calendar { .. } => Layout::Single,
            WindowKind::Hopping { size, slide } => Layout::Hopping {
                size,
                slide,
                slice: gcd(size, slide),
            },
            WindowKind::Trailing { size, step } => Layout::Hopping {
                size,
                slide: step,
                slice: step,
            },
            WindowKind::Session { gap, max } => Layout::Sessions(Shape { gap, max }),
        };
        let trailing = matches!(kind, WindowKind::Trailing { .. });
        Engine {
            kind,
            layout,
            aggregate,
            trailing,
            lateness: if trailing { 0 } else { lateness.max(0) },
            watermark: None,
            limit: Millis::MIN,
            groups: HashMap::default(),
            timers: Timers::new(),
            changed: HashSet::default(),
        }
    }

    pub fn watermark(&self) -> Option<Millis> {
        self.watermark
    }

    /// The slice that holds event time `at`.
    fn slice_span(&self, at: Millis) -> Span {
        let uniform = |size: Millis| {
            let start = floor_to(at, size);
            Span {
                start,
                end: start.saturating_add(size),
            }
        };
        match (self.kind, self.layout) {
            (WindowKind::Calendar { unit, zone }, _) => calendar_span(at, unit, zone),
            (WindowKind::Tumbling { size }, _) => uniform(size),
            (_, Layout::Hopping { slice, .. }) => uniform(slice),
            _ => uniform(1),
        }
    }

    /// Takes one event of `group` in: its time and id (`stamp`) and the
    /// value of the metric's field.
    pub fn observe(&mut self, group: &str, stamp: &Stamp, value: Option<&Value>) -> Observed {
        let at = stamp.at;
        if let Layout::Sessions(shape) = self.layout {
            return self.observe_session(shape, group, stamp, value);
        }
        let span = self.slice_span(at);
        let (first_end, last_end) = self.layout.window_ends(span);
        if last_end <= self.limit {
            return Observed {
                counted: false,
                late: Some(self.late(span, last_end)),
            };
        }
        // A trailing window only ever shows the window holding now.
        let late = (first_end <= self.limit && !self.trailing).then(|| self.late(span, first_end));
        let aggregate = self.aggregate;
        self.change(group, |state| {
            let slice = state.slices.get_or_insert_with(span.start, || Slice {
                end: span.end,
                partial: aggregate.empty(),
                events: 0,
            });
            slice.partial.observe(stamp, value);
            slice.events += 1;
        });
        Observed {
            counted: true,
            late,
        }
    }

    /// The late report for slice `span` missing the window ending at `end`.
    fn late(&self, span: Span, end: Millis) -> Late {
        let start = match self.layout {
            Layout::Hopping { size, .. } => end - size,
            _ => span.start,
        };
        Late {
            window: Span { start, end },
            late_by: self.limit - end,
        }
    }

    fn observe_session(
        &mut self,
        shape: Shape,
        group: &str,
        stamp: &Stamp,
        value: Option<&Value>,
    ) -> Observed {
        let at = stamp.at;
        let closed_until = self
            .groups
            .get(group)
            .map_or(Millis::MIN, |g| g.state.closed_until);
        let own_end = at.saturating_add(shape.gap);
        if own_end <= self.limit || at < closed_until {
            let end = own_end.max(closed_until);
            return Observed {
                counted: false,
                late: Some(Late {
                    window: Span { start: at, end },
                    late_by: self.limit - end.min(self.limit),
                }),
            };
        }
        let mut partial = self.aggregate.empty();
        partial.observe(stamp, value);
        let session = Session {
            start: at,
            last: at,
            parts: vec![Part {
                at,
                partial,
                events: 1,
            }],
        };
        self.change(group, |state| shape.insert(&mut state.sessions, session));
        Observed {
            counted: true,
            late: None,
        }
    }

    /// Changes `group`'s state (made empty if it has none) with `change`,
    /// notes the change and sets its timer: one lookup of its name, and a
    /// copy of it only for a new group, a first change or a moved timer.
    fn change(&mut self, group: &str, change: impl FnOnce(&mut GroupState)) {
        let (kind, layout, limit) = (self.kind, self.layout, self.limit);
        let held = self.groups.entry_ref(group).or_default();
        change(&mut held.state);
        if !held.changed {
            held.changed = true;
            self.changed.insert(group.to_owned());
        }
        let next = next_timer(kind, layout, limit, &held.state);
        set_timer(&mut self.timers, group, held, next);
    }

    /// Sets `group`'s timer to the next limit at which it has something to
    /// close (or, for a trailing window, to move).
    fn reschedule(&mut self, group: &str) {
        let (kind, layout, limit) = (self.kind, self.layout, self.limit);
        // No group, no timer: one taken out of the engine left its timer
        // with it ([`Engine::remove`]).
        if let Some(held) = self.groups.get_mut(group) {
            let next = next_timer(kind, layout, limit, &held.state);
            set_timer(&mut self.timers, group, held, next);
        }
    }

    /// Takes `group` out of the engine with its timer.
    fn remove(&mut self, group: &str) -> Option<GroupState> {
        let Group {
            state, timer, name, ..
        } = self.groups.remove(group)?;
        if let (Some(at), Some(name)) = (timer, name) {
            self.timers.remove(&(at, name));
        }
        Some(state)
    }

    /// Forgets `group` if it has nothing left to close.
    fn drop_if_done(&mut self, group: &str) {
        if self.groups.get(group).is_some_and(|g| g.timer.is_none()) {
            self.groups.remove(group);
        }
    }

    /// Moves the watermark to `watermark` (never back) and closes every
    /// window it passes by its lateness. For trailing windows the answer
    /// is each group's current window whenever an old slice left it.
    pub fn advance(&mut self, watermark: Millis) -> Vec<Closed> {
        if self.watermark.is_some_and(|w| watermark <= w) {
            return Vec::new();
        }
        self.watermark = Some(watermark);
        let before = self.limit;
        self.limit = self.limit_at(watermark);
        let mut closed = Vec::new();
        while let Some((at, _)) = self.timers.first()
            && *at <= self.limit
        {
            let (_, group) = self.timers.pop_first().expect("a first timer");
            if let Some(g) = self.groups.get_mut(&*group) {
                g.timer = None;
            }
            self.close_group(&group, before, &mut closed);
            self.reschedule(&group);
            self.drop_if_done(&group);
            // What closed left the group's state (or the group is gone).
            self.changed.insert(group.to_string());
        }
        closed
    }

    /// Closes what the limit passed in `group` since it was `before` (every
    /// window ending by then was closed when the limit passed it).
    fn close_group(&mut self, group: &str, before: Millis, closed: &mut Vec<Closed>) {
        let limit = self.limit;
        let after_before = self.layout.next_end_after(before);
        let aggregate = self.aggregate;
        let layout = self.layout;
        let trailing = self.trailing;
        let next_end = self.layout.next_end_after(limit);
        let Some(state) = self.groups.get_mut(group).map(|g| &mut g.state) else {
            return;
        };
        let emit = |closed: &mut Vec<Closed>, window: Span, partial: Partial, events: u64| {
            closed.push(Closed {
                group: group.to_owned(),
                window,
                value: partial.value(aggregate),
                partial,
                events,
            });
        };
        match layout {
            Layout::Sessions(shape) => {
                for (window, partial, events) in
                    shape.close(&mut state.sessions, limit, &mut state.closed_until)
                {
                    emit(closed, window, partial, events);
                }
            }
            Layout::Single => {
                while let Some((start, slice)) = state.slices.pop_first_if(|s| s.end <= limit) {
                    let window = Span {
                        start,
                        end: slice.end,
                    };
                    emit(closed, window, slice.partial, slice.events);
                }
            }
            Layout::Hopping { size, .. } if trailing => {
                // The slices that left the window holding the watermark.
                let before = state.slices.len();
                state
                    .slices
                    .retain(|start| start.saturating_add(size) > limit);
                if state.slices.len() != before {
                    let window = Span {
                        start: next_end - size,
                        end: next_end,
                    };
                    let (partial, events) = merge_slices(aggregate, &state.slices, window);
                    emit(closed, window, partial, events);
                }
            }
            Layout::Hopping { size, slide, .. } => {
                let Some(first) = state.slices.first_start() else {
                    return;
                };
                let mut end = first_end(first, size, slide).max(after_before);
                while end <= limit {
                    let window = Span {
                        start: end - size,
                        end,
                    };
                    let (partial, events) = merge_slices(aggregate, &state.slices, window);
                    if events > 0 {
                        emit(closed, window, partial, events);
                        end += slide;
                        continue;
                    }
                    // Nothing in this window: on to the first window of
                    // the next slice.
                    match state.slices.start_from(end) {
                        Some(start) => end = first_end(start, size, slide),
                        None => break,
                    }
                }
                // A slice leaves once the last window holding it closed.
                state
                    .slices
                    .retain(|start| floor_to(start, slide).saturating_add(size) > limit);
            }
        }
    }

    /// Windows of `group` still open, oldest first: for a trailing metric
    /// the one window that holds the watermark.
    pub fn open(&self, group: &str) -> Vec<OpenWindow> {
        let Some(state) = self.groups.get(group).map(|g| &g.state) else {
            return Vec::new();
        };
        let aggregate = self.aggregate;
        let window = |window: Span, partial: Partial, events: u64| OpenWindow {
            window,
            value: partial.value(aggregate),
            partial,
            events,
        };
        match self.layout {
            Layout::Sessions(shape) => shape
                .open(&state.sessions)
                .into_iter()
                .map(|(s, p, e)| window(s, p, e))
                .collect(),
            Layout::Single => state
                .slices
                .iter()
                .map(|(start, s)| {
                    let span = Span { start, end: s.end };
                    window(span, s.partial.clone(), s.events)
                })
                .collect(),
            Layout::Hopping { size, .. } if self.trailing => {
                let end = self
                    .layout
                    .next_end_after(self.watermark.unwrap_or(Millis::MIN + size));
                let span = Span {
                    start: end - size,
                    end,
                };
                let (partial, events) = merge_slices(aggregate, &state.slices, span);
                vec![window(span, partial, events)]
            }
            Layout::Hopping { size, slide, .. } => {
                let (Some(first), Some(last)) =
                    (state.slices.first_start(), state.slices.last_start())
                else {
                    return Vec::new();
                };
                let mut end =
                    first_end(first, size, slide).max(self.layout.next_end_after(self.limit));
                let last_end = floor_to(last, slide).saturating_add(size);
                let mut out = Vec::new();
                while end <= last_end {
                    let span = Span {
                        start: end - size,
                        end,
                    };
                    let (partial, events) = merge_slices(aggregate, &state.slices, span);
                    if events > 0 {
                        out.push(window(span, partial, events));
                    }
                    end += slide;
                }
                out
            }
        }
    }

    /// The groups whose state changed since the last call (events taken
    /// in, windows closed, a trailing window moved), for the store and
    /// computed traits.
    pub fn take_changed(&mut self) -> Vec<String> {
        let mut changed: Vec<String> = self.changed.drain().collect();
        for name in &changed {
            if let Some(held) = self.groups.get_mut(name.as_str()) {
                held.changed = false;
            }
        }
        changed.sort();
        changed
    }

    /// The state of `group`, as the store keeps it.
    pub fn state(&self, group: &str) -> Option<&GroupState> {
        self.groups.get(group).map(|g| &g.state)
    }

    /// Gives the engine a group's stored state (after a restart, or read
    /// back from the store), replacing what it held for it.
    pub fn restore(&mut self, group: &str, state: GroupState) {
        match self.groups.get_mut(group) {
            Some(held) => held.state = state,
            None => {
                let held = Group {
                    state,
                    ..Group::default()
                };
                self.groups.insert(group.to_owned(), held);
            }
        }
        self.reschedule(group);
        // Nothing left to close or remember (a session group's closed
        // sessions still matter until events for them would be late).
        self.drop_if_done(group);
    }

    /// Starts a restarted engine at the watermark its stored states were
    /// written at: what closed before is gone from those states, so
    /// nothing closes now. Call before [`Engine::restore`].
    pub fn resume(&mut self, watermark: Millis) {
        self.watermark = Some(watermark);
        self.limit = self.limit_at(watermark);
    }

    /// When `group` has something to close next, as a limit (the
    /// watermark less the lateness): the store keeps it beside the
    /// group's state, so a group held only there is read back in time.
    pub fn timer(&self, group: &str) -> Option<Millis> {
        self.groups.get(group).and_then(|g| g.timer)
    }

    /// The limit a watermark of `watermark` sets: windows ending by it
    /// are closed.
    pub fn limit_at(&self, watermark: Millis) -> Millis {
        watermark.saturating_sub(self.lateness)
    }

    /// Drops `group` from memory, its stored state being what the engine
    /// holds (no change since it was last taken): a spill under a memory
    /// budget. Nothing of it closes until it is restored, so restore it
    /// before an event of it, a deletion or a watermark past its timer.
    pub fn evict(&mut self, group: &str) -> bool {
        debug_assert!(!self.changed.contains(group), "an unstored change");
        self.remove(group).is_some()
    }

    /// The groups held in memory.
    pub fn groups(&self) -> impl Iterator<Item = (&String, &GroupState)> {
        self.groups.iter().map(|(name, g)| (name, &g.state))
    }

    /// How many groups have open windows.
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Forgets `group` and its open windows (a GDPR deletion of the
    /// user): nothing of it closes later, and its stored state goes.
    pub fn forget(&mut self, group: &str) {
        self.take(group);
    }

    /// Takes `group`'s state out of the engine (its windows move to
    /// another group): nothing of it closes here, and its stored state
    /// goes.
    pub fn take(&mut self, group: &str) -> Option<GroupState> {
        let state = self.remove(group)?;
        self.changed.insert(group.to_owned());
        Some(state)
    }

    /// Merges `from`'s windows into `into` (an alias or identify merge):
    /// the same events, now one user's.
    pub fn merge_groups(&mut self, from: &str, into: &str) {
        if let Some(source) = self.take(from) {
            self.merge_state(into, source);
        }
    }

    /// Merges another group's state (`source`, perhaps from another
    /// partition's engine) into `into`. What this engine has closed stays
    /// closed: a slice or session all of whose windows closed here is left
    /// out, and the events it held are returned, to be reported.
    pub fn merge_state(&mut self, into: &str, source: GroupState) -> u64 {
        let mut left_out = 0;
        let mut slices = Vec::new();
        for (start, slice) in source.slices {
            let (_, last_end) = self.layout.window_ends(Span {
                start,
                end: slice.end,
            });
            if last_end <= self.limit {
                left_out += slice.events;
            } else {
                slices.push((start, slice));
            }
        }
        let mut sessions = Vec::new();
        if let Layout::Sessions(shape) = self.layout {
            for session in source.sessions {
                if session.last.saturating_add(shape.gap) <= self.limit {
                    left_out += session.parts.iter().map(|p| p.events).sum::<u64>();
                } else {
                    sessions.push(session);
                }
            }
        }
        if slices.is_empty() && sessions.is_empty() {
            return left_out;
        }
        let target = &mut self.groups.entry(into.to_owned()).or_default().state;
        for (start, slice) in slices {
            match target.slices.get_mut(start) {
                Some(t) => {
                    t.partial.merge(&slice.partial);
                    t.events += slice.events;
                }
                None => {
                    target.slices.insert(start, slice);
                }
            }
        }
        if let Layout::Sessions(shape) = self.layout {
            let mut all = std::mem::take(&mut target.sessions);
            all.extend(sessions);
            target.sessions = shape.normalize(all);
        }
        target.closed_until = target.closed_until.max(source.closed_until);
        self.changed.insert(into.to_owned());
        self.reschedule(into);
        left_out
    }
}

/// When a group holding `state` next has something to close (or, for a
/// trailing window, to move), as a limit, the engine's limit being
/// `limit`.
fn next_timer(
    kind: WindowKind,
    layout: Layout,
    limit: Millis,
    state: &GroupState,
) -> Option<Millis> {
    match layout {
        // A group whose sessions all closed stays while an event could
        // still come that would have joined one (and so is late).
        Layout::Sessions(shape) => shape.next_close(&state.sessions).or_else(|| {
            let forget = state.closed_until.saturating_add(shape.gap);
            (forget > limit).then_some(forget)
        }),
        _ if let WindowKind::Trailing { size, .. } = kind => state
            .slices
            .first_start()
            .map(|start| start.saturating_add(size)),
        Layout::Single => state.slices.first().map(|(_, s)| s.end),
        Layout::Hopping { .. } => state.slices.first().map(|(start, s)| {
            let (first_end, _) = layout.window_ends(Span { start, end: s.end });
            first_end.max(layout.next_end_after(limit))
        }),
    }
}

/// Sets `held`'s timer (the group `name`'s) to `next`, moving its entry
/// in the engine's `timers`.
fn set_timer(timers: &mut Timers, name: &str, held: &mut Group, next: Option<Millis>) {
    let old = std::mem::replace(&mut held.timer, next);
    let name = held.name.get_or_insert_with(|| name.into());
    move_timer(timers, name, old, next);
}

/// The end of the first window of `size` every `slide` that holds time
/// `at`: the first window end after `at`.
fn first_end(at: Millis, size: Millis, slide: Millis) -> Millis {
    floor_to(at.saturating_sub(size), slide)
        .saturating_add(slide)
        .saturating_add(size)
}

/// The partial and event count of the slices within `window`.
fn merge_slices(aggregate: Aggregate, slices: &Slices, window: Span) -> (Partial, u64) {
    let mut partial = aggregate.empty();
    let mut events = 0;
    for (_, slice) in slices.range(window.start..window.end) {
        partial.merge(&slice.partial);
        events += slice.events;
    }
    (partial, events)
}
