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
