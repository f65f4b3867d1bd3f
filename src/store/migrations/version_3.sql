-- Migration 3 (both dialects): a version for every write of a profile.
--
-- Each write of a profile's state gives its row a version no other write
-- has. The profile processor keeps the states it wrote in memory and uses
-- one only while the row still has its version; rows written before this
-- migration (and rows restored from a snapshot) have version 0, which no
-- write uses, so they are read from the table.
ALTER TABLE profiles ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
