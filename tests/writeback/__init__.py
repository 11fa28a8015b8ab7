"""Tests of the write-back outbox (integration/writeback)."""
