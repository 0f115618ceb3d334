"""chatq producer: the client library backend services use to submit chats."""

from producer.calls import ChatResult
from producer.client import ChatClient
from producer.contract.cancel import CancelOutcome
from producer.contract.envelope import RequestId
from producer.contract.logprobs import TokenLogprob, TopLogprob
from producer.contract.results import Choice, Chunk
from producer.errors import (
    ChatqError,
    ModelNotServed,
    ProtocolError,
    QueueFull,
    RedisUnavailable,
    RequestFailed,
    ResultTimeout,
)
from producer.retry import RetryPolicy
from producer.settings import ClientSettings
from producer.sync_client import SyncChatClient

__all__ = [
    "CancelOutcome",
    "ChatClient",
    "ChatResult",
    "ChatqError",
    "Choice",
    "Chunk",
    "ClientSettings",
    "ModelNotServed",
    "ProtocolError",
    "QueueFull",
    "RedisUnavailable",
    "RequestFailed",
    "RequestId",
    "ResultTimeout",
    "RetryPolicy",
    "SyncChatClient",
    "TokenLogprob",
    "TopLogprob",
]
