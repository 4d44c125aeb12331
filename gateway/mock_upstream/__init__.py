"""An offline stand-in for OpenAI's and DigitalOcean's image APIs (generations; OpenAI's edits too).

It owns being a faithful upstream for tests, demos and benchmarks: the same validation and error
shapes (OpenAI `{"error": {...}}`, DigitalOcean `{"id", "message", "request_id"}`), real images
that decode with Pillow at the requested size and format, `usage` from the published token tables,
and SSE streams shaped like OpenAI's: for n images, per image its partials then its completed event
carrying that image's own `usage` (the prompt's text tokens on the first image's only), so a
stream's usages add up to the JSON body's `usage` for the same request. Every request is recorded
under `RECEIVED` in the app.

Routes: `POST /v1/images/generations`, `GET /v1/models`, and in the OpenAI flavour
`POST /v1/images/edits` and `/v1/images/variations` (multipart; see `edits.py`); anything else is a
404 JSON error. A multipart request is recorded with its text fields in `body` and its file parts,
byte for byte, in `files`.

Test-only request headers (values "1"/"true" switch a flag on):
- `x-mock-latency-ms: X`        this request's latency instead of `MockOptions.latency_ms`
- `x-mock-status: N`            answer status N (400..599) with the flavor's error body
- `x-mock-usage-first: 1`       put `usage` before `data` in a JSON body (default: after)
- `x-mock-fail-after-events: K` abort the connection after K stream events (or K images of a
                                JSON body), with no terminating chunk; K >= total: no failure
- `x-mock-sse-crlf: 1`          CRLF line endings in the stream
- `x-mock-sse-comments: 1`      a `: keep-alive` comment block before every stream event
- `x-mock-sse-error-after-events: K`  after K stream events, an `error` event (FACTS §4's shape)
                                instead of the rest; K >= total: no error
- `x-mock-sse-done: 1`          end the stream with `data: [DONE]` (after its error event, if any)
`MockOptions.sse_error_after_events` and `.sse_done` set the last two for every stream.

Recorded headers are a `dict[str, str]` with lower-case keys that also answers lookups in any case.
The record keeps at least the 10,000 most recent requests (older ones go once it reaches 20,000).
"""

from gateway.mock_upstream.app import create_mock_app, run_mock_upstream
from gateway.mock_upstream.options import RECEIVED, MockOptions, ReceivedRequest

__all__ = ["RECEIVED", "MockOptions", "ReceivedRequest", "create_mock_app", "run_mock_upstream"]
