-- Migration 13 (both dialects): destinations' deliveries.
--
-- Every attempt a destination makes (its outcome, status, latency and
-- the start of the answer), relayed to `user_deliveries` (published) and
-- listed per destination; the records a destination gave up on after its
-- retry budget (dead letters), kept until replayed; a destination's state
-- when something other than its definition stopped it (a 410).
CREATE TABLE delivery_attempts (
    attempt_id TEXT PRIMARY KEY,
    destination TEXT NOT NULL,
    version BIGINT NOT NULL,
    delivery_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    partition INTEGER NOT NULL,
    record_offset BIGINT NOT NULL,
    record_key TEXT,
    -- delivered, retrying, dead_letter
    outcome TEXT NOT NULL,
    status INTEGER,
    latency_ms BIGINT NOT NULL,
    response TEXT NOT NULL,
    at BIGINT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX delivery_attempts_by_destination ON delivery_attempts (destination, at);
CREATE INDEX delivery_attempts_unpublished ON delivery_attempts (at) WHERE published = 0;

CREATE TABLE delivery_failures (
    destination TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    partition INTEGER NOT NULL,
    record_offset BIGINT NOT NULL,
    record_key TEXT,
    -- The record as it was to be delivered (JSON).
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    failed_at BIGINT NOT NULL,
    PRIMARY KEY (destination, delivery_id)
);

CREATE TABLE destination_states (
    destination TEXT PRIMARY KEY,
    -- The definition version the state is of: a new version starts afresh.
    version BIGINT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    since BIGINT NOT NULL
);

-- Replays a user asked for (`POST /v1/destinations/{name}/replay`): the
-- dead letters, or the records of a time range of the source topic,
-- delivered again by an instance that runs the destination; a replay
-- whose instance stopped touching it is taken over.
CREATE TABLE destination_replays (
    replay_id TEXT PRIMARY KEY,
    destination TEXT NOT NULL,
    -- dead_letters or log
    what TEXT NOT NULL,
    from_ms BIGINT NOT NULL,
    to_ms BIGINT NOT NULL,
    requested_at BIGINT NOT NULL,
    -- pending, running, done
    state TEXT NOT NULL,
    delivered BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL,
    finished_at BIGINT
);

CREATE INDEX destination_replays_by_destination ON destination_replays (destination, requested_at);
