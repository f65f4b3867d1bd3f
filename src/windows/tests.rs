use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

const MIN: Millis = 60_000;

fn stamp(at: Millis, id: usize) -> Stamp {
    Stamp {
        at,
        id: format!("m{id:05}").into(),
    }
}

/// Feeds `events` (time, value) to `engine` in order, then closes all.
fn run(engine: &mut Engine, events: &[(Millis, Value)]) -> Vec<(Span, Value, u64)> {
    let mut out = Vec::new();
    for (i, (at, v)) in events.iter().enumerate() {
        assert!(engine.observe("g", &stamp(*at, i), Some(v)).counted);
    }
    for c in engine.advance(Millis::MAX) {
        out.push((c.window, c.value, c.events));
    }
    out
}

fn span(start: Millis, end: Millis) -> Span {
    Span { start, end }
}

#[test]
fn tumbling_windows_are_aligned_to_the_epoch() {
    let mut e = Engine::new(WindowKind::Tumbling { size: 10 * MIN }, Aggregate::Count, 0);
    let closed = run(
        &mut e,
        &[(MIN, json!(1)), (9 * MIN, json!(1)), (10 * MIN, json!(1))],
    );
    assert_eq!(
        closed,
        vec![
            (span(0, 10 * MIN), json!(2), 2),
            (span(10 * MIN, 20 * MIN), json!(1), 1)
        ]
    );
}

#[test]
fn a_window_closes_when_the_watermark_passes_its_end_plus_the_lateness() {
    let mut e = Engine::new(WindowKind::Tumbling { size: 10 * MIN }, Aggregate::Sum, MIN);
    e.observe("g", &stamp(MIN, 0), Some(&json!(2)));
    assert!(e.advance(10 * MIN).is_empty(), "within the lateness");
    // A late-but-allowed event still counts.
    assert_eq!(
        e.observe("g", &stamp(5 * MIN, 1), Some(&json!(3))),
        Observed {
            counted: true,
            late: None
        }
    );
    assert!(e.advance(11 * MIN - 1).is_empty());
    let closed = e.advance(11 * MIN);
    assert_eq!(closed.len(), 1);
    assert_eq!((closed[0].value.clone(), closed[0].events), (json!(5.0), 2));
    // Now it is closed: an event for it is late, by how much, and uncounted.
    let late = e.observe("g", &stamp(2 * MIN, 2), Some(&json!(7)));
    assert_eq!(
        late,
        Observed {
            counted: false,
            late: Some(Late {
                window: span(0, 10 * MIN),
                late_by: 0
            })
        }
    );
    e.advance(14 * MIN);
    let later = e.observe("g", &stamp(2 * MIN, 3), Some(&json!(7)));
    assert_eq!(later.late.unwrap().late_by, 3 * MIN);
    assert!(e.advance(Millis::MAX).is_empty(), "nothing more to close");
}

#[test]
fn hopping_windows_are_built_from_slices() {
    // 10-minute windows every 5 minutes (the seed's moving average).
    let mut e = Engine::new(
        WindowKind::Hopping {
            size: 10 * MIN,
            slide: 5 * MIN,
        },
        Aggregate::Avg,
        0,
    );
    let closed = run(
        &mut e,
        &[
            (MIN, json!(10)),
            (6 * MIN, json!(20)),
            (12 * MIN, json!(60)),
        ],
    );
    assert_eq!(
        closed,
        vec![
            (span(-5 * MIN, 5 * MIN), json!(10.0), 1),
            (span(0, 10 * MIN), json!(15.0), 2),
            (span(5 * MIN, 15 * MIN), json!(40.0), 2),
            (span(10 * MIN, 20 * MIN), json!(60.0), 1),
        ]
    );
    // Each event touched one slice.
    let mut e = Engine::new(
        WindowKind::Hopping {
            size: 10 * MIN,
            slide: 5 * MIN,
        },
        Aggregate::Count,
        0,
    );
    e.observe("g", &stamp(MIN, 0), None);
    e.observe("g", &stamp(2 * MIN, 1), None);
    assert_eq!(e.state("g").unwrap().slices.len(), 1);
}

#[test]
fn hopping_windows_skip_empty_stretches_and_an_event_partly_late_is_reported() {
    let mut e = Engine::new(
        WindowKind::Hopping {
            size: 10 * MIN,
            slide: 5 * MIN,
        },
        Aggregate::Count,
        0,
    );
    e.observe("g", &stamp(MIN, 0), None);
    e.observe("g", &stamp(1000 * MIN, 1), None);
    let closed = e.advance(10 * MIN);
    assert_eq!(
        closed.iter().map(|c| c.window).collect::<Vec<_>>(),
        vec![span(-5 * MIN, 5 * MIN), span(0, 10 * MIN)]
    );
    // 7 min is in [0,10) (closed) and [5,15) (open): counted, reported.
    let partly = e.observe("g", &stamp(7 * MIN, 2), None);
    assert!(partly.counted);
    assert_eq!(partly.late.unwrap().window, span(0, 10 * MIN));
    let rest: Vec<(Span, u64)> = e
        .advance(Millis::MAX)
        .into_iter()
        .map(|c| (c.window, c.events))
        .collect();
    assert_eq!(
        rest,
        vec![
            (span(5 * MIN, 15 * MIN), 1),
            (span(995 * MIN, 1005 * MIN), 1),
            (span(1000 * MIN, 1010 * MIN), 1)
        ]
    );
}

#[test]
fn sessions_merge_when_an_event_falls_between_two() {
    let mut e = Engine::new(
        WindowKind::Session {
            gap: 10 * MIN,
            max: None,
        },
        Aggregate::Count,
        0,
    );
    e.observe("g", &stamp(0, 0), None);
    e.observe("g", &stamp(15 * MIN, 1), None);
    assert_eq!(e.open("g").len(), 2, "15 minutes apart: two sessions");
    e.observe("g", &stamp(8 * MIN, 2), None);
    let open = e.open("g");
    assert_eq!(open.len(), 1, "the event between them joins them");
    assert_eq!((open[0].window, open[0].events), (span(0, 25 * MIN), 3));
    let closed = e.advance(25 * MIN);
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].value, json!(3));
    // An event that would have joined the closed session is late.
    let late = e.observe("g", &stamp(20 * MIN, 3), None);
    assert!(!late.counted && late.late.is_some());
}

#[test]
fn a_session_longer_than_its_maximum_is_cut_into_pieces() {
    let mut e = Engine::new(
        WindowKind::Session {
            gap: 10 * MIN,
            max: Some(30 * MIN),
        },
        Aggregate::Count,
        0,
    );
    // One event every 5 minutes for 70 minutes: one session by the gap.
    for i in 0..=14 {
        e.observe("g", &stamp(i * 5 * MIN, i as usize), None);
    }
    // The first piece is final once no acceptable event can fall in it.
    let first = e.advance(40 * MIN);
    assert_eq!(
        first
            .iter()
            .map(|c| (c.window, c.events))
            .collect::<Vec<_>>(),
        vec![(span(0, 30 * MIN), 6)]
    );
    let rest: Vec<(Span, u64)> = e
        .advance(Millis::MAX)
        .into_iter()
        .map(|c| (c.window, c.events))
        .collect();
    assert_eq!(
        rest,
        vec![(span(30 * MIN, 60 * MIN), 6), (span(60 * MIN, 80 * MIN), 3)]
    );
}

#[test]
fn calendar_days_follow_the_zone_across_a_clock_change() {
    let zone: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    let mut e = Engine::new(
        WindowKind::Calendar {
            unit: CalendarUnit::Day,
            zone,
        },
        Aggregate::Count,
        0,
    );
    let hour = 60 * MIN;
    // 2026-03-28T23:00Z is midnight in Berlin on the 23-hour day.
    let day_start = 1_774_738_800_000;
    let closed = run(
        &mut e,
        &[
            (day_start - 1, json!(1)),
            (day_start, json!(1)),
            (day_start + 22 * hour, json!(1)),
            (day_start + 23 * hour, json!(1)),
        ],
    );
    let windows: Vec<(Millis, u64)> = closed
        .iter()
        .map(|(s, _, n)| (s.end - s.start, *n))
        .collect();
    assert_eq!(
        windows,
        vec![(24 * hour, 1), (23 * hour, 2), (24 * hour, 1)]
    );
}

#[test]
fn a_trailing_window_goes_down_as_events_age_out_without_new_events() {
    let day = 24 * 60 * MIN;
    let mut e = Engine::new(
        WindowKind::Trailing {
            size: 30 * day,
            step: day,
        },
        Aggregate::Count,
        0,
    );
    for (i, d) in [0, 1, 1, 10].iter().enumerate() {
        e.observe("u1", &stamp(d * day + 5, i), None);
    }
    e.advance(10 * day + 6);
    assert_eq!(e.open("u1")[0].value, json!(4));
    // Day 30: the event of day 0 leaves the last 30 days.
    let moved = e.advance(30 * day);
    assert_eq!(moved.len(), 1);
    assert_eq!((moved[0].value.clone(), moved[0].events), (json!(3), 3));
    assert_eq!(e.take_changed(), vec!["u1".to_owned()]);
    assert!(e.advance(30 * day + 100).is_empty(), "nothing left it");
    let gone = e.advance(41 * day);
    assert_eq!(gone[0].value, json!(0));
    assert!(e.state("u1").is_none(), "an empty group leaves memory");
    // An event older than the window holding now is late.
    let late = e.observe("u1", &stamp(5 * day, 9), None);
    assert!(!late.counted);
}

#[test]
fn merged_groups_combine_their_windows() {
    let mut e = Engine::new(WindowKind::Tumbling { size: 10 * MIN }, Aggregate::Count, 0);
    e.observe("anon", &stamp(MIN, 0), None);
    e.observe("u1", &stamp(2 * MIN, 1), None);
    e.observe("u1", &stamp(12 * MIN, 2), None);
    e.merge_groups("anon", "u1");
    assert!(e.state("anon").is_none());
    let closed = e.advance(Millis::MAX);
    assert_eq!(
        closed
            .iter()
            .map(|c| (c.group.as_str(), c.events))
            .collect::<Vec<_>>(),
        vec![("u1", 2), ("u1", 1)]
    );
}

#[test]
fn a_forgotten_group_closes_nothing_and_is_reported_changed() {
    let mut e = Engine::new(WindowKind::Tumbling { size: 10 * MIN }, Aggregate::Count, 0);
    e.observe("u1", &stamp(MIN, 0), None);
    e.observe("u2", &stamp(MIN, 1), None);
    e.take_changed();
    e.forget("u1");
    e.forget("nobody");
    assert_eq!(e.take_changed(), vec!["u1".to_owned()]);
    assert!(e.state("u1").is_none());
    let closed = e.advance(Millis::MAX);
    let groups: Vec<&str> = closed.iter().map(|c| c.group.as_str()).collect();
    assert_eq!(groups, ["u2"]);
}

#[test]
fn a_state_from_another_engine_merges_what_is_still_open_here() {
    // Two partitions' engines; the one the state moves to is further on.
    let kind = WindowKind::Tumbling { size: 10 * MIN };
    let mut from = Engine::new(kind, Aggregate::Count, 0);
    from.observe("anon", &stamp(MIN, 0), None);
    from.observe("anon", &stamp(12 * MIN, 1), None);
    from.observe("anon", &stamp(13 * MIN, 2), None);
    from.take_changed();
    let mut into = Engine::new(kind, Aggregate::Count, 0);
    into.observe("u1", &stamp(15 * MIN, 3), None);
    into.advance(11 * MIN);
    into.take_changed();

    let state = from.take("anon").expect("anon has open windows");
    assert_eq!(from.take_changed(), vec!["anon".to_owned()]);
    assert!(
        from.advance(Millis::MAX).is_empty(),
        "nothing of it closes there"
    );
    assert_eq!(
        into.merge_state("u1", state),
        1,
        "the event of [0, 10), closed here, is left out"
    );
    assert_eq!(into.take_changed(), vec!["u1".to_owned()]);
    let closed: Vec<_> = into
        .advance(Millis::MAX)
        .into_iter()
        .map(|c| (c.group, c.window.start, c.events))
        .collect();
    assert_eq!(closed, vec![("u1".to_owned(), 10 * MIN, 3)]);

    // Sessions: the moved session joins the one it meets.
    let kind = WindowKind::Session {
        gap: 5 * MIN,
        max: None,
    };
    let mut from = Engine::new(kind, Aggregate::Count, 0);
    from.observe("anon", &stamp(MIN, 0), None);
    from.observe("anon", &stamp(3 * MIN, 1), None);
    let mut into = Engine::new(kind, Aggregate::Count, 0);
    into.observe("u1", &stamp(6 * MIN, 2), None);
    assert_eq!(into.merge_state("u1", from.take("anon").unwrap()), 0);
    let closed: Vec<_> = into
        .advance(Millis::MAX)
        .into_iter()
        .map(|c| (c.window, c.events))
        .collect();
    assert_eq!(closed, vec![(span(MIN, 11 * MIN), 3)]);
}

#[test]
fn a_restored_state_closes_as_the_original_would() {
    let kind = WindowKind::Hopping {
        size: 10 * MIN,
        slide: 5 * MIN,
    };
    let mut a = Engine::new(kind, Aggregate::Sum, 0);
    a.observe("g", &stamp(MIN, 0), Some(&json!(1.5)));
    a.observe("g", &stamp(7 * MIN, 1), Some(&json!(2)));
    let stored = serde_json::to_string(a.state("g").unwrap()).unwrap();
    let mut b = Engine::new(kind, Aggregate::Sum, 0);
    b.restore("g", serde_json::from_str(&stored).unwrap());
    assert_eq!(a.advance(Millis::MAX), b.advance(Millis::MAX));
}

#[test]
fn definitions_that_cannot_work_are_refused_naming_the_field() {
    let bad = [
        (
            WindowKind::Tumbling { size: 0 },
            WindowError::NotPositive("size"),
        ),
        (
            WindowKind::Hopping { size: 5, slide: 10 },
            WindowError::SlideLongerThanSize,
        ),
        (
            WindowKind::Session {
                gap: 10,
                max: Some(5),
            },
            WindowError::MaxShorterThanGap,
        ),
        (
            WindowKind::Trailing { size: 10, step: 3 },
            WindowError::NotAMultiple("step"),
        ),
    ];
    for (kind, error) in bad {
        assert_eq!(kind.validate(), Err(error));
    }
    assert_eq!(WindowKind::trailing_step(30 * 24 * 60 * MIN), 24 * 60 * MIN);
    assert_eq!(WindowKind::trailing_step(60 * MIN), 2 * MIN);
}

fn kinds() -> impl Strategy<Value = WindowKind> {
    prop_oneof![
        (1i64..20).prop_map(|s| WindowKind::Tumbling { size: s * MIN }),
        (1i64..6, 1i64..4).prop_map(|(slide, k)| WindowKind::Hopping {
            size: slide * k * MIN,
            slide: slide * MIN
        }),
        (3i64..12, 1i64..10).prop_map(|(size, slide)| WindowKind::Hopping {
            size: size * MIN,
            slide: slide.min(size) * MIN
        }),
        (1i64..10).prop_map(|g| WindowKind::Session {
            gap: g * MIN,
            max: None
        }),
        (1i64..10, 1i64..30).prop_map(|(g, extra)| WindowKind::Session {
            gap: g * MIN,
            max: Some((g + extra) * MIN)
        }),
        Just(WindowKind::Calendar {
            unit: CalendarUnit::Day,
            zone: "America/New_York".parse().unwrap()
        }),
    ]
}

fn closed_windows(engine: &mut Engine, arrivals: &[(Millis, usize)], delay: Millis) -> Vec<Closed> {
    let mut out = Vec::new();
    let mut newest = Millis::MIN;
    for &(at, id) in arrivals {
        let seen = engine.observe("g", &stamp(at, id), Some(&json!(id % 7)));
        assert!(seen.counted && seen.late.is_none(), "{at} arrived in time");
        newest = newest.max(at);
        out.extend(engine.advance(newest - delay));
    }
    out.extend(engine.advance(Millis::MAX));
    out
}

/// What closing published, in a stable order: partials may hold the same
/// sum as different parts, so values are compared as published.
fn published(closed: Vec<Closed>) -> Vec<(String, Span, String, u64)> {
    let mut out: Vec<_> = closed
        .into_iter()
        .map(|c| (c.group, c.window, c.value.to_string(), c.events))
        .collect();
    out.sort();
    out
}

proptest! {
    /// Any arrival order within the allowed lateness closes the same
    /// windows with the same values as the events in time order. The
    /// watermark trails the newest event by `delay`, and no event is more
    /// than `delay` older than one before it.
    #[test]
    fn arrival_order_within_the_lateness_does_not_change_closed_windows(
        kind in kinds(),
        aggregate in prop_oneof![Just(Aggregate::Count), Just(Aggregate::Sum), Just(Aggregate::Last), Just(Aggregate::Unique)],
        times in prop::collection::vec(0i64..(6 * 60), 1..60),
        jitter in prop::collection::vec(0i64..30, 60),
        delay in 30i64..40,
    ) {
        let events: Vec<(Millis, usize)> = times
            .iter()
            .enumerate()
            .map(|(i, t)| (t * MIN + (i as i64 % 3) * 1000, i))
            .collect();
        let mut ordered = events.clone();
        ordered.sort();
        // Each event arrives at its time plus up to 30 minutes.
        let mut shuffled = events.clone();
        shuffled.sort_by_key(|(at, id)| (*at + jitter[*id % jitter.len()] * MIN, *id));
        let mut a = Engine::new(kind, aggregate, 0);
        let mut b = Engine::new(kind, aggregate, 0);
        let in_order = closed_windows(&mut a, &ordered, delay * MIN);
        let disordered = closed_windows(&mut b, &shuffled, delay * MIN);
        prop_assert_eq!(published(in_order), published(disordered));
    }

    /// Every event is in exactly the windows of its kind, whatever the
    /// watermark did: summing the closed tumbling windows counts each once.
    #[test]
    fn every_event_is_counted_once_in_tumbling_windows(
        size in 1i64..30,
        times in prop::collection::vec(0i64..1000, 0..80),
        advances in prop::collection::vec(0i64..1000, 0..10),
    ) {
        let mut e = Engine::new(WindowKind::Tumbling { size: size * MIN }, Aggregate::Count, 0);
        let mut closed = Vec::new();
        let mut counted = 0u64;
        for (i, t) in times.iter().enumerate() {
            if let Some(a) = advances.get(i) {
                closed.extend(e.advance(a * MIN));
            }
            if e.observe("g", &stamp(t * MIN, i), None).counted {
                counted += 1;
            }
        }
        closed.extend(e.advance(Millis::MAX));
        prop_assert_eq!(closed.iter().map(|c| c.events).sum::<u64>(), counted);
        for c in &closed {
            prop_assert_eq!(c.window.end - c.window.start, size * MIN);
            prop_assert_eq!(c.window.start.rem_euclid(size * MIN), 0);
        }
    }

    /// A restart anywhere (every group's state stored as JSON with the
    /// watermark, then restored into a new engine) closes the same
    /// windows as running on.
    #[test]
    fn a_restart_anywhere_closes_the_same_windows(
        kind in kinds(),
        times in prop::collection::vec((0i64..(6 * 60), 0usize..4), 1..60),
        cut in any::<prop::sample::Index>(),
    ) {
        let events: Vec<(Millis, String, usize)> = times
            .iter()
            .enumerate()
            .map(|(i, (t, g))| (t * MIN + i as i64, format!("g{g}"), i))
            .collect();
        let delay = 20 * MIN;
        let feed = |engine: &mut Engine, events: &[(Millis, String, usize)], newest: &mut Millis| {
            let mut out = Vec::new();
            for (at, group, id) in events {
                engine.observe(group, &stamp(*at, *id), Some(&json!(*id)));
                *newest = (*newest).max(*at);
                out.extend(engine.advance(*newest - delay));
            }
            out
        };
        let mut straight = Engine::new(kind, Aggregate::Sum, MIN);
        let mut newest = Millis::MIN;
        let mut expected = feed(&mut straight, &events, &mut newest);
        expected.extend(straight.advance(Millis::MAX));

        let k = cut.index(events.len() + 1);
        let mut before = Engine::new(kind, Aggregate::Sum, MIN);
        let mut newest = Millis::MIN;
        let mut got = feed(&mut before, &events[..k], &mut newest);
        let stored: Vec<(String, String)> = before
            .groups()
            .map(|(g, s)| (g.clone(), serde_json::to_string(s).unwrap()))
            .collect();
        let mut after = Engine::new(kind, Aggregate::Sum, MIN);
        if let Some(w) = before.watermark() {
            after.resume(w);
        }
        for (group, text) in stored {
            after.restore(&group, serde_json::from_str(&text).unwrap());
        }
        got.extend(feed(&mut after, &events[k..], &mut newest));
        got.extend(after.advance(Millis::MAX));
        prop_assert_eq!(published(got), published(expected));
    }

    /// Spilling under a memory budget changes nothing: groups evicted
    /// after their state is stored (with its timer), and restored before
    /// an event of theirs or a watermark past their timer, close the same
    /// windows as an engine that holds every group.
    #[test]
    fn groups_spilled_and_restored_in_time_close_the_same_windows(
        kind in kinds(),
        times in prop::collection::vec((0i64..(6 * 60), 0usize..6), 1..60),
        spills in prop::collection::vec(any::<bool>(), 60),
    ) {
        let delay = 20 * MIN;
        let mut straight = Engine::new(kind, Aggregate::Sum, MIN);
        let mut spilling = Engine::new(kind, Aggregate::Sum, MIN);
        // The store: each group's state as JSON and its timer.
        let mut stored: HashMap<String, (String, Option<Millis>)> = HashMap::new();
        let (mut expected, mut got) = (Vec::new(), Vec::new());
        let mut newest = Millis::MIN;
        for (i, (t, g)) in times.iter().enumerate() {
            let (at, group) = (t * MIN + i as i64, format!("g{g}"));
            newest = newest.max(at);
            straight.observe(&group, &stamp(at, i), Some(&json!(i)));
            expected.extend(straight.advance(newest - delay));

            if spilling.state(&group).is_none()
                && let Some((text, _)) = stored.get(&group)
            {
                spilling.restore(&group, serde_json::from_str(text).unwrap());
            }
            spilling.observe(&group, &stamp(at, i), Some(&json!(i)));
            let limit = spilling.limit_at(newest - delay);
            let due: Vec<String> = stored
                .iter()
                .filter(|(g, (_, timer))| {
                    spilling.state(g).is_none() && timer.is_some_and(|t| t <= limit)
                })
                .map(|(g, _)| g.clone())
                .collect();
            for g in due {
                let state = serde_json::from_str(&stored[&g].0).unwrap();
                spilling.restore(&g, state);
            }
            got.extend(spilling.advance(newest - delay));
            for g in spilling.take_changed() {
                match spilling.state(&g) {
                    Some(state) => {
                        let text = serde_json::to_string(state).unwrap();
                        stored.insert(g.clone(), (text, spilling.timer(&g)));
                    }
                    None => {
                        stored.remove(&g);
                    }
                }
            }
            if spills[i] {
                let held: Vec<String> = spilling.groups().map(|(g, _)| g.clone()).collect();
                for g in held {
                    prop_assert!(spilling.evict(&g));
                }
                prop_assert_eq!(spilling.group_count(), 0);
            }
        }
        expected.extend(straight.advance(Millis::MAX));
        let left: Vec<String> = stored.keys().cloned().collect();
        for g in left {
            if spilling.state(&g).is_none() {
                spilling.restore(&g, serde_json::from_str(&stored[&g].0).unwrap());
            }
        }
        got.extend(spilling.advance(Millis::MAX));
        prop_assert_eq!(published(got), published(expected));
    }
}

#[test]
fn a_group_evicted_or_taken_leaves_no_timer_behind() {
    let mut e = Engine::new(WindowKind::Tumbling { size: 10 * MIN }, Aggregate::Count, 0);
    for (i, group) in ["evicted", "taken", "kept"].iter().enumerate() {
        e.observe(group, &stamp(MIN, i), Some(&json!(1)));
    }
    e.take_changed();
    assert!(e.evict("evicted"));
    assert!(e.take("taken").is_some());
    assert_eq!(e.take_changed(), vec!["taken".to_owned()]);
    assert_eq!(e.timer("evicted"), None);
    // The watermark passing their window closes the kept group's alone,
    // and marks no group the engine no longer holds as changed.
    let closed: Vec<String> = e.advance(20 * MIN).into_iter().map(|c| c.group).collect();
    assert_eq!(closed, vec!["kept".to_owned()]);
    assert_eq!(e.take_changed(), vec!["kept".to_owned()]);
    assert_eq!(e.group_count(), 0);
}
