-- Migration 10 (both dialects): one claim a message id for every metric.
--
-- Which record of a message id is its first is a fact of the log, not of
-- a metric version, so the metric runner claims each id once, under the
-- name `metrics`, for every version it runs. The claims each version made
-- before carry over, so a client's retry that straddles the upgrade is
-- still counted once; the per-version claims are read no more.
INSERT INTO metric_seen (processor, message_id, received_at, partition, record_offset)
SELECT 'metrics', message_id, MIN(received_at), MIN(partition), MIN(record_offset)
FROM metric_seen
WHERE processor LIKE 'metric:%' AND partition IS NOT NULL
GROUP BY message_id
ON CONFLICT DO NOTHING;

DELETE FROM metric_seen WHERE processor LIKE 'metric:%';
