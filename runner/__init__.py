"""The built-in turn runner (contract: "Turns: the built-in runner").

- `runner.chunks`: pure: Chat Completions stream chunks -> contract events, and
  the request body the runner sends (and hashes).
- `runner.upstream`: the HTTP client (httpx: the exact bytes hashed are sent),
  retries with backoff before the first chunk.
- `runner.recorder`: a turn's events batched into group-commit appends.
- `runner.runner`: the turn loop, cancel, the queue, leases (`Runner`).
- `runner.fake_upstream`: a scripted OpenAI-compatible upstream for trying and testing.

Its SQL lives in store/turns.py, its endpoints in api/routes/turns.py.
"""
