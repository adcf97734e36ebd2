"""Channel options every splitserve server and client use, and address formatting."""

from __future__ import annotations

import grpc

# KV blocks travel in chunks of a few MiB; both ends allow a little more than one chunk a message.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def bracket(host: str) -> str:
    """An address's host part: IPv6 literals go in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_port(host: str, port: int) -> str:
    return f"{bracket(host)}:{port}"


def insecure_channel(address: str) -> grpc.aio.Channel:
    """An asyncio channel with splitserve's message limits. Make it inside the event loop that
    will use it: a grpc.aio channel belongs to one loop."""
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
