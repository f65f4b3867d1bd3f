-- Migration 14 (both dialects): what an at-least-once processor (a
-- destination) finished above its stored position, as a JSON list of
-- [from, to) offset ranges, so a restart redoes only the unfinished work.
ALTER TABLE processor_offsets ADD COLUMN done_above TEXT;
