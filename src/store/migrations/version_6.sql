-- Migration 6 (both dialects): windows of metrics grouped globally or by
-- a property, combined across partitions.
--
-- Each partition's engine closes its part of a window when the
-- partition's watermark passes it (metric_parts, written with the
-- partition's offset). A window is final, written once to metric_windows,
-- when every partition's stored watermark (processor_offsets.clock) has
-- passed it; metric_combine is the row a finalizing transaction locks, so
-- two instances never finalize the same window, and how far windows are
-- final.
CREATE TABLE metric_parts (
    processor TEXT NOT NULL,
    end_ms BIGINT NOT NULL,
    grp TEXT NOT NULL,
    start_ms BIGINT NOT NULL,
    partition INTEGER NOT NULL,
    part TEXT NOT NULL,
    events BIGINT NOT NULL,
    PRIMARY KEY (processor, end_ms, grp, start_ms, partition)
);

CREATE TABLE metric_combine (
    processor TEXT PRIMARY KEY,
    final_until BIGINT NOT NULL
);

-- The closed windows the relay has still to put on user_metrics, oldest
-- first; and a group's state across partitions, for its open windows.
CREATE INDEX metric_windows_unpublished ON metric_windows (closed_at) WHERE published = 0;
CREATE INDEX metric_state_group ON metric_state (processor, grp);

-- Events that came after a window they belong to closed, written with the
-- batch that found them and relayed to user_events_late; one a metric
-- version and message id, so a retry of a late event is reported once.
-- Kept as long as the stored events (events-retention-days).
CREATE TABLE metric_late (
    processor TEXT NOT NULL,
    message_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    version BIGINT NOT NULL,
    grp TEXT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms BIGINT NOT NULL,
    late_by_ms BIGINT NOT NULL,
    event TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (processor, message_id)
);
CREATE INDEX metric_late_unpublished ON metric_late (recorded_at) WHERE published = 0;

-- The latest value of each computed trait (a per-user metric with a trait
-- name) of each user, written with the batch that changed it; `seq` counts
-- its changes, and the relay puts each new value on user_events (message
-- id from processor, group and seq) for the profile processor to apply in
-- order with the user's events.
CREATE TABLE computed_traits (
    processor TEXT NOT NULL,
    grp TEXT NOT NULL,
    name TEXT NOT NULL,
    metric TEXT NOT NULL,
    version BIGINT NOT NULL,
    value TEXT NOT NULL,
    at BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (processor, grp)
);
CREATE INDEX computed_traits_unpublished ON computed_traits (at) WHERE published = 0;

-- A GDPR deletion removes a user's windows and computed traits of every
-- version of a per-user metric.
CREATE INDEX metric_windows_group ON metric_windows (metric, grp);
CREATE INDEX computed_traits_group ON computed_traits (metric, grp);
