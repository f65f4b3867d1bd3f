-- Migration 9 (both dialects): a metric version's counted message ids
-- with the log position of each id's first record.
--
-- A runner claims the ids of a batch's events before it counts them
-- (an insert that keeps the first claim): an event counts when the first
-- record of its id is that event's own record, so a client's retry (a
-- later record with the same id) is counted once, and a batch tried again
-- after a failed commit finds its own claims. Rows from before this
-- migration have no position: their ids count as another record's.
ALTER TABLE metric_seen ADD COLUMN partition INTEGER;
ALTER TABLE metric_seen ADD COLUMN record_offset BIGINT;
