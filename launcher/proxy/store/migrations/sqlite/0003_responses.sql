-- The Responses API's stored responses and the Conversations API's conversations (issue
-- 22). Both are sessions: a response is one turn of the session that holds its chain (or
-- its conversation), a conversation is a session with its metadata. They go with their
-- session (its delete, its expiry: ON DELETE CASCADE) and count in its stored bytes.
CREATE TABLE responses (
    owner   TEXT NOT NULL,
    id      TEXT NOT NULL,
    session TEXT NOT NULL,
    turn    INTEGER NOT NULL,
    created REAL NOT NULL,
    body    TEXT NOT NULL,
    input   TEXT NOT NULL,
    PRIMARY KEY (owner, id),
    FOREIGN KEY (owner, session) REFERENCES sessions (owner, id) ON DELETE CASCADE
);
CREATE INDEX responses_session ON responses (owner, session, turn);
CREATE TABLE conversations (
    owner    TEXT NOT NULL,
    id       TEXT NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (owner, id),
    FOREIGN KEY (owner, id) REFERENCES sessions (owner, id) ON DELETE CASCADE
);
