"""Stand-ins for the outside world, for tests, benchmarks and walk-throughs: LLM servers on 127.0.0.1."""
