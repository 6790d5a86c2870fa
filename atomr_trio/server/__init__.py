"""The OpenAI-compatible HTTP server: request bodies, the Gateway app, and the serve loop."""
