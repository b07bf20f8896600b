-- Sessions, their messages and what is kept of each turn. Messages and replies are kept as
-- the exact JSON text the proxy wrote (TEXT, not jsonb, which would reorder their keys).
CREATE TABLE sessions (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    system  TEXT,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    turns   INTEGER NOT NULL DEFAULT 0,
    epoch   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (owner, id)
);
CREATE INDEX sessions_updated ON sessions (updated);
CREATE TABLE messages (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    turn    INTEGER NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (owner, id, seq),
    FOREIGN KEY (owner, id) REFERENCES sessions (owner, id) ON DELETE CASCADE
);
CREATE TABLE turns (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    turn    INTEGER NOT NULL,
    tokens  INTEGER,
    request TEXT,
    reply   TEXT,
    PRIMARY KEY (owner, id, turn),
    FOREIGN KEY (owner, id) REFERENCES sessions (owner, id) ON DELETE CASCADE
);
