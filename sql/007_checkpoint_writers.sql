-- The last checkpoint each shard's process committed. A checkpoint whose COMMIT went unanswered
-- (a lost connection, a cancelled task) may or may not have landed: user rows and the covered
-- sequence are idempotent, but its popularity is added. The shard's next checkpoint reads this row
-- to add that popularity only if it did not land (system/db/state_store.py, StateStore.save).
CREATE TABLE checkpoint_writers (
    shard    integer PRIMARY KEY,
    instance uuid NOT NULL,    -- the shard's process: a restart reads popularity afresh
    cut      bigint NOT NULL   -- the number of its last committed checkpoint
);
