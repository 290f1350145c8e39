-- user_state.counts rows grow a fourth int32, `since`: the entity's impressions after the user's
-- last click on it (system/core/userstate.py). Existing rows get 0: their clicks count as recent.
UPDATE user_state
SET counts = coalesce(
    (SELECT string_agg(substring(counts FROM i * 12 + 1 FOR 12) || '\x00000000'::bytea, ''::bytea ORDER BY i)
     FROM generate_series(0, length(counts) / 12 - 1) AS i),
    ''::bytea);
