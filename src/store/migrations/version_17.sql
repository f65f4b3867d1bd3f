-- Migration 17 (both dialects): no index of metric states by group.
--
-- Every state write kept it up to date, and its one reader, a group's
-- open windows (`GET /v1/metrics/{name}/values`), finds the group's
-- states through the primary key in each partition with an offset.
DROP INDEX metric_state_group;
