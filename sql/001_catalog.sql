-- The movie catalog. Facet values (genres, directors, cast, ...) keep their ids across reloads:
-- learned state refers to them by id.
CREATE TABLE movies (
    id            integer PRIMARY KEY CHECK (id > 0),
    name          text NOT NULL,
    description   text NOT NULL DEFAULT '',
    rating        double precision,
    votes         bigint,
    duration      integer,
    duration_unit text NOT NULL DEFAULT 'min',
    link          text,
    imdb_id       text
);

CREATE TABLE facets (
    id   serial PRIMARY KEY,
    kind text NOT NULL,
    name text NOT NULL,
    UNIQUE (kind, name)
);

CREATE TABLE movie_facets (
    movie_id integer NOT NULL REFERENCES movies (id) ON DELETE CASCADE,
    facet_id integer NOT NULL REFERENCES facets (id),
    position smallint NOT NULL,
    PRIMARY KEY (movie_id, facet_id)
);
CREATE INDEX movie_facets_facet ON movie_facets (facet_id);

-- One row: bumped by every load, watched by the running system to reload.
CREATE TABLE catalog_meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL,
    source    text NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now()
);
