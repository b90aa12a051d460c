"""The routing core: pure logic, no I/O. Services feed it worker state and KV events and ask it
where a request should go.

- block_hash: vLLM-exact chained block hashes (the index's keys).
- index: BlockIndex, (model, block hash) → holders per Tier; longest-prefix match for all workers.
- framework: WorkerState (+ Ticket bookkeeping), RequestView, Decision, the Filter/Scorer/Picker/
  Policy protocols and ProfilePolicy (filters → weighted scorers → picker).
- filters, scorers/ (README.md: formulas), pickers, speculative: the plugins.
- profile: load_profile(YAML or dict); profiles/: ours (default.yaml) and the peers.
- policies: policy_by_name(ours | random | round-robin | least-loaded | llm-d | dynamo | sglang | mooncake).
- routing: the pre-framework LeastLoaded API, kept for the services until they are rewired.
"""
