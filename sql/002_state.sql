-- Bandit state. Users hash to 1024 slots; `slots` maps each slot to the shard that owns it and
-- records the event-stream sequence its checkpoint covers: every event of the slot's users with a
-- sequence <= covered_seq is in user_state, every later one is replayed from the stream.
CREATE TABLE slots (
    slot        smallint PRIMARY KEY CHECK (slot >= 0),
    shard       smallint NOT NULL CHECK (shard >= 0),
    covered_seq bigint NOT NULL DEFAULT 0
);

-- Per user: int32 rows, see system/core/userstate.py (3 wide here: key, clicks, seen; migration
-- 003 adds a fourth); and the hashes of the user's most recent event ids, for de-duplication
-- across restarts.
CREATE TABLE user_state (
    uxid       text PRIMARY KEY,
    slot       smallint NOT NULL,
    counts     bytea NOT NULL,
    recent_ids bytea NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX user_state_slot ON user_state (slot);

-- Identifies the event stream the checkpoints refer to, so a reset stream is noticed.
CREATE TABLE event_log (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    stream    text NOT NULL,
    created   timestamptz NOT NULL
);
