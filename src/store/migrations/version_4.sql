-- Migration 4 (both dialects): definitions (metrics now; rules,
-- destinations and sources later), every version kept.
--
-- A change is a new row: version 1, 2, ... per kind and name, a deletion a
-- version without a body. Rows are only ever added, so the row count of a
-- kind tells an instance cheaply whether anything changed since it last
-- looked, and a definition's history stays readable.
CREATE TABLE definitions (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    body TEXT,
    changed_at BIGINT NOT NULL,
    PRIMARY KEY (kind, name, version)
);
