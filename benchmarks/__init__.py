"""Side-by-side benchmarks against TRL and transformers; see benchmarks/README.md."""
