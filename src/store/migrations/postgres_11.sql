-- Migration 11 (PostgreSQL only): cheaper rewrites of metric state.
--
-- Every batch rewrites the state of each group it touched and the
-- computed trait of each user whose value changed. Free room in their
-- pages lets PostgreSQL update a row in place (a HOT update: no new
-- index entry, the old version pruned without a vacuum), where a full
-- page puts the new version elsewhere and leaves a dead one behind in
-- the table and in every index, which the next conflict check of the
-- same key reads again. Existing pages keep their fill until rewritten.
ALTER TABLE metric_state SET (fillfactor = 50);
ALTER TABLE computed_traits SET (fillfactor = 50);
