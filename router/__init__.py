"""The router: OpenAI-compatible HTTP and gRPC ingress, tenants, and request placement."""
