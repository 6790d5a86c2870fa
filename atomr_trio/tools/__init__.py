"""Tool calling: `calls` (the shapes), `parsers` (calls in model text), `prompting` (prompt, constraints, checks)."""
