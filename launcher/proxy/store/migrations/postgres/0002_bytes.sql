-- Each session's stored bytes: its messages', system message's and kept replies' JSON as
-- stored (UTF-8), for the per-key storage limit; every commit keeps it up to date. Sessions
-- stored before get theirs counted here (in the migration's transaction, under its lock).
ALTER TABLE sessions ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
UPDATE sessions SET bytes = COALESCE(octet_length(system), 0)
    + (SELECT COALESCE(SUM(octet_length(m.message)), 0) FROM messages m
       WHERE m.owner = sessions.owner AND m.id = sessions.id)
    + (SELECT COALESCE(SUM(octet_length(t.reply)), 0) FROM turns t
       WHERE t.owner = sessions.owner AND t.id = sessions.id);
