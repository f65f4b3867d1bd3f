-- Migration 19 (SQLite): the claims of message ids kept in their key's
-- B-tree alone.
--
-- A rowid table with a text primary key is two B-trees, the rows by
-- rowid and an index of the key beside them, so every claim inserted
-- into both. A claim's row is small (an id, a log position, a time):
-- stored in its key's B-tree (`WITHOUT ROWID`) it is one insert.
CREATE TABLE metric_seen_by_id (
    processor TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at BIGINT NOT NULL,
    partition INTEGER,
    record_offset BIGINT,
    PRIMARY KEY (processor, message_id)
) WITHOUT ROWID;
INSERT INTO metric_seen_by_id (processor, message_id, received_at, partition, record_offset)
SELECT processor, message_id, received_at, partition, record_offset FROM metric_seen;
DROP TABLE metric_seen;
ALTER TABLE metric_seen_by_id RENAME TO metric_seen;
