-- Migration 22 (SQLite): message-id claims as sorted runs.
--
-- A claim as a row of its own cost SQLite about a microsecond, whatever
-- its key; a run holds a batch's claims in order of id, prefix-compressed
-- in blocks of about 4 KiB, with a filter that tells most absent ids
-- without a block read (src/store/claim_runs.rs). The rows of
-- metric_seen are turned into runs at the claims' next write.
CREATE TABLE claim_runs (
    processor TEXT NOT NULL,
    run BIGINT NOT NULL,
    claims BIGINT NOT NULL,
    newest_received BIGINT NOT NULL,
    oldest_received BIGINT NOT NULL,
    -- A split-block Bloom filter of the run's ids.
    filter BLOB NOT NULL,
    -- The first id of each block, each after a varint of its length.
    firsts BLOB NOT NULL,
    PRIMARY KEY (processor, run)
) WITHOUT ROWID;
CREATE TABLE claim_blocks (
    processor TEXT NOT NULL,
    run BIGINT NOT NULL,
    block BIGINT NOT NULL,
    claims BLOB NOT NULL,
    PRIMARY KEY (processor, run, block)
) WITHOUT ROWID;
-- Moved by every write that changes the runs: a connection that keeps
-- them in memory reads them again when another moved it.
CREATE TABLE claim_epoch (epoch BIGINT NOT NULL);
INSERT INTO claim_epoch (epoch) VALUES (0);
