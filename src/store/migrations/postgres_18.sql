-- Migration 18 (PostgreSQL only): the later tables' keys compare byte by
-- byte too.
--
-- Migration 1's ids compare byte by byte (COLLATE "C", as SQLite's
-- BINARY does), so both stores order and page alike. The tables added
-- since took the database's collation: under a language's collation
-- their lists and pages came in another order than SQLite's, and under
-- any but "C" every comparison in their indexes called the C library's
-- strcoll through the locale machinery. Names, groups, keys and ids are
-- opaque. A new collation rebuilds a column's indexes, not its table.
ALTER TABLE definitions
    ALTER COLUMN kind TYPE TEXT COLLATE "C",
    ALTER COLUMN name TYPE TEXT COLLATE "C";
ALTER TABLE metric_state
    ALTER COLUMN processor TYPE TEXT COLLATE "C",
    ALTER COLUMN grp TYPE TEXT COLLATE "C";
ALTER TABLE metric_windows
    ALTER COLUMN metric TYPE TEXT COLLATE "C",
    ALTER COLUMN grp TYPE TEXT COLLATE "C";
ALTER TABLE metric_seen
    ALTER COLUMN processor TYPE TEXT COLLATE "C",
    ALTER COLUMN message_id TYPE TEXT COLLATE "C";
ALTER TABLE metric_parts
    ALTER COLUMN processor TYPE TEXT COLLATE "C",
    ALTER COLUMN grp TYPE TEXT COLLATE "C";
ALTER TABLE metric_combine
    ALTER COLUMN processor TYPE TEXT COLLATE "C";
ALTER TABLE metric_late
    ALTER COLUMN processor TYPE TEXT COLLATE "C",
    ALTER COLUMN message_id TYPE TEXT COLLATE "C";
ALTER TABLE computed_traits
    ALTER COLUMN processor TYPE TEXT COLLATE "C",
    ALTER COLUMN grp TYPE TEXT COLLATE "C",
    ALTER COLUMN metric TYPE TEXT COLLATE "C";
ALTER TABLE metric_merges
    ALTER COLUMN processor TYPE TEXT COLLATE "C",
    ALTER COLUMN message_id TYPE TEXT COLLATE "C",
    ALTER COLUMN grp TYPE TEXT COLLATE "C";
ALTER TABLE rule_state
    ALTER COLUMN processor TYPE TEXT COLLATE "C",
    ALTER COLUMN rule_key TYPE TEXT COLLATE "C";
ALTER TABLE alerts
    ALTER COLUMN alert_id TYPE TEXT COLLATE "C",
    ALTER COLUMN rule TYPE TEXT COLLATE "C",
    ALTER COLUMN rule_key TYPE TEXT COLLATE "C";
ALTER TABLE delivery_attempts
    ALTER COLUMN attempt_id TYPE TEXT COLLATE "C",
    ALTER COLUMN destination TYPE TEXT COLLATE "C";
ALTER TABLE delivery_failures
    ALTER COLUMN destination TYPE TEXT COLLATE "C",
    ALTER COLUMN delivery_id TYPE TEXT COLLATE "C";
ALTER TABLE destination_states
    ALTER COLUMN destination TYPE TEXT COLLATE "C";
ALTER TABLE destination_replays
    ALTER COLUMN replay_id TYPE TEXT COLLATE "C",
    ALTER COLUMN destination TYPE TEXT COLLATE "C";
ALTER TABLE archive_objects
    ALTER COLUMN destination TYPE TEXT COLLATE "C";
