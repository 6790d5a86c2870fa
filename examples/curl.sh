#!/usr/bin/env bash
# The raw HTTP API with curl. Start a server first (make serve); BASE and MODEL override.
set -euo pipefail
BASE=${BASE:-http://127.0.0.1:8000}
MODEL=${MODEL:-SmolLM2-135M-Instruct}
AUTH=()
[ -n "${API_KEY:-}" ] && AUTH=(-H "Authorization: Bearer $API_KEY")

curl -sf "$BASE/health"; echo
curl -sf "${AUTH[@]}" "$BASE/v1/models"; echo

# chat, one JSON answer
curl -sf "${AUTH[@]}" "$BASE/v1/chat/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"temperature\": 0, \"max_tokens\": 32,
  \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France? Answer in one sentence.\"}]}"
echo

# text completion, streamed over SSE (-N: print events as they come)
curl -sfN "${AUTH[@]}" "$BASE/v1/completions" -H 'Content-Type: application/json' -d "{
  \"model\": \"$MODEL\", \"prompt\": \"The sky is\", \"max_tokens\": 8, \"temperature\": 0, \"stream\": true}"

# tokenizer
curl -sf "${AUTH[@]}" "$BASE/tokenize" -H 'Content-Type: application/json' -d "{\"model\": \"$MODEL\", \"prompt\": \"Hello world\"}"
echo
