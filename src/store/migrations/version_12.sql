-- Migration 12 (both dialects): pattern rules' partial matches and the
-- alerts they make.
--
-- A rule version's state is stored per key (the partial matches and the
-- events waiting for the watermark), beside its offsets and clocks in
-- processor_offsets (processor `rule:{name}:{version}`), in the
-- transaction of each batch. An alert's id is the rule, version, key and
-- first event's message id, so a batch tried again writes it once.
CREATE TABLE rule_state (
    processor TEXT NOT NULL,
    partition INTEGER NOT NULL,
    rule_key TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (processor, partition, rule_key)
);

CREATE TABLE alerts (
    alert_id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    version BIGINT NOT NULL,
    rule_key TEXT NOT NULL,
    -- The alert as `user_alerts` and the API show it (JSON).
    body TEXT NOT NULL,
    at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX alerts_by_rule ON alerts (rule, at);
CREATE INDEX alerts_by_key ON alerts (rule_key, at);
CREATE INDEX alerts_unpublished ON alerts (created_at) WHERE published = 0;
