-- Sessions, their messages and what is kept of each turn (the schema of llmup's first
-- releases, which created it with CREATE TABLE IF NOT EXISTS: files made by them are
-- adopted as version 1).
CREATE TABLE IF NOT EXISTS sessions (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    system  TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turns   INTEGER NOT NULL DEFAULT 0,
    epoch   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (owner, id)
);
CREATE INDEX IF NOT EXISTS sessions_updated ON sessions (updated);
CREATE TABLE IF NOT EXISTS messages (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    turn    INTEGER NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (owner, id, seq),
    FOREIGN KEY (owner, id) REFERENCES sessions (owner, id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS turns (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    turn    INTEGER NOT NULL,
    tokens  INTEGER,
    request TEXT,
    reply   TEXT,
    PRIMARY KEY (owner, id, turn),
    FOREIGN KEY (owner, id) REFERENCES sessions (owner, id) ON DELETE CASCADE
);
