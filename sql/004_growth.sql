-- State that survives growth (system/core/shard_state.py, system/db/state_store.py).

-- One writer per slot: a shard takes a slot by bumping its epoch, in the statement that reads
-- the slot's checkpoint position; a checkpoint whose epoch is no longer the slot's is refused.
ALTER TABLE slots ADD COLUMN epoch bigint NOT NULL DEFAULT 0;

-- Global popularity: per movie (key > 0) and facet value (minus its id), the clicks and
-- impressions of all users. Every checkpoint adds what it applied, in its transaction, so it
-- always equals the sum of the user_state rows (`mabrec verify` checks it); shards then need
-- not hold every user in memory to know it.
CREATE TABLE popularity (
    key         integer PRIMARY KEY,
    clicks      bigint NOT NULL DEFAULT 0,
    impressions bigint NOT NULL DEFAULT 0
);

INSERT INTO popularity (key, clicks, impressions)
SELECT key, sum(clicks), sum(impressions)
FROM (
    SELECT
        -- counts rows are 4 little-endian int32s: key, clicks, impressions, since_click. (In
        -- PostgreSQL `|` and `<<` bind alike, left to right: every shift is parenthesized.)
        (get_byte(counts, o) + (get_byte(counts, o + 1) << 8) + (get_byte(counts, o + 2) << 16)
            + (get_byte(counts, o + 3)::bigint << 24)
            - CASE WHEN get_byte(counts, o + 3) >= 128 THEN 4294967296 ELSE 0 END)::integer AS key,
        get_byte(counts, o + 4) + (get_byte(counts, o + 5) << 8) + (get_byte(counts, o + 6) << 16)
            + (get_byte(counts, o + 7)::bigint << 24) AS clicks,
        get_byte(counts, o + 8) + (get_byte(counts, o + 9) << 8) + (get_byte(counts, o + 10) << 16)
            + (get_byte(counts, o + 11)::bigint << 24) AS impressions
    FROM user_state, generate_series(0, length(counts) - 16, 16) AS o
) AS rows
GROUP BY key;

-- De-duplication by time: recent_ids was the hashes (uint64) of a user's last 32 event ids;
-- it becomes those hashes followed by the stream second each was seen at (uint32), the pair
-- kept for the de-duplication window. The ids kept so far count as seen now.
UPDATE user_state
SET recent_ids = recent_ids || (
    SELECT coalesce(string_agg(stamp, ''::bytea), ''::bytea)
    FROM generate_series(1, length(recent_ids) / 8),
         (SELECT set_byte(set_byte(set_byte(set_byte('\x00000000'::bytea,
                 0, (now_s & 255)::int), 1, ((now_s >> 8) & 255)::int),
                 2, ((now_s >> 16) & 255)::int), 3, ((now_s >> 24) & 255)::int) AS stamp
          FROM (SELECT extract(epoch FROM now())::bigint AS now_s) AS n) AS s
)
WHERE length(recent_ids) > 0;
