"""OpenAI's Responses API (`/v1/responses`) on llmup's sessions.

A stored response is a turn of a session: a chain of `previous_response_id`s is one session
(its id is the chain's first response id), so continuing from the latest response of a chain
continues that session on the slot worker's sequence that holds its KV cache, and continuing
from an older one starts a new session as a branch of the history up to it. Each request is
translated into a chat request and runs through the same pipeline as chat
(`launcher.proxy.chat.generate`): the same checks, queue, per-key limits, session lock,
context fitting, crash memory and metrics.

`models` holds the request models, `items` the translation between Responses items and chat
messages, `objects` the Response object, `events` the stream's events, `serving` the work,
`router` the routes.
"""
