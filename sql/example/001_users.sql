-- The example service's own table, used by the CreateUser use case, the demo and the tests.
CREATE TABLE IF NOT EXISTS {{.Users}} (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL,
    email      text        NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
