"""Helpers for the fault-injection tests (tests/test_fault_*.py): a redis-server of the
test's own, a TCP proxy that injects latency, a uvicorn launcher, raw ASGI and raw HTTP
clients, and the worker processes."""
