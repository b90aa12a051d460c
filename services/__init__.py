"""The deployable processes of llm-mesh: thin I/O shells over scheduler/ and kvstore/."""

__version__ = "0.1.0"
