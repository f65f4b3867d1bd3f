//! The pattern engine: each quantifier and contiguity, absence and its
//! timeout on the watermark alone, the skip strategies, pruning, the
//! bounds, restarts; and two properties: any arrival order within the
//! lateness gives the same matches, and random events give the matches a
//! brute-force search finds.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;

const MINUTE: Millis = 60_000;

fn step(name: &str, min: u32, max: Option<u32>) -> Step {
    Step {
        name: name.to_owned(),
        min,
        max,
        optional: false,
        strict: false,
    }
}

fn pattern(steps: Vec<Step>, within: Millis) -> Pattern {
    Pattern {
        steps,
        absent: None,
        within,
        lateness: 0,
        skip: Skip::PastLast,
        max_partials: 1_000,
        max_waiting: 10_000,
        guarded: None,
    }
}

/// Seed 004's fraud rule: three or more small payments, then a large
/// one, within 5 minutes. Bit 0: small; bit 1: large.
fn fraud() -> Pattern {
    pattern(
        vec![step("small", 3, None), step("large", 1, Some(1))],
        5 * MINUTE,
    )
}

/// Feeds `events` (key, time, id, meets) in the order given, then moves
/// the watermark past them all; the matches as (key, ids taken).
fn run(pattern: Pattern, events: &[(&str, Millis, &str, u64)]) -> Vec<(String, Vec<String>)> {
    let mut engine = Engine::new(Arc::new(pattern));
    for (key, time, id, meets) in events {
        let input = Input {
            time: *time,
            id: (*id).into(),
            meets: *meets,
            values: None,
        };
        assert_eq!(engine.observe(key, input), Observed::Waiting);
    }
    let end = events.iter().map(|e| e.1).max().unwrap_or(0) + 100 * MINUTE;
    ids(engine.advance(end))
}

fn ids(matches: Vec<Match>) -> Vec<(String, Vec<String>)> {
    matches
        .into_iter()
        .map(|m| {
            (
                m.key,
                m.taken.into_iter().map(|t| t.id.to_string()).collect(),
            )
        })
        .collect()
}

fn m(key: &str, ids: &[&str]) -> (String, Vec<String>) {
    (
        key.to_owned(),
        ids.iter().map(|s| (*s).to_owned()).collect(),
    )
}

#[test]
fn the_fraud_rule_matches_three_small_payments_then_a_large_one() {
    let s = MINUTE / 4;
    let got = run(
        fraud(),
        &[
            // u1: three small, a page view, a large: a match.
            ("u1", 0, "a1", 1),
            ("u1", s, "a2", 1),
            ("u1", 2 * s, "a3", 1),
            ("u1", 3 * s, "view", 0),
            ("u1", 4 * s, "a4", 2),
            // u2: two small, a large: nothing.
            ("u2", 0, "b1", 1),
            ("u2", s, "b2", 1),
            ("u2", 2 * s, "b3", 2),
            // u3: three small, a large six minutes after the first.
            ("u3", 0, "c1", 1),
            ("u3", s, "c2", 1),
            ("u3", 2 * s, "c3", 1),
            ("u3", 6 * MINUTE, "c4", 2),
            // u4: five small, a large: one match, taking all five.
            ("u4", 0, "d1", 1),
            ("u4", s, "d2", 1),
            ("u4", 2 * s, "d3", 1),
            ("u4", 3 * s, "d4", 1),
            ("u4", 4 * s, "d5", 1),
            ("u4", 5 * s, "d6", 2),
        ],
    );
    let mut got = got;
    got.sort();
    assert_eq!(
        got,
        vec![
            m("u1", &["a1", "a2", "a3", "a4"]),
            m("u4", &["d1", "d2", "d3", "d4", "d5", "d6"]),
        ]
    );
}

#[test]
fn exactly_n_takes_n_and_a_range_takes_at_most_its_maximum() {
    // Exactly two A (bit 0) then B (bit 1).
    let exactly = pattern(vec![step("a", 2, Some(2)), step("b", 1, Some(1))], MINUTE);
    assert_eq!(
        run(exactly.clone(), &[("k", 0, "a1", 1), ("k", 1, "b1", 2)]),
        vec![],
        "one A is not two"
    );
    assert_eq!(
        run(
            exactly,
            &[
                ("k", 0, "a1", 1),
                ("k", 1, "a2", 1),
                ("k", 2, "a3", 1),
                ("k", 3, "b1", 2)
            ]
        ),
        vec![m("k", &["a1", "a2", "b1"])],
        "the earliest two A; the third is passed over"
    );
    // One to two A then B: the run that began first takes two.
    let range = pattern(vec![step("a", 1, Some(2)), step("b", 1, Some(1))], MINUTE);
    assert_eq!(
        run(
            range,
            &[
                ("k", 0, "a1", 1),
                ("k", 1, "a2", 1),
                ("k", 2, "a3", 1),
                ("k", 3, "b1", 2)
            ]
        ),
        vec![m("k", &["a1", "a2", "b1"])]
    );
}

#[test]
fn an_optional_step_may_be_left_out() {
    // A, an optional C, then B.
    let mut c = step("c", 1, Some(1));
    c.optional = true;
    let p = pattern(
        vec![step("a", 1, Some(1)), c, step("b", 1, Some(1))],
        MINUTE,
    );
    assert_eq!(
        run(p.clone(), &[("k", 0, "a1", 1), ("k", 1, "b1", 4)]),
        vec![m("k", &["a1", "b1"])]
    );
    assert_eq!(
        run(
            p,
            &[("k", 0, "a1", 1), ("k", 1, "c1", 2), ("k", 2, "b1", 4)]
        ),
        vec![m("k", &["a1", "c1", "b1"])]
    );
}

#[test]
fn strict_contiguity_allows_no_other_event_between() {
    let mut b = step("b", 1, Some(1));
    b.strict = true;
    let strict = pattern(vec![step("a", 1, Some(1)), b], MINUTE);
    let events = [("k", 0, "a1", 1), ("k", 1, "x", 0), ("k", 2, "b1", 2)];
    assert_eq!(run(strict.clone(), &events), vec![], "x is between");
    assert_eq!(
        run(strict, &[("k", 0, "a1", 1), ("k", 1, "b1", 2)]),
        vec![m("k", &["a1", "b1"])]
    );
    let relaxed = pattern(vec![step("a", 1, Some(1)), step("b", 1, Some(1))], MINUTE);
    assert_eq!(run(relaxed, &events), vec![m("k", &["a1", "b1"])]);
    // A strict repeated step: its events back to back.
    let mut a = step("a", 2, Some(2));
    a.strict = true;
    let repeated = pattern(vec![a, step("b", 1, Some(1))], MINUTE);
    assert_eq!(
        run(
            repeated,
            &[
                ("k", 0, "a1", 1),
                ("k", 1, "x", 0),
                ("k", 2, "a2", 1),
                ("k", 3, "b1", 2)
            ]
        ),
        vec![]
    );
}

/// "Checkout started, no order within 30 minutes": the alert comes when
/// the watermark passes the bound, with no further event of the key.
#[test]
fn not_followed_by_fires_on_the_watermark_alone_and_an_absent_event_cancels_it() {
    let mut p = pattern(vec![step("checkout", 1, Some(1))], 30 * MINUTE);
    p.absent = Some("order".to_owned());
    let mut engine = Engine::new(Arc::new(p));
    let input = |time, id: &str, meets| Input {
        time,
        id: id.into(),
        meets,
        values: None,
    };
    engine.observe("u1", input(0, "c1", 1));
    engine.observe("u2", input(0, "c2", 1));
    engine.observe("u2", input(10 * MINUTE, "o2", 2));
    assert_eq!(
        engine.advance(20 * MINUTE),
        vec![],
        "still within the bound"
    );
    assert_eq!(
        engine.advance(30 * MINUTE),
        vec![],
        "the bound is inclusive"
    );
    // A waiting run is stored as waiting (only what is set is written).
    let stored = serde_json::to_string(engine.state("u1").unwrap()).unwrap();
    assert!(stored.contains(r#""waiting":true"#), "{stored}");
    let read: KeyState = serde_json::from_str(&stored).unwrap();
    assert_eq!(&read, engine.state("u1").unwrap());
    let fired = engine.advance(30 * MINUTE + 2);
    assert_eq!(
        fired,
        vec![Match {
            key: "u1".into(),
            taken: vec![Taken {
                step: 0,
                time: 0,
                id: "c1".into(),
                values: None,
            }],
            at: 30 * MINUTE,
        }]
    );
    assert_eq!(engine.held(), (0, 0), "both keys' state is gone");
}

#[test]
fn skip_past_last_makes_one_alert_a_burst_and_skip_to_next_one_a_start() {
    // A then B; three A then one B.
    let events = [
        ("k", 0, "a1", 1),
        ("k", 1, "a2", 1),
        ("k", 2, "a3", 1),
        ("k", 3, "b1", 2),
    ];
    let past_last = pattern(vec![step("a", 1, Some(1)), step("b", 1, Some(1))], MINUTE);
    assert_eq!(run(past_last.clone(), &events), vec![m("k", &["a1", "b1"])]);
    let to_next = Pattern {
        skip: Skip::ToNext,
        ..past_last
    };
    assert_eq!(
        run(to_next, &events),
        vec![
            m("k", &["a1", "b1"]),
            m("k", &["a2", "b1"]),
            m("k", &["a3", "b1"]),
        ]
    );
}

/// Many keys that each start a pattern and go quiet: the watermark
/// prunes every partial match, and the tables give their room back. (A
/// million, in an unoptimized test build, takes most of a minute; the
/// rule benchmark runs a million keys in a release build.)
#[test]
fn many_quiet_keys_leave_nothing_held() {
    quiet_keys_are_pruned(200_000);
}

fn quiet_keys_are_pruned(keys: i64) {
    let mut engine = Engine::new(Arc::new(fraud()));
    for key in 0..keys {
        let input = Input {
            time: key % 1_000,
            id: format!("e{key}").into(),
            meets: 1,
            values: None,
        };
        engine.observe(&format!("u{key}"), input);
    }
    assert!(engine.advance(MINUTE).is_empty());
    let n = usize::try_from(keys).unwrap();
    assert_eq!(engine.held(), (n, n), "each key started a pattern");
    assert!(engine.capacity() >= n);
    assert!(engine.advance(6 * MINUTE).is_empty());
    assert_eq!(engine.held(), (0, 0));
    assert_eq!(engine.take_counts().timed_out, keys as u64);
    assert_eq!(engine.capacity(), 0, "the room the keys took is given back");
}

#[test]
fn an_event_behind_the_limit_is_late_and_changes_nothing() {
    let mut p = fraud();
    p.lateness = MINUTE;
    let mut engine = Engine::new(Arc::new(p));
    engine.advance(10 * MINUTE);
    let late = engine.observe(
        "u1",
        Input {
            time: 8 * MINUTE,
            id: "x".into(),
            meets: 1,
            values: None,
        },
    );
    assert_eq!(late, Observed::Late { late_by: MINUTE });
    assert_eq!(engine.held(), (0, 0));
    let within = engine.observe(
        "u1",
        Input {
            time: 9 * MINUTE + 1,
            id: "y".into(),
            meets: 1,
            values: None,
        },
    );
    assert_eq!(within, Observed::Waiting, "within the lateness");
}

#[test]
fn partial_matches_beyond_the_bound_are_dropped_and_counted() {
    let mut p = fraud();
    p.max_partials = 2;
    let mut engine = Engine::new(Arc::new(p));
    for i in 0..5 {
        let input = Input {
            time: i,
            id: format!("s{i}").into(),
            meets: 1,
            values: None,
        };
        engine.observe("u1", input);
    }
    engine.advance(10);
    assert_eq!(engine.held(), (1, 2));
    assert_eq!(engine.take_counts().dropped, 3);
}

#[test]
fn a_key_stored_and_restored_mid_pattern_matches_as_if_nothing_happened() {
    let p = Arc::new(fraud());
    let mut before = Engine::new(p.clone());
    for i in 0..2 {
        let input = Input {
            time: i * 1_000,
            id: format!("s{i}").into(),
            meets: 1,
            values: None,
        };
        before.observe("u1", input);
    }
    before.advance(5_000);
    let stored = serde_json::to_string(before.state("u1").unwrap()).unwrap();
    drop(before);

    let mut after = Engine::new(p);
    after.resume(5_000);
    after.restore("u1", serde_json::from_str(&stored).unwrap());
    for (i, meets) in [(2, 1), (3, 2)] {
        let input = Input {
            time: 5_000 + i * 1_000,
            id: format!("s{i}").into(),
            meets,
            values: None,
        };
        after.observe("u1", input);
    }
    assert_eq!(
        ids(after.advance(20_000)),
        vec![m("u1", &["s0", "s1", "s2", "s3"])]
    );
}

fn small(i: i64, meets: u64) -> Input {
    Input {
        time: i * 1_000,
        id: format!("s{i}").into(),
        meets,
        values: None,
    }
}

#[test]
fn a_key_holds_each_event_once_however_many_partial_matches_took_it() {
    let mut engine = Engine::new(Arc::new(fraud()));
    for i in 0..5 {
        engine.observe("u1", small(i, 1));
    }
    engine.advance(5_000);
    let state = engine.state("u1").unwrap();
    // Each small payment starts a run and every earlier run takes it.
    assert_eq!(state.runs.len(), 5);
    assert_eq!(state.runs.iter().map(|r| r.taken.len()).sum::<usize>(), 15);
    assert_eq!(state.held.len(), 5);

    // Five minutes after the first, the runs the first two began are
    // over: what only they took is no longer held.
    engine.observe("u1", small(301, 1));
    engine.advance(302_000);
    let state = engine.state("u1").unwrap();
    let held: Vec<&str> = state.held.iter().map(|h| &*h.id).collect();
    assert_eq!(held, ["s2", "s3", "s4", "s301"]);
    assert_eq!(state.runs.len(), 4);

    engine.observe("u1", small(302, 2));
    let matched = ids(engine.advance(303_000));
    assert_eq!(matched, vec![m("u1", &["s2", "s3", "s4", "s301", "s302"])]);
}

#[test]
fn a_state_stored_with_each_event_in_full_is_read_back() {
    // How states were stored before a key held its events once.
    let stored = r#"{"runs": [
        {"step": 0, "count": 2, "taken": [{"step": 0, "time": 0, "id": "s0"}, {"step": 0, "time": 1000, "id": "s1"}], "passed": false, "waiting": false},
        {"step": 0, "count": 1, "taken": [{"step": 0, "time": 1000, "id": "s1"}], "waiting": false}
    ], "waiting": []}"#;
    let state: KeyState = serde_json::from_str(stored).unwrap();
    assert_eq!(state.held.len(), 2, "an event two runs took is held once");
    let mut engine = Engine::new(Arc::new(fraud()));
    engine.resume(2_000);
    engine.restore("u1", state);
    engine.observe("u1", small(2, 1));
    engine.observe("u1", small(3, 2));
    assert_eq!(
        ids(engine.advance(20_000)),
        vec![m("u1", &["s0", "s1", "s2", "s3"])]
    );
}

#[test]
fn a_stored_state_naming_an_event_it_does_not_hold_is_refused() {
    let stored = r#"{"held": [{"time": 0, "id": "s0"}], "runs": [{"step": 0, "count": 2, "taken": [[0, 0], [1, 0]], "waiting": false}], "waiting": []}"#;
    let error = serde_json::from_str::<KeyState>(stored).unwrap_err();
    assert!(
        error.to_string().contains("names held event 1 of 1"),
        "{error}"
    );
}

#[test]
fn a_stored_state_grows_with_a_keys_events_not_their_square() {
    // Each small payment starts a run, and every run takes every later
    // one: n payments make n runs of up to n events.
    let stored = |n: i64| {
        let mut engine = Engine::new(Arc::new(fraud()));
        for i in 0..n {
            engine.observe("u1", small(i, 1));
        }
        engine.advance(n * 1_000);
        assert_eq!(engine.state("u1").unwrap().partials(), n as usize);
        serde_json::to_string(engine.state("u1").unwrap()).unwrap()
    };
    let (hundred, two_hundred) = (stored(100).len(), stored(200).len());
    assert!(
        two_hundred < 3 * hundred,
        "100 events stored in {hundred} bytes, 200 in {two_hundred}"
    );
    let state: KeyState = serde_json::from_str(&stored(200)).unwrap();
    assert_eq!(
        state.runs.iter().map(|r| r.taken.len()).sum::<usize>(),
        200 * 201 / 2
    );
}

#[test]
fn a_stored_span_beyond_the_held_events_is_refused() {
    for taken in [
        "[[0, 0, 2]]",
        "[[1, 0, 1]]",
        "[[0, 0, 0]]",
        "[[4294967295, 0, 2]]",
    ] {
        let stored = format!(
            r#"{{"held": [{{"time": 0, "id": "s0"}}], "runs": [{{"step": 0, "count": 1, "taken": {taken}}}]}}"#
        );
        let error = serde_json::from_str::<KeyState>(&stored).unwrap_err();
        assert!(error.to_string().contains("held event"), "{taken}: {error}");
    }
}

/// A random pattern of two or three steps over a key's events.
fn arb_pattern() -> impl Strategy<Value = Pattern> {
    let arb_step = (
        1u32..3,
        prop::option::of(0u32..2),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(min, extra, optional, strict)| Step {
            name: String::new(),
            min,
            max: extra.map(|e| min + e),
            optional,
            strict,
        });
    (
        prop::collection::vec(arb_step, 2..4),
        5i64..60,
        any::<bool>(),
    )
        .prop_map(|(mut steps, within, _)| {
            steps.last_mut().expect("two or more").optional = false;
            pattern(steps, within)
        })
}

/// Events of one key: increasing times (some equal), random conditions.
fn arb_events(steps: usize) -> impl Strategy<Value = Vec<(Millis, u64)>> {
    prop::collection::vec((0i64..6, 0u64..(1 << steps)), 0..14).prop_map(|gaps| {
        let mut time = 0;
        gaps.into_iter()
            .map(|(gap, meets)| {
                time += gap;
                (time, meets)
            })
            .collect()
    })
}

/// The matches by search: repeatedly the match ending earliest (and of
/// those, beginning earliest) among the events after the last match.
fn brute_force(p: &Pattern, events: &[(Millis, u64)]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some((start, end)) = (from..events.len()).find_map(|end| {
        (from..=end)
            .find(|&start| {
                events[end].0 - events[start].0 <= p.within && assigns(p, events, start, end)
            })
            .map(|start| (start, end))
    }) {
        found.push((start, end));
        from = end + 1;
    }
    found
}

/// Whether the events from `start` to `end` hold a match beginning at
/// `start` and completing at `end`, by trying every way through them:
/// skip till next match, as the engine's runs go.
fn assigns(p: &Pattern, events: &[(Millis, u64)], start: usize, end: usize) -> bool {
    let search = Search { p, events, end };
    search
        .steps_from(None)
        .into_iter()
        .any(|k| search.meets(start, k) && search.extend(start, k, 1))
}

struct Search<'a> {
    p: &'a Pattern,
    events: &'a [(Millis, u64)],
    end: usize,
}

impl Search<'_> {
    fn meets(&self, i: usize, step: usize) -> bool {
        self.events[i].1 & (1 << step) != 0
    }

    /// The steps a run at `step` may go to next (the first step and those
    /// after leading optional ones, for `None`).
    fn steps_from(&self, step: Option<usize>) -> Vec<usize> {
        let first = step.map_or(0, |s| s + 1);
        let mut reachable = Vec::new();
        for (k, s) in self.p.steps.iter().enumerate().skip(first) {
            reachable.push(k);
            if !s.optional {
                break;
            }
        }
        reachable
    }

    fn can_repeat(&self, step: usize, count: u32, passed: bool) -> bool {
        let s = &self.p.steps[step];
        s.max.is_none_or(|max| count < max) && (!s.strict || !passed)
    }

    /// Whether a run at `step` (`count` taken) may pass event `q` over.
    fn passes(&self, q: usize, step: usize, count: u32, passed: bool) -> bool {
        let repeat = self.can_repeat(step, count, passed);
        if repeat && self.meets(q, step) {
            return false;
        }
        let mut relaxed = repeat && !self.p.steps[step].strict;
        if count >= self.p.steps[step].min {
            for k in self.steps_from(Some(step)) {
                let s = &self.p.steps[k];
                if self.meets(q, k) && (!s.strict || !passed) && !repeat && !s.optional {
                    return false;
                }
                relaxed |= !s.strict;
            }
        }
        relaxed
    }

    /// From event `at` taken by `step` as its `count`th.
    fn extend(&self, at: usize, step: usize, count: u32) -> bool {
        let last = self.p.steps.len() - 1;
        let complete = step == last && count >= self.p.steps[last].min;
        if at == self.end || complete {
            // Complete before `end`: that match ends earlier.
            return at == self.end && complete;
        }
        for next in at + 1..=self.end {
            let passed = next > at + 1;
            if passed && !self.passes(next - 1, step, count, next > at + 2) {
                return false;
            }
            if self.can_repeat(step, count, passed)
                && self.meets(next, step)
                && self.extend(next, step, count + 1)
            {
                return true;
            }
            if count >= self.p.steps[step].min
                && self.steps_from(Some(step)).into_iter().any(|k| {
                    (!self.p.steps[k].strict || !passed)
                        && self.meets(next, k)
                        && self.extend(next, k, 1)
                })
            {
                return true;
            }
        }
        false
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_events_give_the_matches_a_brute_force_search_finds(
        (p, events) in arb_pattern().prop_flat_map(|p| {
            let steps = p.steps.len();
            (Just(p), arb_events(steps))
        })
    ) {
        let mut engine = Engine::new(Arc::new(p.clone()));
        for (i, (time, meets)) in events.iter().enumerate() {
            let input = Input { time: *time, id: format!("{i:03}").into(), meets: *meets, values: None };
            engine.observe("k", input);
        }
        let got: Vec<(usize, usize)> = engine
            .advance(1_000)
            .into_iter()
            .map(|m| {
                let first = m.taken.first().unwrap().id.parse().unwrap();
                let last = m.taken.last().unwrap().id.parse().unwrap();
                (first, last)
            })
            .collect();
        prop_assert_eq!(got, brute_force(&p, &events));
    }

    #[test]
    fn a_key_stored_and_restored_at_every_watermark_matches_as_if_it_never_was(
        (p, events) in arb_pattern().prop_flat_map(|p| {
            let steps = p.steps.len();
            (Just(p), arb_events(steps))
        })
    ) {
        let input = |i: usize| Input { time: events[i].0, id: format!("{i:03}").into(), meets: events[i].1, values: None };
        let p = Arc::new(p);
        let (mut kept, mut stored) = (Engine::new(p.clone()), Engine::new(p.clone()));
        let (mut expected, mut got) = (Vec::new(), Vec::new());
        for (i, &(time, _)) in events.iter().enumerate() {
            kept.observe("k", input(i));
            stored.observe("k", input(i));
            expected.extend(ids(kept.advance(time)));
            got.extend(ids(stored.advance(time)));
            // What a runner writes after each batch, read back by the
            // next owner of the partition.
            if let Some(state) = stored.state("k") {
                let text = serde_json::to_string(state).unwrap();
                let read: KeyState = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(&read, state);
                stored = Engine::new(p.clone());
                stored.resume(time);
                stored.restore("k", read);
            }
        }
        expected.extend(ids(kept.advance(1_000)));
        got.extend(ids(stored.advance(1_000)));
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn any_arrival_order_within_the_lateness_gives_the_same_matches(
        (p, events, delays) in arb_pattern().prop_flat_map(|p| {
            let steps = p.steps.len();
            (Just(p), arb_events(steps), prop::collection::vec(0i64..10, 14))
        })
    ) {
        let p = Pattern { lateness: 10, ..p };
        let input = |i: usize| Input { time: events[i].0, id: format!("{i:03}").into(), meets: events[i].1, values: None };
        let mut in_order = Engine::new(Arc::new(p.clone()));
        for i in 0..events.len() {
            in_order.observe("k", input(i));
        }
        let expected = ids(in_order.advance(1_000));

        // Each event arrives up to the lateness after its time, and the
        // watermark follows the arrivals.
        let mut arrivals: Vec<(Millis, usize)> =
            (0..events.len()).map(|i| (events[i].0 + delays[i], i)).collect();
        arrivals.sort();
        let mut shuffled = Engine::new(Arc::new(p));
        let mut got = Vec::new();
        for (arrival, i) in arrivals {
            prop_assert_eq!(shuffled.observe("k", input(i)), Observed::Waiting);
            got.extend(ids(shuffled.advance(arrival)));
        }
        got.extend(ids(shuffled.advance(1_000)));
        prop_assert_eq!(got, expected);
    }
}
