//! Identity resolution for a batch: which profile an event belongs to, and
//! which profiles an `alias` or an `identify` with an anonymous id merges.

use std::collections::{BTreeMap, HashMap};

use super::{Profile, links_ids};
use crate::KeyHasher;
use crate::envelope::{EventEnvelope, EventType};

/// The profiles and ids one batch touches, loaded from the store, with the
/// batch's events applied in log order. [`Book::finish`] says what to write
/// back.
#[derive(Debug, Default)]
pub struct Book {
    /// Id → profile id, for every id the batch's events carry (`None`: the
    /// store has no profile for it).
    ids: HashMap<String, Option<String>, KeyHasher>,
    profiles: BTreeMap<String, Profile>,
    /// Each loaded profile before the batch, for the change log.
    before: HashMap<String, Before, KeyHasher>,
    new_ids: Vec<(String, String)>,
    merges: Vec<Merge>,
    /// Profile id → message ids of the events that changed it.
    causes: BTreeMap<String, Vec<String>>,
}

/// Profile `from` was merged into profile `into`: every id, event and change
/// of `from` now belongs to `into`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    pub from: String,
    pub into: String,
}

/// A loaded profile's view (JSON) and user id before the batch.
#[derive(Debug)]
struct Before {
    view: String,
    user_id: Option<String>,
}

/// One profile's change in a batch: its view before and after, as the JSON
/// of a [`ProfileView`](super::ProfileView), and the events that caused it.
/// `after` is `None` when the profile was merged into another one.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub profile_id: String,
    /// The user id after the change, else before it.
    pub user_id: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
    pub causes: Vec<String>,
}

/// What a batch did, for the store to write in the batch's transaction.
#[derive(Debug, Default)]
pub struct Applied {
    /// Profiles to insert or update, by profile id.
    pub profiles: Vec<(String, Profile)>,
    /// Ids first seen in this batch and the profile they resolve to.
    pub new_ids: Vec<(String, String)>,
    /// Merges in the order they happened; each `from` profile is gone.
    pub merges: Vec<Merge>,
    pub changes: Vec<Change>,
}

impl Book {
    /// The ids an event needs resolved before it can be applied.
    pub fn ids_of(event: &EventEnvelope) -> impl Iterator<Item = &str> {
        [&event.user_id, &event.anonymous_id, &event.previous_id]
            .into_iter()
            .filter_map(|id| id.as_deref())
    }

    /// Records what the store knows of `id` (`None`: no profile yet).
    pub fn load_id(&mut self, id: String, profile_id: Option<String>) {
        self.ids.insert(id, profile_id);
    }

    /// Adds a profile the store holds.
    pub fn load_profile(&mut self, profile_id: String, profile: Profile) {
        let view = profile.view_json();
        self.load_profile_with_view(profile_id, profile, view);
    }

    /// Adds a profile the store holds whose view's JSON is known.
    pub fn load_profile_with_view(&mut self, profile_id: String, profile: Profile, view: String) {
        let before = Before {
            view,
            user_id: profile.user_id.as_ref().map(|u| u.value.clone()),
        };
        self.before.insert(profile_id.clone(), before);
        for id in &profile.ids {
            self.ids.insert(id.clone(), Some(profile_id.clone()));
        }
        self.profiles.insert(profile_id, profile);
    }

    /// Applies one event (not applied before) to the profile its ids
    /// resolve to, creating or merging profiles as it says.
    pub fn apply(&mut self, event: &EventEnvelope) {
        let Some(primary) = event.user_id.as_deref().or(event.anonymous_id.as_deref()) else {
            return;
        };
        if event.kind == EventType::Computed {
            // A value for the profile the id is in, which the user's own
            // events (earlier in the log) made; it creates and links none.
            if let Some(Some(target)) = self.ids.get(primary).cloned() {
                self.profiles
                    .entry(target.clone())
                    .or_default()
                    .apply(event);
                self.causes
                    .entry(target)
                    .or_default()
                    .push(event.message_id.clone());
            }
            return;
        }
        let mut target = self.resolve_or_create(primary);
        if links_ids(event) {
            let other = match event.kind {
                EventType::Alias => event.previous_id.as_deref(),
                _ => event.anonymous_id.as_deref(),
            };
            if let Some(other) = other.filter(|id| *id != primary) {
                target = match self.ids.get(other).cloned().flatten() {
                    None => {
                        self.map_id(other, &target);
                        target
                    }
                    Some(existing) if existing == target => target,
                    Some(existing) => self.merge(target, existing),
                };
            }
        }
        let profile = self.profiles.entry(target.clone()).or_default();
        profile.apply(event);
        self.causes
            .entry(target)
            .or_default()
            .push(event.message_id.clone());
    }

    /// The profile `id` resolves to now, if any.
    pub fn profile_of(&self, id: &str) -> Option<&str> {
        self.ids.get(id).and_then(|p| p.as_deref())
    }

    fn resolve_or_create(&mut self, id: &str) -> String {
        if let Some(Some(profile_id)) = self.ids.get(id) {
            return profile_id.clone();
        }
        // A new profile is named after the id that started it.
        let profile_id = id.to_owned();
        self.profiles.insert(profile_id.clone(), Profile::default());
        self.map_id(id, &profile_id);
        profile_id
    }

    fn map_id(&mut self, id: &str, profile_id: &str) {
        self.ids.insert(id.to_owned(), Some(profile_id.to_owned()));
        self.new_ids.push((id.to_owned(), profile_id.to_owned()));
    }

    /// Merges two profiles; the one with the smaller id survives, so the
    /// outcome does not depend on which event came first.
    fn merge(&mut self, a: String, b: String) -> String {
        let (into, from) = if a < b { (a, b) } else { (b, a) };
        let absorbed = self.profiles.remove(&from).unwrap_or_default();
        // Every id of `from` the batch knows, including ids mapped in this
        // batch whose events are not applied yet.
        for profile_id in self.ids.values_mut().flatten().filter(|p| **p == from) {
            profile_id.clone_from(&into);
        }
        for (_, profile_id) in self.new_ids.iter_mut().filter(|(_, p)| *p == from) {
            profile_id.clone_from(&into);
        }
        self.profiles
            .entry(into.clone())
            .or_default()
            .merge(absorbed);
        if let Some(causes) = self.causes.remove(&from) {
            self.causes.entry(into.clone()).or_default().extend(causes);
        }
        self.merges.push(Merge {
            from,
            into: into.clone(),
        });
        into
    }

    /// What to write back: every changed profile, new ids, merges, and one
    /// change record per changed or merged-away profile.
    pub fn finish(mut self) -> Applied {
        let mut applied = Applied {
            new_ids: self.new_ids,
            ..Applied::default()
        };
        for merge in &self.merges {
            if self.profiles.contains_key(&merge.from) {
                continue;
            }
            if let Some(before) = self.before.remove(&merge.from) {
                applied.changes.push(Change {
                    profile_id: merge.from.clone(),
                    user_id: before.user_id,
                    before: Some(before.view),
                    after: None,
                    causes: self.causes.get(&merge.into).cloned().unwrap_or_default(),
                });
            }
        }
        applied.merges = self.merges;
        for (profile_id, causes) in self.causes {
            let Some(profile) = self.profiles.remove(&profile_id) else {
                continue;
            };
            let before = self.before.remove(&profile_id);
            let user_id = match &profile.user_id {
                Some(user_id) => Some(user_id.value.clone()),
                None => before.as_ref().and_then(|b| b.user_id.clone()),
            };
            applied.changes.push(Change {
                profile_id: profile_id.clone(),
                user_id,
                before: before.map(|b| b.view),
                after: Some(profile.view_json()),
                causes,
            });
            applied.profiles.push((profile_id, profile));
        }
        applied
    }
}
