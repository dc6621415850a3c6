"""Helpers for the tests that need real servers and a real browser."""
