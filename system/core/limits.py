"""The limits that bound state, in one place (numpy-free, so Settings takes its defaults here)."""

from __future__ import annotations

# A retried event id counts once when it comes back within this many hours (MABREC_DEDUP_WINDOW_HOURS).
DEDUP_WINDOW_HOURS = 24.0
# Event ids kept per user for that: past it, the oldest are forgotten before their window ends.
DEDUP_MAX_IDS = 100_000
# Users a shard keeps in memory (MABREC_RESIDENT_USERS): past it, those idle longest leave,
# once checkpointed, and come back from PostgreSQL when next needed.
RESIDENT_USERS = 250_000
# Shard actors a deployment may ask for (MABREC_SHARDS, `mabrec scale`, the admin API); the
# 1,024 slots would allow more, but each shard is a process.
MAX_SHARDS = 256
