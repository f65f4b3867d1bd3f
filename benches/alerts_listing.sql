-- The alerts listing without a rule or key (`GET /v1/alerts`), as the
-- store reads it, on a million alerts of ten rules in a scratch table:
-- first as one statement (a scan and sort of every alert), then as the
-- store reads it: the rules found from the index by rule in one
-- statement, each rule's newest 50 from it, merged by the caller
-- (src/store/rules.rs).
-- The table is dropped at the end.
--
--   runuser -u postgres -- psql -q -o /dev/null -f benches/alerts_listing.sql | grep Time
--
-- The times: the single statement thrice, the query that wrote those
-- three, then three listings of 11 statements each (the rules, then
-- 10 pages), then the query that wrote those.
SET client_min_messages = warning;
DROP TABLE IF EXISTS alerts_listing;
CREATE TABLE alerts_listing (
    alert_id TEXT COLLATE "C" PRIMARY KEY, rule TEXT NOT NULL, version BIGINT NOT NULL,
    rule_key TEXT NOT NULL, body TEXT NOT NULL, at BIGINT NOT NULL, created_at BIGINT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX ON alerts_listing (rule, at);
CREATE INDEX ON alerts_listing (rule_key, at);
CREATE INDEX ON alerts_listing (created_at) WHERE published = 0;
INSERT INTO alerts_listing
SELECT 'r' || (i % 10) || ':1:user-' || (i % 10000) || ':bench-' || i, 'r' || (i % 10), 1,
       'user-' || (i % 10000), repeat('x', 300), 1733378400000 + i, 1, 1
FROM generate_series(1, 1000000) i;
VACUUM ANALYZE alerts_listing;
PREPARE page(text, text, bigint, bigint, text, bigint) AS
    SELECT alert_id, rule, version, rule_key, at, body FROM alerts_listing
    WHERE ($1::text IS NULL OR rule = $1) AND ($2::text IS NULL OR rule_key = $2)
      AND ($3::bigint IS NULL OR at >= $3)
      AND ($4::bigint IS NULL OR at < $4 OR (at = $4 AND alert_id < $5))
    ORDER BY at DESC, alert_id DESC LIMIT $6;
PREPARE rules(bigint) AS
    WITH RECURSIVE rules(rule) AS (
        SELECT (SELECT rule FROM alerts_listing ORDER BY rule LIMIT 1)
        UNION ALL
        SELECT (SELECT a.rule FROM alerts_listing a WHERE a.rule > r.rule ORDER BY a.rule LIMIT 1)
        FROM rules r WHERE r.rule IS NOT NULL)
    SELECT rule FROM rules WHERE rule IS NOT NULL LIMIT $1;
\timing on
SELECT 'EXECUTE page(NULL, NULL, NULL, NULL, '''', 50)' FROM generate_series(1, 3) \gexec
SELECT statement FROM generate_series(1, 3) AS listing, LATERAL (
    SELECT 0 AS n, 'EXECUTE rules(65)'
    UNION ALL
    SELECT 1 + i, format('EXECUTE page(%L, NULL, NULL, NULL, '''', 50)', 'r' || i)
    FROM generate_series(0, 9) AS i
) AS statements(n, statement)
ORDER BY listing, n \gexec
\timing off
DROP TABLE alerts_listing;
