-- The consumer side of the example: the inbox that makes processing idempotent, and the welcome
-- messages the SendWelcome use case records instead of mailing them.
--
-- A consumer inserts (consumer, event_id) in the same transaction as the effects of processing
-- the event; a redelivered event finds its row and is skipped. Rows older than the brokers'
-- retention can be deleted: DELETE FROM inbox WHERE processed_at < now() - interval '7 days'.
CREATE TABLE IF NOT EXISTS {{.Table "inbox"}} (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE INDEX IF NOT EXISTS inbox_processed_at ON {{.Table "inbox"}} (processed_at);

-- One row per welcome message sent. user_id is deliberately not unique: that each user gets one
-- message is the inbox's promise, and the tests count rows to check it.
CREATE TABLE IF NOT EXISTS {{.Table "welcome_messages"}} (
    id       bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id  uuid        NOT NULL,
    email    text        NOT NULL,
    event_id uuid        NOT NULL,
    sent_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS welcome_messages_user_id ON {{.Table "welcome_messages"}} (user_id);
