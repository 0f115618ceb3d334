"""chatq producer: the client library backend services use to submit chats."""

from producer.errors import ChatqError, ProtocolError, QueueFull, RequestFailed, ResultTimeout
from producer.settings import ClientSettings

__all__ = [
    "ChatqError",
    "ClientSettings",
    "ProtocolError",
    "QueueFull",
    "RequestFailed",
    "ResultTimeout",
]
