"""chatq producer: the client library backend services use to submit chats."""

from producer.calls import ChatResult
from producer.client import ChatClient
from producer.errors import (
    ChatqError,
    ProtocolError,
    QueueFull,
    RedisUnavailable,
    RequestFailed,
    ResultTimeout,
)
from producer.settings import ClientSettings
from producer.sync_client import SyncChatClient

__all__ = [
    "ChatClient",
    "ChatResult",
    "ChatqError",
    "ClientSettings",
    "ProtocolError",
    "QueueFull",
    "RedisUnavailable",
    "RequestFailed",
    "ResultTimeout",
    "SyncChatClient",
]
