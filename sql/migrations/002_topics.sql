-- 002_topics: the partition count each topic's keys are hashed with. The relay pins a topic's
-- count the first time it publishes to it and keeps hashing with it when partitions are added
-- later, so no key moves to another partition (and no consumer sees a key's events out of order)
-- until an operator repins the topic with `outbox-relay partitions repin`.

CREATE TABLE IF NOT EXISTS {{.Topics}} (
    topic      text        PRIMARY KEY,
    partitions integer     NOT NULL CHECK (partitions > 0),
    pinned_at  timestamptz NOT NULL DEFAULT now()
);
