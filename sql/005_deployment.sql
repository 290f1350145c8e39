-- The deployment's desired state, which the supervisor reconciles (as Ray Serve's controller
-- does): `mabrec scale` and the admin API write it, the supervisor moves slots until the slot
-- map matches it. `routing_paused` holds the event router still while slots change hands, and
-- outlives a router (or supervisor) that restarts in the middle of a move.
CREATE TABLE deployment (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    desired_shards   smallint CHECK (desired_shards > 0),
    restart_requested bigint NOT NULL DEFAULT 0,  -- bumped by `mabrec restart --rolling`
    restart_done     bigint NOT NULL DEFAULT 0,
    routing_paused   boolean NOT NULL DEFAULT false,
    map_generation   bigint NOT NULL DEFAULT 0    -- bumped whenever slots change hands
);
INSERT INTO deployment DEFAULT VALUES;
