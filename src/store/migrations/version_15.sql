-- Migration 15 (both dialects): the archive's manifest. A row is stored
-- before its object is uploaded (the range a retry after a crash must
-- close at, so it rewrites the same object) and marked uploaded after.
CREATE TABLE archive_objects (
    destination TEXT NOT NULL,
    partition INTEGER NOT NULL,
    first_offset BIGINT NOT NULL,
    last_offset BIGINT NOT NULL,
    object_key TEXT NOT NULL,
    records BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    first_at BIGINT NOT NULL,
    uploaded_at BIGINT,
    PRIMARY KEY (destination, partition, first_offset)
);
-- The newest upload and the uploads under way, for a destination's status.
CREATE INDEX archive_objects_uploaded ON archive_objects (destination, uploaded_at);
