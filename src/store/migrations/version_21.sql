-- Migration 21 (both dialects): the live metrics and rules share one
-- runner, which claims a message id once for all of them, under
-- `metrics`, where the metrics claimed theirs. The rules' claims join
-- them; an id both claimed keeps the metrics' claim, which names the same
-- record (which record of an id is its first is a fact of the log). A
-- snapshot of format 4 or older, restored, is brought along the same way.
INSERT INTO metric_seen (processor, message_id, received_at, partition, record_offset)
SELECT 'metrics', message_id, received_at, partition, record_offset FROM metric_seen
WHERE processor = 'rules'
ON CONFLICT DO NOTHING;
DELETE FROM metric_seen WHERE processor = 'rules';
