"""The Ray Serve application: OpenAI ingress, KV-aware request router, config, CLI, metrics."""
