-- Migration 20: a pattern rule's stored partial matches name a stretch
-- of consecutive events one step took as [first, step, count] (see
-- `spans` in src/patterns/mod.rs). This version reads states in either
-- form; the versions before it cannot read the new one. With this
-- migration applied they refuse the store at start-up, naming it, rather
-- than fail on the first such state a rule reads.
SELECT 1;
