"""Judging trained LoRAs: generating with them (`generate`), later the epoch review."""
