"""The routing core: pure logic, no I/O. Services feed it worker state and ask it
where a request should go."""
