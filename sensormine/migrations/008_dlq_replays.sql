-- Dead letters that were replayed (`sensormine dlq replay`, POST /api/dlq/replay): one row per
-- dead letter whose readings were re-submitted and confirmed durable, so a second replay skips it.
-- A dead letter is either a message of the Kafka DLQ topic (topic, partition, offset) or a row
-- of the dead_letters table (used without Kafka). A replay that fails again records nothing: the
-- dead letter stays pending, to be replayed after the next fix.
CREATE TABLE dlq_replays (
    id               bigserial PRIMARY KEY,
    dlq_topic        text,
    kafka_partition  integer,
    kafka_offset     bigint,
    dead_letter_id   bigint REFERENCES dead_letters(id) ON DELETE CASCADE,
    tenant_id        text NOT NULL,
    device_id        text NOT NULL,
    source           text NOT NULL,          -- the source of the readings re-submitted (mqtt, http, ...)
    readings         integer NOT NULL CHECK (readings > 0),
    schema_version   integer,                -- the device schema version they were validated against
    replayed_by      text NOT NULL,          -- cli, or api:<tenant>
    replayed_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (
        (dlq_topic IS NOT NULL AND kafka_partition IS NOT NULL AND kafka_offset IS NOT NULL AND dead_letter_id IS NULL)
        OR (dlq_topic IS NULL AND kafka_partition IS NULL AND kafka_offset IS NULL AND dead_letter_id IS NOT NULL)
    ),
    UNIQUE (dlq_topic, kafka_partition, kafka_offset),
    UNIQUE (dead_letter_id)
);

CREATE INDEX dead_letters_tenant ON dead_letters (tenant_id, id);
