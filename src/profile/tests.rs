use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

fn at(second: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_790_000_000 + second, 0)
        .single()
        .expect("valid time")
}

fn event(
    kind: EventType,
    user: Option<&str>,
    anon: Option<&str>,
    second: i64,
    id: &str,
) -> EventEnvelope {
    let mut e = EventEnvelope::new(kind, id, at(second));
    if kind == EventType::Track {
        e = e.named("order.create");
    }
    e.user_id = user.map(str::to_owned);
    e.anonymous_id = anon.map(str::to_owned);
    e
}

fn track(user: &str, second: i64, id: &str, properties: Value) -> EventEnvelope {
    event(EventType::Track, Some(user), None, second, id).properties(properties)
}

fn identify(user: &str, anon: Option<&str>, second: i64, id: &str, traits: Value) -> EventEnvelope {
    event(EventType::Identify, Some(user), anon, second, id).traits(traits)
}

fn alias(user: &str, previous: &str, second: i64, id: &str) -> EventEnvelope {
    event(EventType::Alias, Some(user), None, second, id).previous(previous)
}

/// A store in memory: what the database keeps between batches.
#[derive(Default)]
struct MemoryStore {
    ids: HashMap<String, String>,
    profiles: HashMap<String, Profile>,
}

impl MemoryStore {
    fn apply_batch(&mut self, events: &[EventEnvelope]) -> Applied {
        let mut book = Book::default();
        for event in events {
            for id in Book::ids_of(event) {
                let profile_id = self.ids.get(id).cloned();
                if let Some(profile_id) = &profile_id {
                    book.load_profile(profile_id.clone(), self.profiles[profile_id].clone());
                }
                book.load_id(id.to_owned(), profile_id);
            }
        }
        for event in events {
            book.apply(event);
        }
        let applied = book.finish();
        for merge in &applied.merges {
            self.profiles.remove(&merge.from);
            for profile_id in self.ids.values_mut().filter(|p| **p == merge.from) {
                profile_id.clone_from(&merge.into);
            }
        }
        for (id, profile_id) in &applied.new_ids {
            self.ids.insert(id.clone(), profile_id.clone());
        }
        for (profile_id, profile) in &applied.profiles {
            self.profiles.insert(profile_id.clone(), profile.clone());
        }
        applied
    }

    fn view(&self, id: &str) -> ProfileView {
        self.profiles[&self.ids[id]].view()
    }

    /// Every profile's view, in a stable order.
    fn views(&self) -> Vec<ProfileView> {
        let mut views: Vec<_> = self.profiles.values().map(Profile::view).collect();
        views.sort_by_key(|v| serde_json::to_string(v).expect("views serialize"));
        views
    }
}

fn profile_of(events: &[EventEnvelope]) -> MemoryStore {
    let mut store = MemoryStore::default();
    store.apply_batch(events);
    store
}

#[test]
fn counts_and_first_and_last_seen_cover_every_event() {
    let store = profile_of(&[
        track("u1", 20, "m1", json!({})),
        track("u1", 10, "m2", json!({})),
        identify("u1", None, 30, "m3", json!({})),
    ]);
    let view = store.view("u1");
    assert_eq!(view.event_count, 3);
    assert_eq!(view.event_counts["order.create"], 2);
    assert_eq!(view.event_counts["$identify"], 1);
    assert_eq!(view.first_seen, Some(at(10)));
    assert_eq!(view.last_seen, Some(at(30)));
}

#[test]
fn the_context_is_the_latest_events_even_when_it_arrives_first() {
    let mut late = track("u1", 50, "m1", json!({}));
    late.context = json!({"client_os": "iOS", "client_version": "2.0"})
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut early = track("u1", 10, "m2", json!({}));
    early.context = json!({"client_os": "Android"})
        .as_object()
        .cloned()
        .unwrap_or_default();
    let view = profile_of(&[late, early]).view("u1");
    assert_eq!(
        Value::Object(view.context),
        json!({"client_os": "iOS", "client_version": "2.0"})
    );
}

#[test]
fn a_trait_takes_the_value_of_its_latest_write() {
    let store = profile_of(&[
        identify("u1", None, 30, "m1", json!({"plan": "pro", "email": "a@x"})),
        track("u1", 10, "m2", json!({"$set": {"plan": "free"}})),
        track("u1", 40, "m3", json!({"$set": {"email": "b@x"}})),
    ]);
    assert_eq!(
        Value::Object(store.view("u1").traits),
        json!({"plan": "pro", "email": "b@x"})
    );
}

#[test]
fn set_once_keeps_the_earliest_value_and_yields_to_set() {
    let store = profile_of(&[
        track(
            "u1",
            20,
            "m1",
            json!({"$set_once": {"source": "ads", "first": "b"}}),
        ),
        track("u1", 10, "m2", json!({"$set_once": {"first": "a"}})),
        track("u1", 5, "m3", json!({"$set": {"source": "seo"}})),
    ]);
    assert_eq!(
        Value::Object(store.view("u1").traits),
        json!({"first": "a", "source": "seo"})
    );
}

#[test]
fn unset_removes_a_trait_until_a_later_set() {
    let store = profile_of(&[
        identify("u1", None, 10, "m1", json!({"plan": "pro", "email": "a@x"})),
        track("u1", 20, "m2", json!({"$unset": ["plan", "email"]})),
        track("u1", 30, "m3", json!({"$set": {"email": "b@x"}})),
        // An older set arriving late does not bring the removed trait back.
        track("u1", 15, "m4", json!({"$set": {"plan": "team"}})),
    ]);
    assert_eq!(
        Value::Object(store.view("u1").traits),
        json!({"email": "b@x"})
    );
}

#[test]
fn set_once_after_an_unset_applies_again() {
    let store = profile_of(&[
        track("u1", 10, "m1", json!({"$set": {"plan": "pro"}})),
        track("u1", 20, "m2", json!({"$unset": ["plan"]})),
        track("u1", 30, "m3", json!({"$set_once": {"plan": "trial"}})),
    ]);
    assert_eq!(
        Value::Object(store.view("u1").traits),
        json!({"plan": "trial"})
    );
}

#[test]
fn identify_with_an_anonymous_id_merges_the_anonymous_profile() {
    let mut store = MemoryStore::default();
    store.apply_batch(&[
        event(EventType::Page, None, Some("a1"), 10, "m1"),
        event(EventType::Track, None, Some("a1"), 11, "m2"),
    ]);
    store.apply_batch(&[track("u1", 5, "m3", json!({"$set": {"plan": "pro"}}))]);
    let applied = store.apply_batch(&[identify(
        "u1",
        Some("a1"),
        20,
        "m4",
        json!({"email": "u1@x"}),
    )]);

    assert_eq!(applied.merges.len(), 1, "two stored profiles become one");
    let view = store.view("a1");
    assert_eq!(
        view,
        store.view("u1"),
        "both ids resolve to the merged profile"
    );
    assert_eq!(view.user_id.as_deref(), Some("u1"));
    assert_eq!(view.anonymous_ids, vec!["a1".to_owned()]);
    assert_eq!(view.event_count, 4);
    assert_eq!(view.first_seen, Some(at(5)));
    assert_eq!(
        Value::Object(view.traits),
        json!({"plan": "pro", "email": "u1@x"})
    );
    assert_eq!(store.profiles.len(), 1);
    let gone = applied
        .changes
        .iter()
        .find(|c| c.after.is_none())
        .expect("a change for the merged-away profile");
    assert!(gone.before.is_some());
}

#[test]
fn alias_links_the_previous_id_and_later_events_for_it_count_once() {
    let mut store = MemoryStore::default();
    store.apply_batch(&[alias("u2", "old-id", 10, "m1")]);
    store.apply_batch(&[event(EventType::Track, None, Some("old-id"), 11, "m2")]);
    let view = store.view("u2");
    assert_eq!(view.event_count, 2);
    assert_eq!(view.anonymous_ids, vec!["old-id".to_owned()]);
    assert_eq!(store.profiles.len(), 1);
}

#[test]
fn a_track_with_both_ids_does_not_link_them() {
    let mut e = track("u1", 10, "m1", json!({}));
    e.anonymous_id = Some("a9".into());
    let store = profile_of(&[e]);
    assert!(store.view("u1").anonymous_ids.is_empty());
    assert!(!store.ids.contains_key("a9"));
}

#[test]
fn changes_carry_before_after_and_their_causes() {
    let mut store = MemoryStore::default();
    store.apply_batch(&[track("u1", 10, "m1", json!({}))]);
    let applied = store.apply_batch(&[
        track("u1", 20, "m2", json!({})),
        track("u1", 30, "m3", json!({})),
    ]);
    assert_eq!(applied.changes.len(), 1);
    let change = &applied.changes[0];
    let count = |view: &Option<String>| -> Option<u64> {
        let view: ProfileView = serde_json::from_str(view.as_deref()?).expect("a view");
        Some(view.event_count)
    };
    assert_eq!(count(&change.before), Some(1));
    assert_eq!(count(&change.after), Some(3));
    assert_eq!(change.user_id.as_deref(), Some("u1"));
    assert_eq!(change.causes, vec!["m2".to_owned(), "m3".to_owned()]);
}

/// Random events over a few users and anonymous ids, every call type that
/// changes a profile, unique message ids.
fn events() -> impl Strategy<Value = Vec<EventEnvelope>> {
    let users = prop::sample::select(vec!["u1", "u2", "u3"]);
    let anons = prop::sample::select(vec!["a1", "a2", "a3", "a4"]);
    let keys = prop::sample::select(vec!["plan", "email", "age"]);
    let one = (0..6u8, users, anons, keys, 0..50i64, 0..3i64);
    prop::collection::vec(one, 1..40).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (kind, user, anon, key, second, value))| {
                let id = format!("m{i}");
                match kind {
                    0 => {
                        let mut e = track(user, second, &id, json!({"$set": {key: value}}));
                        e.context = json!({"client_os": format!("os-{value}")})
                            .as_object()
                            .cloned()
                            .unwrap_or_default();
                        e
                    }
                    1 => track(user, second, &id, json!({"$set_once": {key: value}})),
                    2 => track(user, second, &id, json!({"$unset": [key]})),
                    3 => identify(user, Some(anon), second, &id, json!({key: value})),
                    4 => alias(user, anon, second, &id),
                    _ => event(EventType::Page, None, Some(anon), second, &id),
                }
            })
            .collect()
    })
}

#[test]
fn a_state_keeps_times_to_the_nanosecond_and_reads_states_with_text_times() {
    let mut e = identify("u1", None, 0, "m1", json!({"plan": "pro"}));
    e.timestamp = Utc
        .timestamp_opt(1_790_000_000, 123_456_789)
        .single()
        .expect("a time");
    let profile = profile_of(&[e.clone()])
        .profiles
        .remove("u1")
        .expect("a profile");
    let text = serde_json::to_string(&profile).expect("a state");
    assert!(text.contains("1790000000123456789"), "{text}");
    assert_eq!(
        serde_json::from_str::<Profile>(&text).expect("a state"),
        profile
    );

    let old = text.replace("1790000000123456789", "\"2026-09-21T14:13:20.123456789Z\"");
    assert_eq!(
        serde_json::from_str::<Profile>(&old).expect("an older state"),
        profile
    );

    // Beyond what nanoseconds in an i64 hold, a time is kept as text.
    e.timestamp = Utc
        .with_ymd_and_hms(2300, 1, 1, 0, 0, 0)
        .single()
        .expect("a time");
    let far = profile_of(&[e]).profiles.remove("u1").expect("a profile");
    let text = serde_json::to_string(&far).expect("a state");
    assert!(text.contains("2300-01-01T00:00:00Z"), "{text}");
    assert_eq!(
        serde_json::from_str::<Profile>(&text).expect("a state"),
        far
    );
}

proptest! {
    #[test]
    fn any_arrival_order_and_batching_gives_the_same_profiles(
        (events, shuffled) in events().prop_flat_map(|e| (Just(e.clone()), Just(e).prop_shuffle())),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
    ) {
        let expected = profile_of(&events).views();

        // The same events in another order, applied in several batches.
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(shuffled.len())).collect();
        bounds.extend([0, shuffled.len()]);
        bounds.sort_unstable();
        let mut store = MemoryStore::default();
        for window in bounds.windows(2) {
            store.apply_batch(&shuffled[window[0]..window[1]]);
        }
        prop_assert_eq!(store.views(), expected);
    }

    #[test]
    fn the_borrowed_view_is_the_views_json(events in events()) {
        for profile in profile_of(&events).profiles.values() {
            prop_assert_eq!(profile.view_json(), serde_json::to_string(&profile.view()).expect("a view"));
        }
    }
}

fn computed(id: &str, second: i64, message_id: &str, value: i64) -> EventEnvelope {
    event(EventType::Computed, Some(id), None, second, message_id).properties(
        json!({"trait": "orders_30d", "value": value, "metric": "orders_30d", "version": 1}),
    )
}

#[test]
fn a_computed_value_is_a_register_that_counts_nothing_and_merges_by_stamp() {
    let mut book = Book::default();
    book.load_id("u1".into(), None);
    book.load_id("a1".into(), None);
    book.load_id("ghost".into(), None);
    book.apply(&track("u1", 1, "m1", json!({})));
    book.apply(&computed("u1", 5, "c-2", 2));
    // An older value arriving later loses.
    book.apply(&computed("u1", 3, "c-1", 1));
    // A value for an id with no profile makes none.
    book.apply(&computed("ghost", 6, "c-3", 9));
    book.apply(&event(EventType::Page, None, Some("a1"), 2, "m2"));
    book.apply(&computed("a1", 7, "c-4", 4));
    assert_eq!(book.profile_of("ghost"), None);
    let applied = book.finish();
    let profiles: HashMap<String, Profile> = applied.profiles.into_iter().collect();
    let u1 = &profiles["u1"];
    assert_eq!(u1.view().computed.get("orders_30d"), Some(&json!(2)));
    assert_eq!(u1.event_count, 1, "a computed value is not an event");
    assert_eq!(u1.last_seen, Some(at(1)));
    let view: ProfileView = serde_json::from_str(&u1.view_json()).unwrap();
    assert_eq!(view, u1.view());

    // Merged (an alias), the later value of the two profiles wins.
    let mut merged = u1.clone();
    merged.merge(profiles["a1"].clone());
    assert_eq!(merged.view().computed.get("orders_30d"), Some(&json!(4)));
    let mut other_way = profiles["a1"].clone();
    other_way.merge(u1.clone());
    assert_eq!(other_way.view().computed, merged.view().computed);
}

/// A computed trait whose metric is deleted arrives as `null`: it leaves
/// the profile, and nothing else changes.
#[test]
fn a_null_computed_value_takes_the_trait_out() {
    let mut profile = Profile::default();
    profile.apply(&track("u1", 1, "m1", json!({})));
    profile.apply(&computed("u1", 5, "c-1", 2));
    assert_eq!(profile.view().computed.get("orders_30d"), Some(&json!(2)));
    let before = profile.clone();
    let removal = event(EventType::Computed, Some("u1"), None, 6, "c-2").properties(
        json!({"trait": "orders_30d", "value": null, "metric": "orders_30d", "version": 1}),
    );
    profile.apply(&removal);
    assert_eq!(profile.view().computed.get("orders_30d"), None);
    assert_eq!(profile.event_count, before.event_count);
    assert_eq!(profile.view().traits, before.view().traits);
}
