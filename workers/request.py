"""One request while this worker holds it: from intake, through the engine, to its final write."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from producer.protocol import Envelope
from workers.detokenizer import IncrementalDetokenizer
from workers.lanes import Entry


@dataclass(eq=False)
class InflightRequest:
    env: Envelope
    entry: Entry
    prompt_ids: list[int]
    cost_tokens: int  # admission cost: prompt + expected output
    backlog_cost_tokens: int  # what enqueue added to the model's backlog (FINALIZE removes it)
    level: int  # engine priority, 0..2 (lane level promoted by aging)
    detok: IncrementalDetokenizer
    pulled_s: float = field(default_factory=time.time)  # Unix seconds
    submitted_s: float | None = None  # handed to the engine
    first_token_s: float | None = None
    num_cached_tokens: int = 0
    chunk_index: int = 0
    finished: bool = False  # a final result has been decided (later outputs are ignored)
    # More entries that carry the same request id (a producer retry): acked with the final.
    duplicates: list[Entry] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.env.id

    @property
    def started(self) -> bool:
        """The engine has produced at least one token (its prefill ran)."""
        return self.first_token_s is not None
