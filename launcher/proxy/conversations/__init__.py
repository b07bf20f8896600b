"""OpenAI's Conversations API (`/v1/conversations`) on llmup's sessions.

A conversation is a session with metadata: the same store, the same KV slot on the slot
worker, listed by `GET /v1/sessions` and on the web page, continuable with `X-Session-Id`
on `/v1/chat/completions` (its id is the session's) and by `conversation` on
`/v1/responses`. Its items are the session's messages (`responses.items`).
"""
