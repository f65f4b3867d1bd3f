-- Migration 5 (both dialects): window state and closed windows of the
-- metrics processors.
--
-- A metric version's runner stores, per partition, each group's open
-- window state (metric_state) and each partition's watermark beside its
-- offset (processor_offsets.clock), in the transaction that moves the
-- offset: a restart resumes exactly where the last commit left. Closed
-- windows are written once (metric_windows); `published` marks those the
-- relay has put on user_metrics.
ALTER TABLE processor_offsets ADD COLUMN clock BIGINT;

CREATE TABLE metric_state (
    processor TEXT NOT NULL,
    partition INTEGER NOT NULL,
    grp TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (processor, partition, grp)
);

CREATE TABLE metric_windows (
    metric TEXT NOT NULL,
    version BIGINT NOT NULL,
    grp TEXT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms BIGINT NOT NULL,
    value TEXT NOT NULL,
    events BIGINT NOT NULL,
    closed_at BIGINT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (metric, version, grp, start_ms, end_ms)
);

-- The message ids each metric version has counted, so a client's retry
-- of an event is counted once; kept as long as the stored events
-- (events-retention-days).
CREATE TABLE metric_seen (
    processor TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (processor, message_id)
);
