//! The pattern engine: complex event processing per key (DESIGN.md,
//! "Pattern rules and alerts"). Pure code, no I/O: the rules processor
//! works out which steps' conditions each event meets, feeds the engine
//! its events and the runner's clock, and stores what it hands back.
//!
//! A pattern is a sequence of steps, each met by one event or by several
//! (`min` to `max`), optional or not, with relaxed contiguity (events of
//! the key that do not fit are passed over) or strict (the step's event
//! must come right after the previous one taken), all within a time
//! bound from the first event to the last, and maybe a final "not
//! followed by" step: a match is then reported once the bound passes
//! without such an event.
//!
//! Events are taken in event-time order: a key's events wait until the
//! watermark less the allowed lateness (the limit) passes them, so any
//! arrival order within the lateness gives the same alerts, and one
//! behind the limit is reported late. Partial matches are runs of a
//! nondeterministic automaton (skip till next match: a run takes every
//! event its next step accepts, and branches where an event could both
//! repeat a step and start the next); a run that the bound has passed is
//! pruned on the watermark, so a quiet key's state goes. After a match,
//! the skip strategy drops the runs it overlaps.

use std::collections::HashSet;
use std::sync::Arc;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};

use crate::KeyHasher as Hasher;
use crate::windows::{Timers, move_timer};

#[cfg(test)]
mod tests;

/// Milliseconds since the epoch: event time and watermarks.
pub type Millis = i64;

/// Most steps a pattern may have (a step's conditions are a bit each).
pub const MAX_STEPS: usize = 32;

/// One step of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    /// Events it takes at least (at least one).
    pub min: u32,
    /// Events it takes at most (`None`: no limit).
    pub max: Option<u32>,
    /// The pattern may go on without it.
    pub optional: bool,
    /// Its events must follow the previous event taken with no other
    /// event of the key between.
    pub strict: bool,
}

/// What happens to other partial matches after a match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Skip {
    /// Every partial match that began before the match's last event goes
    /// (one burst makes one alert).
    #[default]
    PastLast,
    /// Only partial matches that began with the match's first event go
    /// (overlapping matches each make an alert).
    ToNext,
}

/// What decides, for steps whose conditions read earlier steps' events,
/// whether a partial match may take an event (the event's `meets` bit
/// says only that the rest of the condition holds).
pub trait Guard: Send + Sync {
    /// Whether step `step` (the absent step's is `steps.len()`) may take
    /// `input` after the events `taken`.
    fn allows(&self, step: usize, taken: &[Earlier<'_>], input: &Input) -> bool;
}

/// An event a partial match took, as a [`Guard`] reads it: the step that
/// took it and what the guard keeps of it ([`Input::values`]).
#[derive(Debug, Clone, Copy)]
pub struct Earlier<'a> {
    pub step: usize,
    pub values: Option<&'a serde_json::Value>,
}

/// A pattern's guard and the steps it decides for (a bit each, as in
/// [`Input::meets`]).
#[derive(Clone)]
pub struct Guarded {
    pub steps: u64,
    pub guard: Arc<dyn Guard>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guarded({:#b})", self.steps)
    }
}

impl PartialEq for Guarded {
    fn eq(&self, other: &Guarded) -> bool {
        self.steps == other.steps && Arc::ptr_eq(&self.guard, &other.guard)
    }
}

impl Eq for Guarded {}

/// A pattern, compiled: positive steps (at least one, the last not
/// optional), an optional final absent step, the bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    pub steps: Vec<Step>,
    /// The "not followed by" step's name; its condition is the bit after
    /// the positive steps'.
    pub absent: Option<String>,
    /// Longest time from the first event of a match to its last (with an
    /// absent step, how long it waits for none to come). Every partial
    /// match ends by it, so a quiet key's state goes.
    pub within: Millis,
    /// How far behind the watermark events may still come and be taken in
    /// order.
    pub lateness: Millis,
    pub skip: Skip,
    /// Most partial matches a key holds; beyond it the oldest goes.
    pub max_partials: usize,
    /// Most events a key holds waiting for the limit; beyond it the
    /// earliest are taken at once.
    pub max_waiting: usize,
    /// Steps whose conditions read earlier steps' events.
    pub guarded: Option<Guarded>,
}

impl Pattern {
    /// The bit of the absent step's condition.
    pub fn absent_bit(&self) -> u64 {
        1 << self.steps.len()
    }

    /// Whether step `step` takes `input` after the events `taken` (of the
    /// key's `held`): the event meets the step's condition, all of it.
    fn takes(&self, step: usize, held: &[Held], taken: &[Pick], input: &Input) -> bool {
        input.meets & (1 << step) != 0
            && self.guarded.as_ref().is_none_or(|g| {
                g.steps & (1 << step) == 0 || {
                    let earlier: Vec<Earlier<'_>> = taken
                        .iter()
                        .map(|&(event, step)| Earlier {
                            step: step as usize,
                            values: held[event as usize].values.as_deref(),
                        })
                        .collect();
                    g.guard.allows(step, &earlier, input)
                }
            })
    }
}

/// One event of a key, as the engine needs it: its time and id, and which
/// steps' conditions it meets (bit `i` for step `i`, then the absent
/// step's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    pub time: Millis,
    pub id: Arc<str>,
    pub meets: u64,
    /// What a guarded step's condition reads of it (for a pattern with
    /// a guard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Arc<serde_json::Value>>,
}

/// An event a match took: which step took it, its time and id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    pub step: usize,
    pub time: Millis,
    pub id: Arc<str>,
    /// The event's [`Input::values`], for later steps' guards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Arc<serde_json::Value>>,
}

/// An event some partial match of a key took, held once however many
/// took it: a key's runs branch at every event and share most of theirs,
/// so each names its events by index (a copy or a stored state of a run
/// is a list of small numbers, not of ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Held {
    time: Millis,
    id: Arc<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    values: Option<Arc<serde_json::Value>>,
}

/// An event a run took: its index among the key's held events, and the
/// step that took it.
type Pick = (u32, u32);

/// A partial match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Run {
    /// The step of its last event, and how many events that step took.
    step: usize,
    count: u32,
    #[serde(serialize_with = "spans")]
    taken: Vec<Pick>,
    /// It passed an event over since its last: a strict step cannot
    /// follow. (Stored only when set, as `waiting` is: most runs are
    /// neither, and a state is rewritten often.)
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    passed: bool,
    /// Every positive step is met: it waits for the bound to pass
    /// without an absent event.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    waiting: bool,
}

impl Run {
    /// Its first event, of the key's `held`.
    fn first<'a>(&self, held: &'a [Held]) -> &'a Held {
        &held[self.taken[0].0 as usize]
    }

    fn start(&self, held: &[Held]) -> Millis {
        self.first(held).time
    }

    /// Where it sorts among runs completing together: earliest first
    /// event first, and of those that began with one event, the one that
    /// took most.
    fn order<'a>(&self, held: &'a [Held]) -> (Millis, &'a str, std::cmp::Reverse<usize>) {
        let first = self.first(held);
        (first.time, &first.id, std::cmp::Reverse(self.taken.len()))
    }
}

/// A key's state: the events its partial matches took, its partial
/// matches, and the events waiting for the limit, in event-time order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredState")]
pub struct KeyState {
    held: Vec<Held>,
    runs: Vec<Run>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    waiting: Vec<Input>,
}

impl KeyState {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.waiting.is_empty()
    }

    /// Partial matches held.
    pub fn partials(&self) -> usize {
        self.runs.len()
    }

    /// `input`'s index among the held events: `event`, once some run
    /// took it, else a new one.
    fn hold(&mut self, event: &mut Option<u32>, input: &Input) -> u32 {
        *event.get_or_insert_with(|| {
            self.held.push(Held {
                time: input.time,
                id: input.id.clone(),
                values: input.values.clone(),
            });
            u32::try_from(self.held.len() - 1).expect("a key holds fewer than 2^32 events")
        })
    }

    /// Drops the held events no run names any more.
    fn compact(&mut self) {
        let mut index = vec![u32::MAX; self.held.len()];
        for run in &self.runs {
            for (event, _) in &run.taken {
                index[*event as usize] = 0;
            }
        }
        if !index.contains(&u32::MAX) {
            return;
        }
        let mut next = 0;
        for slot in &mut index {
            if *slot == 0 {
                *slot = next;
                next += 1;
            }
        }
        let mut i = 0;
        self.held.retain(|_| {
            i += 1;
            index[i - 1] != u32::MAX
        });
        for run in &mut self.runs {
            for (event, _) in &mut run.taken {
                *event = index[*event as usize];
            }
        }
    }

    /// The events `run` took, as a match reports them.
    fn taken(&self, run: &Run) -> Vec<Taken> {
        run.taken
            .iter()
            .map(|&(event, step)| {
                let held = &self.held[event as usize];
                Taken {
                    step: step as usize,
                    time: held.time,
                    id: held.id.clone(),
                    values: held.values.clone(),
                }
            })
            .collect()
    }
}

/// A key's state as stored: runs name their events by index, or (as
/// states were stored before events were held once a key) each in full.
#[derive(Deserialize)]
struct StoredState {
    #[serde(default)]
    held: Vec<Held>,
    runs: Vec<StoredRun>,
    #[serde(default)]
    waiting: Vec<Input>,
}

#[derive(Deserialize)]
struct StoredRun {
    step: usize,
    count: u32,
    taken: Vec<StoredPick>,
    #[serde(default)]
    passed: bool,
    #[serde(default)]
    waiting: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StoredPick {
    Pick(u32, u32),
    /// Held events `first` to `first + count - 1`, each taken by `step`.
    Span(u32, u32, u32),
    Taken(Taken),
}

/// Writes a run's picks with each stretch of consecutive held events one
/// step took as `[first, step, count]` (a lone pick as `[event, step]`).
/// A run that repeats a step takes the key's events one after another,
/// and each of a key's runs names most of them: listed one by one, a
/// key's stored state grew with the square of its events.
fn spans<S: serde::Serializer>(taken: &[Pick], serializer: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = serializer.serialize_seq(None)?;
    let mut rest = taken;
    while let Some(&(first, step)) = rest.first() {
        let count = rest
            .iter()
            .zip(first..)
            .take_while(|(pick, event)| **pick == (*event, step))
            .count();
        if count == 1 {
            seq.serialize_element(&(first, step))?;
        } else {
            seq.serialize_element(&(first, step, count as u32))?;
        }
        rest = &rest[count..];
    }
    seq.end()
}

impl TryFrom<StoredState> for KeyState {
    type Error = String;

    fn try_from(stored: StoredState) -> Result<KeyState, String> {
        let mut state = KeyState {
            held: stored.held,
            runs: Vec::with_capacity(stored.runs.len()),
            waiting: stored.waiting,
        };
        let mut interned: HashMap<(Millis, Arc<str>), u32> = HashMap::new();
        for run in stored.runs {
            let mut taken = Vec::with_capacity(run.taken.len());
            for pick in run.taken {
                let pick = match pick {
                    StoredPick::Pick(event, _) if event as usize >= state.held.len() => {
                        return Err(format!(
                            "a partial match names held event {event} of {}",
                            state.held.len()
                        ));
                    }
                    StoredPick::Pick(event, step) => (event, step),
                    StoredPick::Span(first, step, count) => match first.checked_add(count) {
                        Some(end) if count > 0 && end as usize <= state.held.len() => {
                            taken.extend((first..end).map(|event| (event, step)));
                            continue;
                        }
                        _ => {
                            return Err(format!(
                                "a partial match names {count} held events from {first} of {}",
                                state.held.len()
                            ));
                        }
                    },
                    StoredPick::Taken(t) => {
                        let key = (t.time, t.id.clone());
                        let event = match interned.get(&key) {
                            Some(event) => *event,
                            None => {
                                let input = Input {
                                    time: t.time,
                                    id: t.id,
                                    meets: 0,
                                    values: t.values,
                                };
                                let event = state.hold(&mut None, &input);
                                interned.insert(key, event);
                                event
                            }
                        };
                        (event, t.step as u32)
                    }
                };
                taken.push(pick);
            }
            if taken.is_empty() {
                return Err("a partial match took no event".into());
            }
            state.runs.push(Run {
                step: run.step,
                count: run.count,
                taken,
                passed: run.passed,
                waiting: run.waiting,
            });
        }
        Ok(state)
    }
}

/// A complete match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub key: String,
    /// The events taken, in order.
    pub taken: Vec<Taken>,
    /// When it was complete: its last event's time, or the end of the
    /// wait of an absent step.
    pub at: Millis,
}

/// What the engine did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// It waits for the limit to pass it.
    Waiting,
    /// It is behind the limit by `late_by`: events after it were taken.
    Late { late_by: Millis },
}

/// What happened since the counts were last taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Partial matches the bound passed before they completed.
    pub timed_out: u64,
    /// Partial matches dropped at `max_partials`.
    pub dropped: u64,
    /// Events taken before their time at `max_waiting`.
    pub rushed: u64,
}

/// A key the engine holds: its state, its timer (its entry in
/// [`Engine::timers`]) and whether it is in [`Engine::changed`], kept
/// together so an event looks its key up once.
#[derive(Debug, Clone, Default)]
struct KeyEntry {
    state: KeyState,
    due: Option<Millis>,
    changed: bool,
    /// The key, as its timer names it (made with its first timer).
    name: Option<Arc<str>>,
}

/// The partial matches of one rule version over the keys of one
/// partition.
#[derive(Debug, Clone)]
pub struct Engine {
    pattern: Arc<Pattern>,
    keys: HashMap<String, KeyEntry, Hasher>,
    /// When each key next needs the watermark: the limit at which its
    /// earliest waiting event can be taken or its earliest run's bound
    /// has passed.
    timers: Timers,
    watermark: Option<Millis>,
    changed: HashSet<String, Hasher>,
    counts: Counts,
    /// Matches found while taking events early (`max_waiting`), handed
    /// out by the next [`Engine::advance`].
    rushed: Vec<Match>,
}

impl Engine {
    pub fn new(pattern: Arc<Pattern>) -> Engine {
        Engine {
            pattern,
            keys: HashMap::default(),
            timers: Timers::new(),
            watermark: None,
            changed: HashSet::default(),
            counts: Counts::default(),
            rushed: Vec::new(),
        }
    }

    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }

    /// The watermark less the lateness: events before it are taken, and
    /// one arriving before it is late.
    pub fn limit(&self) -> Option<Millis> {
        self.watermark
            .map(|w| w.saturating_sub(self.pattern.lateness))
    }

    pub fn watermark(&self) -> Option<Millis> {
        self.watermark
    }

    /// Starts from a stored watermark (the engine's state after a
    /// restart is the stored keys plus this).
    pub fn resume(&mut self, watermark: Millis) {
        self.watermark = Some(watermark);
    }

    /// Takes an event of `key`. It waits for the limit to pass it, unless
    /// it is behind the limit (late) or the key holds `max_waiting` events
    /// already (the earliest are taken at once, counted).
    pub fn observe(&mut self, key: &str, input: Input) -> Observed {
        if let Some(limit) = self.limit()
            && input.time < limit
        {
            return Observed::Late {
                late_by: limit - input.time,
            };
        }
        let entry = self.keys.entry_ref(key).or_default();
        let state = &mut entry.state;
        let at = state
            .waiting
            .partition_point(|w| (w.time, &w.id) <= (input.time, &input.id));
        if at > 0 && state.waiting[at - 1].id == input.id {
            // The same event again (a retry): taken once.
            return Observed::Waiting;
        }
        let due = input.time.saturating_add(1);
        state.waiting.insert(at, input);
        let mut rushed = false;
        while state.waiting.len() > self.pattern.max_waiting.max(1) {
            let input = state.waiting.remove(0);
            self.counts.rushed += 1;
            rushed = true;
            take(
                &self.pattern,
                key,
                state,
                &input,
                &mut self.counts,
                &mut self.rushed,
            );
        }
        if !entry.changed {
            entry.changed = true;
            self.changed.insert(key.to_owned());
        }
        if rushed {
            entry.state.compact();
            let due = next_due(&self.pattern, &entry.state);
            set_timer(&mut self.timers, key, entry, due);
        } else if at == 0 && entry.due.is_none_or(|old| due < old) {
            // Only the waiting events changed, and this one is now their
            // earliest: the key's timer is the sooner of its old one and
            // this event's (no need to look at every partial match).
            set_timer(&mut self.timers, key, entry, Some(due));
        }
        Observed::Waiting
    }

    /// Moves the watermark to `watermark` (never back) and takes every
    /// waiting event the limit has passed, in event-time order; ends the
    /// waits and prunes the partial matches whose bound it has passed. The
    /// matches, in the order they completed per key.
    pub fn advance(&mut self, watermark: Millis) -> Vec<Match> {
        if self.watermark.is_none_or(|w| w < watermark) {
            self.watermark = Some(watermark);
        }
        let limit = self.limit().expect("set above");
        let mut matches = std::mem::take(&mut self.rushed);
        while let Some((due, _)) = self.timers.first()
            && *due <= limit
        {
            let (_, key) = self.timers.pop_first().expect("looked at above");
            let Some(entry) = self.keys.get_mut(&*key) else {
                continue;
            };
            entry.due = None;
            let state = &mut entry.state;
            let ready = state.waiting.partition_point(|w| w.time < limit);
            let inputs: Vec<Input> = state.waiting.drain(..ready).collect();
            for input in &inputs {
                take(
                    &self.pattern,
                    &key,
                    state,
                    input,
                    &mut self.counts,
                    &mut matches,
                );
            }
            end_waits(&self.pattern, &key, state, limit, &mut matches);
            let within = self.pattern.within;
            let before = state.runs.len();
            let held = &state.held;
            state
                .runs
                .retain(|r| r.waiting || r.start(held).saturating_add(within) >= limit);
            self.counts.timed_out += (before - state.runs.len()) as u64;
            state.compact();
            if !entry.changed {
                entry.changed = true;
                self.changed.insert(key.to_string());
            }
            if entry.state.is_empty() {
                // Its timer was the one just taken.
                self.keys.remove(&*key);
            } else {
                let due = next_due(&self.pattern, &entry.state);
                set_timer(&mut self.timers, &key, entry, due);
            }
        }
        // A burst of keys that went quiet leaves its tables' room behind:
        // give most of it back once they are pruned.
        if self.keys.len() < self.keys.capacity() / 4 {
            self.keys.shrink_to_fit();
        }
        matches
    }

    /// Room the engine's tables hold for keys.
    pub fn capacity(&self) -> usize {
        self.keys.capacity()
    }

    /// Takes `key` out of the engine with its timer.
    fn remove(&mut self, key: &str) {
        if let Some(KeyEntry {
            due: Some(due),
            name: Some(name),
            ..
        }) = self.keys.remove(key)
        {
            self.timers.remove(&(due, name));
        }
    }

    /// A key's state, to store.
    pub fn state(&self, key: &str) -> Option<&KeyState> {
        self.keys.get(key).map(|entry| &entry.state)
    }

    /// Puts back a key's stored state.
    pub fn restore(&mut self, key: &str, state: KeyState) {
        if state.is_empty() {
            self.remove(key);
            return;
        }
        let entry = self.keys.entry_ref(key).or_default();
        entry.state = state;
        let due = next_due(&self.pattern, &entry.state);
        set_timer(&mut self.timers, key, entry, due);
    }

    /// Forgets a key (a GDPR deletion): its partial matches and waiting
    /// events go.
    pub fn forget(&mut self, key: &str) {
        self.remove(key);
        self.changed.insert(key.to_owned());
    }

    /// The keys whose state changed since the last
    /// [`Engine::take_changed`], in order.
    pub fn changed(&self) -> Vec<String> {
        let mut changed: Vec<String> = self.changed.iter().cloned().collect();
        changed.sort_unstable();
        changed
    }

    /// The keys whose state changed since the last call (after a write
    /// of [`Engine::changed`], which are in order).
    pub fn take_changed(&mut self) -> Vec<String> {
        let changed: Vec<String> = std::mem::take(&mut self.changed).into_iter().collect();
        for key in &changed {
            if let Some(entry) = self.keys.get_mut(key.as_str()) {
                entry.changed = false;
            }
        }
        changed
    }

    /// What happened since the last call.
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// Keys held, and the partial matches among them.
    pub fn held(&self) -> (usize, usize) {
        (
            self.keys.len(),
            self.keys.values().map(|entry| entry.state.partials()).sum(),
        )
    }
}

/// When a key holding `state` next needs the watermark: the limit at
/// which its earliest waiting event is taken or its earliest partial
/// match's bound has passed.
fn next_due(pattern: &Pattern, state: &KeyState) -> Option<Millis> {
    let within = pattern.within;
    state
        .waiting
        .first()
        .map(|w| w.time.saturating_add(1))
        .into_iter()
        .chain(state.runs.iter().map(|r| {
            r.start(&state.held)
                .saturating_add(within)
                .saturating_add(1)
        }))
        .min()
}

/// Sets `entry`'s timer (the key `key`'s) to `due` (`None`: no timer),
/// moving its entry in the engine's `timers`.
fn set_timer(timers: &mut Timers, key: &str, entry: &mut KeyEntry, due: Option<Millis>) {
    let old = std::mem::replace(&mut entry.due, due);
    let name = entry.name.get_or_insert_with(|| key.into());
    move_timer(timers, name, old, due);
}

/// Runs one event of `key`, in event-time order, through its partial
/// matches: waits that ended before it complete, each run takes it
/// where it can (branching where it could go two ways), and it may begin
/// runs of its own. The held events no run names any more stay until
/// the caller's [`KeyState::compact`], once for all the events it takes
/// (each compaction reads every run).
fn take(
    pattern: &Pattern,
    key: &str,
    state: &mut KeyState,
    input: &Input,
    counts: &mut Counts,
    matches: &mut Vec<Match>,
) {
    end_waits(pattern, key, state, input.time, matches);
    let last = pattern.steps.len() - 1;
    // The input's index among the held events, once a run takes it.
    let mut event = None;
    let mut runs = Vec::with_capacity(state.runs.len() + 1);
    let mut complete = Vec::new();
    for run in std::mem::take(&mut state.runs) {
        if run.waiting {
            if !pattern.takes(pattern.steps.len(), &state.held, &run.taken, input) {
                runs.push(run);
            }
            continue;
        }
        if input.time > run.start(&state.held).saturating_add(pattern.within) {
            counts.timed_out += 1;
            continue;
        }
        // The (step, count) of each way the run takes the event.
        let mut ways: Vec<(usize, u32)> = Vec::new();
        let step = &pattern.steps[run.step];
        let can_repeat =
            step.max.is_none_or(|max| run.count < max) && (!step.strict || !run.passed);
        // Skip till next match: a run takes an event its step can take
        // again, and one its next step takes once its step cannot; an
        // event that starts a step while the run could still repeat its
        // own, or that only an optional step takes, branches.
        let mut forced = can_repeat && pattern.takes(run.step, &state.held, &run.taken, input);
        if forced {
            ways.push((run.step, run.count + 1));
        }
        // Whether the run may pass this event over (relaxed contiguity
        // for some step it could take next).
        let mut relaxed = can_repeat && !step.strict;
        if run.count >= step.min {
            for (j, after) in pattern.steps.iter().enumerate().skip(run.step + 1) {
                if (!after.strict || !run.passed)
                    && pattern.takes(j, &state.held, &run.taken, input)
                {
                    ways.push((j, 1));
                    forced |= !can_repeat && !after.optional;
                }
                relaxed |= !after.strict;
                if !after.optional {
                    break;
                }
            }
        }
        let mut next = Vec::with_capacity(ways.len());
        if relaxed && !forced {
            if !ways.is_empty() {
                let event = state.hold(&mut event, input);
                for &(j, count) in &ways {
                    next.push(run.extended(j, count, event));
                }
            }
            runs.push(Run {
                passed: true,
                ..run
            });
        } else if let Some((&(step, count), others)) = ways.split_last() {
            let event = state.hold(&mut event, input);
            for &(j, count) in others {
                next.push(run.extended(j, count, event));
            }
            // The run goes on only as its last way, which takes the run's
            // events rather than a copy: a run that repeats a step takes
            // a key's events one at a time, and a copy each time made a
            // burst of n events cost n² a run.
            next.push(run.into_extended(step, count, event));
        }
        for run in next {
            if run.step == last && run.count >= pattern.steps[last].min {
                complete.push(run);
            } else {
                runs.push(run);
            }
        }
    }
    for (j, step) in pattern.steps.iter().enumerate() {
        if pattern.takes(j, &state.held, &[], input) {
            let run = Run {
                step: j,
                count: 1,
                taken: vec![(state.hold(&mut event, input), j as u32)],
                passed: false,
                waiting: false,
            };
            if j == last && step.min <= 1 {
                complete.push(run);
            } else {
                runs.push(run);
            }
        }
        if !step.optional {
            break;
        }
    }
    state.runs = runs;
    if pattern.absent.is_some() {
        // Complete runs wait for the bound to pass without an absent
        // event; of those that began with the same event, the one that
        // took most waits.
        complete.sort_by(|a, b| a.order(&state.held).cmp(&b.order(&state.held)));
        complete.dedup_by(|b, a| a.taken[0] == b.taken[0]);
        for mut run in complete {
            if state
                .runs
                .iter()
                .any(|r| r.waiting && r.taken[0] == run.taken[0])
            {
                continue;
            }
            run.waiting = true;
            state.runs.push(run);
        }
    } else {
        matched(pattern, key, state, complete, input.time, matches);
    }
    let bound = pattern.max_partials.max(1);
    if state.runs.len() > bound {
        let held = &state.held;
        state.runs.sort_by_key(|r| r.start(held));
        let excess = state.runs.len() - bound;
        state.runs.drain(..excess);
        counts.dropped += excess as u64;
    }
}

/// Completes the waits (absent steps) whose bound passed before
/// `before`: no absent event came in time.
fn end_waits(
    pattern: &Pattern,
    key: &str,
    state: &mut KeyState,
    before: Millis,
    matches: &mut Vec<Match>,
) {
    let within = pattern.within;
    // One at a time, earliest first: a match's skip may drop the others.
    while let Some(i) = state
        .runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.waiting && r.start(&state.held).saturating_add(within) < before)
        .min_by(|(_, a), (_, b)| {
            let (a, b) = (a.first(&state.held), b.first(&state.held));
            (a.time, &a.id).cmp(&(b.time, &b.id))
        })
        .map(|(i, _)| i)
    {
        let run = state.runs.remove(i);
        let at = run.start(&state.held).saturating_add(within);
        matched(pattern, key, state, vec![run], at, matches);
    }
}

/// Reports the earliest-beginning of `complete` (and, skipping to next,
/// each other that began with another event) and drops the partial
/// matches the skip strategy says.
fn matched(
    pattern: &Pattern,
    key: &str,
    state: &mut KeyState,
    mut complete: Vec<Run>,
    at: Millis,
    matches: &mut Vec<Match>,
) {
    complete.sort_by(|a, b| a.order(&state.held).cmp(&b.order(&state.held)));
    let mut firsts: Vec<Pick> = Vec::new();
    for run in complete {
        let first = run.taken[0];
        if firsts.contains(&first) {
            continue;
        }
        let held = &state.held;
        match pattern.skip {
            Skip::PastLast => {
                let last = &held[run.taken.last().expect("a run took an event").0 as usize];
                state.runs.retain(|r| {
                    let first = r.first(held);
                    (first.time, &first.id) > (last.time, &last.id)
                });
            }
            Skip::ToNext => state.runs.retain(|r| r.taken[0] != first),
        }
        matches.push(Match {
            key: key.to_owned(),
            taken: state.taken(&run),
            at,
        });
        if pattern.skip == Skip::PastLast {
            return;
        }
        firsts.push(first);
    }
}

impl Run {
    /// This run with `event` (of the key's held events) taken by `step`,
    /// its `count`th event.
    fn extended(&self, step: usize, count: u32, event: u32) -> Run {
        let mut taken = Vec::with_capacity(self.taken.len() + 1);
        taken.extend_from_slice(&self.taken);
        taken.push((event, step as u32));
        Run {
            step,
            count,
            taken,
            passed: false,
            waiting: false,
        }
    }

    /// [`Run::extended`], the run itself going on no other way.
    fn into_extended(mut self, step: usize, count: u32, event: u32) -> Run {
        self.taken.push((event, step as u32));
        Run {
            step,
            count,
            taken: self.taken,
            passed: false,
            waiting: false,
        }
    }
}
