"""`llm-mesh bench …`: benchmarks that print numbers and write JSON."""
