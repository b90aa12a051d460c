"""Moved to services/engines/engine_proc.py (`bench pd` uses it too); kept for the P/D tests."""

from services.engines.engine_proc import REPO, PDEngineProc  # noqa: F401

if __name__ == "__main__":
    import asyncio
    import sys

    from services.engines.engine_proc import _serve

    asyncio.run(_serve(sys.argv[1], int(sys.argv[2])))
