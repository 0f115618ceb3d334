"""chatq workers: intake from Redis, the engine process, aggregation of results."""
