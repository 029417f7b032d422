-- The broker: queues, exchanges and their bindings, consumers, messages and
-- dead letters.
CREATE TABLE {s}.queues (
    name            text PRIMARY KEY,
    durable         boolean NOT NULL DEFAULT true,
    auto_delete     boolean NOT NULL DEFAULT false,
    expires_ms      bigint,
    message_ttl_ms  bigint,
    last_used_at    timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {s}.exchanges (
    name         text PRIMARY KEY,
    type         text NOT NULL CHECK (type IN ('direct', 'topic', 'fanout')),
    durable      boolean NOT NULL DEFAULT true,
    auto_delete  boolean NOT NULL DEFAULT false
);
CREATE TABLE {s}.bindings (
    exchange     text NOT NULL,
    routing_key  text NOT NULL,
    queue        text NOT NULL,
    type         text NOT NULL CHECK (type IN ('direct', 'topic', 'fanout')),
    pattern      text,
    PRIMARY KEY (exchange, routing_key, queue)
);
CREATE INDEX bindings_queue ON {s}.bindings (queue);
CREATE TABLE {s}.consumers (
    id            serial PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    queues        text[] NOT NULL DEFAULT '{}',
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE {s}.messages (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue        text NOT NULL,
    rank         smallint NOT NULL DEFAULT 0,
    payload      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    consumer_id  integer,
    leased_at    timestamptz,
    redelivered  boolean NOT NULL DEFAULT false
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX messages_ready ON {s}.messages (queue, rank DESC, id) WHERE consumer_id IS NULL;
CREATE INDEX messages_leased ON {s}.messages (consumer_id) WHERE consumer_id IS NOT NULL;
CREATE INDEX messages_expiring ON {s}.messages (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE {s}.dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue       text NOT NULL,
    payload     text NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
