"""The OpenAI-compatible HTTP server: `app` assembles the Gateway from its routes (`openai_routes`,
`admin_routes`), `admission` routes a generation request and holds its ticket, `sse` and `chunks`
write streams, `openai_format` shapes responses, `errors` the error answers, `protocol` and
`bodies` the request bodies, `auth` who may call what, `state` what handlers reach,
`request_board` the live requests shown in /admin/tree, `serve` the serve loop."""
