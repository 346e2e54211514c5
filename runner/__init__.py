"""The built-in turn runner (contract: "Turns: the built-in runner").

`runner.chunks` is its pure part: Chat Completions stream chunks -> contract
events, and the request body the runner sends (and hashes).
"""
