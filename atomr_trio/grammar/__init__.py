"""Structured outputs: what a request's text must follow (`spec`), compiled once per model and
spec off the Trio loop (`compiler`), and followed token by token by each sample (`matcher`)."""
