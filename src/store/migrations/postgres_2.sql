-- Migration 2 (PostgreSQL only): cheaper writes for the processing hot path.
--
-- Events are written in about the order they were received, so a BRIN index
-- (a few pages of min/max per block range) serves the retention purge
-- (`received_at < cutoff`) as well as a B-tree that had to take a new entry
-- for every event.
DROP INDEX events_received_at;
CREATE INDEX events_received_at ON events USING brin (received_at);

-- A profile is rewritten by every batch that touches it; free room in its
-- page lets PostgreSQL update it in place (a HOT update: no new index entry,
-- and the old version is pruned without a vacuum).
ALTER TABLE profiles SET (fillfactor = 50);
