-- Migration 16 (PostgreSQL only): lz4 for window and partial-match states.
--
-- A key's open windows of a metric, and its partial matches of a rule,
-- are one JSON value, often several kilobytes, rewritten by every batch
-- that touches the key. PostgreSQL compresses a value over about 2 kB,
-- with pglz unless told otherwise, which was most of what a rule state's
-- write cost (docs/benchmarks.md); lz4 does it in a fraction of the CPU.
-- Values stored before keep their compression until rewritten. A server
-- without lz4 (built without it, or older than PostgreSQL 14) keeps pglz.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE rule_state ALTER COLUMN state SET COMPRESSION lz4';
    EXECUTE 'ALTER TABLE metric_state ALTER COLUMN state SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    RAISE NOTICE 'this PostgreSQL cannot compress with lz4; window and rule states stay with pglz';
END
$$;
