-- 005: the append-only triggers fire in every session, including those with
-- session_replication_role = replica (bulk loaders, logical replication
-- tools), where ordinary triggers are skipped.
ALTER TABLE events ENABLE ALWAYS TRIGGER events_append_only;
ALTER TABLE events ENABLE ALWAYS TRIGGER events_no_truncate;
