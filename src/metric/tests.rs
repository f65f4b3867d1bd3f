use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::combine::Combiner;
use super::*;
use crate::definitions::{Envelope, MetricDefinition};
use crate::windows::{Closed, Span};

const MIN: Millis = 60_000;

fn metric(definition: Value) -> Metric {
    let definition: MetricDefinition = serde_json::from_value(definition).unwrap();
    Metric::new(definition.compile("tested").unwrap(), 1)
}

fn event(at: Millis, id: usize, body: Value) -> Value {
    let mut e = json!({
        "type": "track", "event": "order.create", "messageId": format!("m{id:05}"),
        "timestamp": DateTime::<Utc>::from_timestamp_millis(at).unwrap().to_rfc3339(),
    });
    e.as_object_mut()
        .unwrap()
        .extend(body.as_object().unwrap().clone());
    e
}

#[test]
fn a_definition_takes_only_its_events_and_groups_them() {
    let mut m = metric(json!({
        "event": "order.create", "type": "track", "where": "properties.amount > 100",
        "group_by": "userId", "aggregate": "sum", "field": "properties.amount",
        "window": {"kind": "tumbling", "size": "1h"}
    }));
    let big = event(0, 1, json!({"userId": "u1", "properties": {"amount": 150}}));
    let small = event(0, 2, json!({"userId": "u1", "properties": {"amount": 50}}));
    let mut page = event(0, 3, json!({"userId": "u1", "properties": {"amount": 500}}));
    page["type"] = json!("page");
    let anonymous = event(
        0,
        4,
        json!({"anonymousId": "a1", "properties": {"amount": 200}}),
    );
    let nobody = event(0, 5, json!({"properties": {"amount": 200}}));
    assert!(
        matches!(m.observe(&Envelope::of(&big)), Outcome::Observed { ref group, .. } if &**group == "u1")
    );
    assert_eq!(m.observe(&Envelope::of(&small)), Outcome::NotSelected);
    assert_eq!(m.observe(&Envelope::of(&page)), Outcome::NotSelected);
    assert!(
        matches!(m.observe(&Envelope::of(&anonymous)), Outcome::Observed { ref group, .. } if &**group == "a1")
    );
    assert_eq!(m.observe(&Envelope::of(&nobody)), Outcome::NoGroup);
    let closed = m.advance(Millis::MAX);
    let values: Vec<(&str, Value)> = closed
        .iter()
        .map(|c| (c.group.as_str(), c.value.clone()))
        .collect();
    assert_eq!(values, vec![("a1", json!(200.0)), ("u1", json!(150.0))]);
}

#[test]
fn a_property_group_by_groups_by_its_value() {
    let mut m = metric(json!({
        "group_by": "properties.country", "aggregate": "count",
        "window": {"kind": "tumbling", "size": "1d"}
    }));
    for (i, country) in [json!("DE"), json!("FR"), json!("DE"), json!(7)]
        .iter()
        .enumerate()
    {
        m.observe(&Envelope::of(&event(
            0,
            i,
            json!({"userId": "u", "properties": {"country": country}}),
        )));
    }
    assert_eq!(
        m.observe(&Envelope::of(&event(
            0,
            9,
            json!({"userId": "u", "properties": {}})
        ))),
        Outcome::NoGroup
    );
    let mut groups: Vec<(String, u64)> = m
        .advance(Millis::MAX)
        .into_iter()
        .map(|c| (c.group, c.events))
        .collect();
    groups.sort();
    assert_eq!(
        groups,
        vec![("7".into(), 1), ("DE".into(), 2), ("FR".into(), 1)]
    );
}

/// Seed 003's aggregator: the moving average of a price, here a 5-minute
/// hopping average every minute, against the average computed directly.
#[test]
fn the_seed_moving_average_equals_a_direct_computation() {
    let mut m = metric(json!({
        "event": "trade", "type": "track", "group_by": "userId",
        "aggregate": "avg", "field": "properties.price",
        "window": {"kind": "hopping", "size": "5m", "slide": "1m"}
    }));
    let trades: Vec<(Millis, f64)> = (0..200)
        .map(|i| {
            (
                i * 7_919 % (30 * MIN),
                100.0 + ((i * 37) % 23) as f64 * 0.25,
            )
        })
        .collect();
    for (i, (at, price)) in trades.iter().enumerate() {
        let mut e = event(
            *at,
            i,
            json!({"userId": "BTC-PERP", "properties": {"price": price}}),
        );
        e["event"] = json!("trade");
        assert!(matches!(
            m.observe(&Envelope::of(&e)),
            Outcome::Observed { .. }
        ));
    }
    let closed = m.advance(Millis::MAX);
    assert!(!closed.is_empty());
    for c in closed {
        let inside: Vec<f64> = trades
            .iter()
            .filter(|(at, _)| c.window.start <= *at && *at < c.window.end)
            .map(|(_, p)| *p)
            .collect();
        let expected = inside.iter().sum::<f64>() / inside.len() as f64;
        let got = c.value.as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-9,
            "{:?}: {got} vs {expected}",
            c.window
        );
        assert_eq!(c.events, inside.len() as u64);
        assert_eq!(c.window.end - c.window.start, 5 * MIN);
    }
}

#[test]
fn a_window_is_final_only_when_every_partition_passed_it() {
    let mut combiner = Combiner::new(crate::windows::Aggregate::Count, 0, [0, 1, 2]);
    let part = |events| Closed {
        group: GLOBAL_GROUP.into(),
        window: Span {
            start: 0,
            end: 10 * MIN,
        },
        value: json!(events),
        partial: crate::windows::Partial::Count(events),
        events,
    };
    combiner.add(part(2));
    assert!(combiner.advance(0, 10 * MIN).is_empty());
    combiner.add(part(3));
    assert!(
        combiner.advance(1, 11 * MIN).is_empty(),
        "partition 2 is behind"
    );
    // Partition 2 had no events in the window; its clock (the time hook on
    // an idle partition) still releases it.
    let finals = combiner.advance(2, 10 * MIN);
    assert_eq!(finals.len(), 1);
    assert_eq!((finals[0].value.clone(), finals[0].events), (json!(5), 5));
    assert_eq!(combiner.pending(), 0);
}

fn global_kinds() -> impl Strategy<Value = Value> {
    prop_oneof![
        (1i64..20).prop_map(|s| json!({"kind": "tumbling", "size": format!("{s}m")})),
        (1i64..5, 1i64..4).prop_map(|(slide, k)| json!({
            "kind": "hopping", "size": format!("{}m", slide * k), "slide": format!("{slide}m")
        })),
        Just(json!({"kind": "calendar", "unit": "day", "timezone": "Asia/Kolkata"})),
    ]
}

proptest! {
    /// A global metric over 8 partitions, each with its own engine and
    /// clock, combined, gives exactly what one engine over all the events
    /// gives.
    #[test]
    fn partitions_combined_equal_one_engine_over_everything(
        window in global_kinds(),
        aggregate in prop_oneof![Just("count"), Just("sum"), Just("max"), Just("distinct"), Just("first")],
        events in prop::collection::vec((0i64..(48 * 60), 0i32..8, 0i64..30, -50i64..50), 1..80),
    ) {
        let definition = json!({"aggregate": aggregate, "field": "properties.amount", "window": window});
        let delay = 30 * MIN;
        // Arrival order: time plus up to 30 minutes of jitter.
        let mut arrivals: Vec<(Millis, i32, usize, Value)> = events
            .iter()
            .enumerate()
            .map(|(i, (minute, partition, _, amount))| {
                let at = minute * MIN + i as i64;
                (at, *partition, i, event(at, i, json!({"userId": "u", "properties": {"amount": amount}})))
            })
            .collect();
        arrivals.sort_by_key(|(at, _, i, _)| (*at + events[*i].2 * MIN, *i));

        let mut whole = metric(definition.clone());
        let mut newest = Millis::MIN;
        let mut expected = Vec::new();
        for (at, _, _, e) in &arrivals {
            let seen = whole.observe(&Envelope::of(e));
            let counted = matches!(seen, Outcome::Observed { ref observed, .. } if observed.counted);
            prop_assert!(counted, "every event arrives within the lateness");
            newest = newest.max(*at);
            expected.extend(whole.advance(newest - delay));
        }
        expected.extend(whole.advance(Millis::MAX));

        let mut parts: Vec<Metric> = (0..8).map(|_| metric(definition.clone())).collect();
        let mut clocks = [Millis::MIN; 8];
        let mut combiner = Combiner::new(whole.spec.aggregate, whole.spec.lateness, 0..8);
        let mut combined = Vec::new();
        for (at, partition, _, e) in &arrivals {
            let p = *partition as usize;
            let seen = parts[p].observe(&Envelope::of(e));
            let counted = matches!(seen, Outcome::Observed { ref observed, .. } if observed.counted);
            prop_assert!(counted, "every event arrives within the lateness");
            clocks[p] = clocks[p].max(*at);
            for closed in parts[p].advance(clocks[p] - delay) {
                combiner.add(closed);
            }
            combined.extend(combiner.advance(*partition, clocks[p] - delay));
        }
        for (p, part) in parts.iter_mut().enumerate() {
            for closed in part.advance(Millis::MAX) {
                combiner.add(closed);
            }
            combined.extend(combiner.advance(p as i32, Millis::MAX));
        }
        let published = |closed: Vec<Closed>| {
            let mut out: Vec<_> = closed
                .into_iter()
                .map(|c| (c.window, c.group, c.value.to_string(), c.events))
                .collect();
            out.sort();
            out
        };
        prop_assert_eq!(published(combined), published(expected));
    }
}

/// A global window open in one partition and closed (a part waiting for
/// the others) in another reads as one open window with both's events.
#[test]
fn open_windows_merge_partitions_states_and_waiting_parts() {
    let definition = json!({
        "aggregate": "sum", "field": "properties.amount",
        "window": {"kind": "tumbling", "size": "10m"}
    });
    let mut ahead = metric(definition.clone());
    let mut behind = metric(definition);
    for (i, amount) in [(1, 5), (2, 7)] {
        ahead.observe(&Envelope::of(&event(
            MIN,
            i,
            json!({"properties": {"amount": amount}}),
        )));
    }
    behind.observe(&Envelope::of(&event(
        2 * MIN,
        3,
        json!({"properties": {"amount": 30}}),
    )));
    behind.observe(&Envelope::of(&event(
        11 * MIN,
        4,
        json!({"properties": {"amount": 100}}),
    )));
    // The ahead partition's clock passed the first window: its part waits.
    let parts: Vec<(Span, Partial, u64)> = ahead
        .advance(10 * MIN)
        .into_iter()
        .map(|c| (c.window, c.partial, c.events))
        .collect();
    assert_eq!(parts.len(), 1);
    let engine = behind.engine();
    let state = engine.state(GLOBAL_GROUP).unwrap().clone();
    let open = open_windows(
        &behind.spec,
        GLOBAL_GROUP,
        vec![(state, Some(5 * MIN))],
        parts,
    );
    let got: Vec<(Millis, Value, u64)> = open
        .iter()
        .map(|w| (w.window.start, w.value.clone(), w.events))
        .collect();
    assert_eq!(got, vec![(0, json!(42.0), 3), (10 * MIN, json!(100.0), 1)]);
}

/// Records Traitline writes itself are never a metric's events, even for a
/// metric that takes every type.
#[test]
fn deletions_and_computed_values_are_not_counted() {
    let mut m = metric(json!({
        "group_by": "userId", "aggregate": "count",
        "window": {"kind": "tumbling", "size": "1h"}
    }));
    for (i, kind) in ["delete", "computed"].into_iter().enumerate() {
        let mut record = event(0, i, json!({"userId": "u1"}));
        record["type"] = json!(kind);
        assert_eq!(
            m.observe(&Envelope::of(&record)),
            Outcome::NotSelected,
            "{kind}"
        );
    }
    let mut page = event(0, 9, json!({"userId": "u1"}));
    page["type"] = json!("page");
    assert!(matches!(
        m.observe(&Envelope::of(&page)),
        Outcome::Observed { .. }
    ));
}
