"""The gRPC base that both sides of every splitserve wire share: the server kit (one port,
health, reflection, drain-then-stop), channel options and addresses, and the codecs for what
crosses more than one service (sampling parameters, streamed token pieces, tensor specs).

It imports protos and grpc only, so the router (no torch), the KV store and the services can all
stand on it."""
