-- Traitline's store, PostgreSQL dialect. Keep in step with sqlite.sql:
-- the same tables, columns and meaning.
--
-- Ids are opaque: they compare byte by byte (COLLATE "C", as SQLite's
-- BINARY does), so both stores order them, and page through them, alike.

-- Where each processor is in each partition: the next offset to apply.
-- Updated in the same transaction as the effects of the records before it.
CREATE TABLE processor_offsets (
    processor   TEXT COLLATE "C"    NOT NULL,
    topic       TEXT COLLATE "C"    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (processor, topic, partition)
);

-- One row a profile: its full state (registers, JSON); the API computes
-- the view from it.
CREATE TABLE profiles (
    profile_id TEXT COLLATE "C"   PRIMARY KEY,
    user_id    TEXT COLLATE "C",
    state_json TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Every id (user id, anonymous id, aliased id) and the profile it resolves to.
CREATE TABLE identities (
    distinct_id TEXT COLLATE "C" PRIMARY KEY,
    profile_id  TEXT COLLATE "C" NOT NULL
);
CREATE INDEX identities_profile ON identities (profile_id);

-- Change data capture: one row per profile per batch that changed it.
CREATE TABLE profile_changes (
    change_id  BIGSERIAL PRIMARY KEY,
    profile_id TEXT COLLATE "C"      NOT NULL,
    user_id    TEXT COLLATE "C",
    before_view TEXT,
    after_view TEXT,
    causes     TEXT      NOT NULL,
    changed_at BIGINT    NOT NULL,
    published  INTEGER   NOT NULL DEFAULT 0
);
CREATE INDEX profile_changes_profile ON profile_changes (profile_id, change_id);
CREATE INDEX profile_changes_unpublished ON profile_changes (change_id) WHERE published = 0;

-- The raw events sink: every applied event, idempotent on message id. It is
-- also the record of applied message ids (deduplication), so it keeps events
-- at least for the deduplication window.
CREATE TABLE events (
    message_id  TEXT COLLATE "C"   PRIMARY KEY,
    profile_id  TEXT COLLATE "C"   NOT NULL,
    type        TEXT   NOT NULL,
    event       TEXT,
    occurred_at BIGINT NOT NULL,
    received_at BIGINT NOT NULL,
    body        TEXT   NOT NULL
);
CREATE INDEX events_profile ON events (profile_id, occurred_at, message_id);
CREATE INDEX events_received_at ON events (received_at);

-- Ids whose profile was deleted (GDPR): events received before the deletion
-- are not applied again (replay), later ones start a new profile.
CREATE TABLE deleted_ids (
    distinct_id TEXT COLLATE "C"   PRIMARY KEY,
    deleted_at  BIGINT NOT NULL
);
