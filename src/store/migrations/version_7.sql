-- Migration 7 (both dialects): when each stored group state has something
-- to close next.
--
-- A metric runner keeps open window state within a memory budget: a group
-- it evicts is held only here, and `due` (the limit, the watermark less
-- the lateness, at which its next window closes) tells the runner when to
-- read it back. States written before this migration have no `due` and
-- are read back at the first watermark move.
ALTER TABLE metric_state ADD COLUMN due BIGINT;
CREATE INDEX metric_state_due ON metric_state (processor, partition, due);
