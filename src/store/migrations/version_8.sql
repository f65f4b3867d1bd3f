-- Migration 8 (both dialects): a user's open windows moving between
-- partitions on an alias or identify merge.
--
-- The linking event is in the user's partition; the linked id's windows
-- are in its own. The user's partition writes a request (state NULL) for
-- the linked id's partition; once that partition's clock has passed the
-- linking event's time (`at`, plus the bound on how late a record stamped
-- earlier can be appended), so the linked id's earlier events are in,
-- its runner takes the group's state out of its engine and writes it back
-- here as a handover (state set) for the user's partition, whose runner
-- merges it. Each step is in the transaction that moves the acting
-- partition's offsets, so a state moves once, whatever crashes.
CREATE TABLE metric_merges (
    processor TEXT NOT NULL,
    -- The partition whose runner acts on the row next.
    partition INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    grp TEXT NOT NULL,
    into_grp TEXT NOT NULL,
    into_partition INTEGER NOT NULL,
    at BIGINT NOT NULL,
    state TEXT,
    PRIMARY KEY (processor, partition, message_id, grp)
);
