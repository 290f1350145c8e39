-- Erasing a user (DELETE /api/users/{uxid}, `mabrec user erase`). The user's state leaves
-- user_state and popularity at once; then every event-log message that names them is deleted
-- from the stream (JetStream overwrites it) and kept here as a redacted copy, the same message
-- without their events, so `mabrec verify` still recounts everyone else exactly. An erasure
-- holds the user's id only while its log scrub is pending.
CREATE TABLE erasures (
    id           bigserial PRIMARY KEY,
    requested_at timestamptz NOT NULL DEFAULT now(),
    through_seq  bigint NOT NULL,          -- the user's events through this sequence are erased
    pending_uxid text,                     -- whom the scrub looks for; NULL once it is done
    messages     integer NOT NULL DEFAULT 0,  -- event-log messages redacted
    dead_letters integer NOT NULL DEFAULT 0,  -- dead-lettered messages deleted
    done_at      timestamptz,
    CHECK ((pending_uxid IS NULL) = (done_at IS NOT NULL))
);

CREATE TABLE redacted_messages (
    seq     bigint PRIMARY KEY,   -- its stream sequence (deleted from the stream)
    second  integer NOT NULL,     -- when JetStream stored it: the de-duplication clock
    data    bytea NOT NULL,       -- its events but the erased users', each with its event id
    erasure bigint NOT NULL REFERENCES erasures (id)
);
