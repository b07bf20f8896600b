-- Each session's stored bytes: its messages', system message's and kept replies' JSON as
-- stored (UTF-8), for the per-key storage limit; every commit keeps it up to date. Sessions
-- stored before get theirs counted here. (A file made by the last unversioned llmup, whose
-- store added this column itself, is adopted at this version: see migrations.upgrade.)
ALTER TABLE sessions ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE sessions SET bytes = COALESCE(length(CAST(system AS BLOB)), 0)
    + (SELECT COALESCE(SUM(length(CAST(m.message AS BLOB))), 0) FROM messages m
       WHERE m.owner = sessions.owner AND m.id = sessions.id)
    + (SELECT COALESCE(SUM(length(CAST(t.reply AS BLOB))), 0) FROM turns t
       WHERE t.owner = sessions.owner AND t.id = sessions.id);
