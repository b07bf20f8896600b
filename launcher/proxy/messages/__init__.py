"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`), for Claude Code
and the Anthropic SDKs.

Each request is translated into a chat request and runs through the chat pipeline
(`launcher.proxy.chat.generate`): the same checks, queue, per-key limits, sessions
(`X-Session-Id`), context fitting, crash memory and metrics. `models` holds the request
models, `convert` the translation both ways, `events` the stream, `errors` Anthropic's error
shape for every answer under `/v1/messages` (the guard's 401 included), `serving` the work,
`router` the routes.
"""
