-- Tenant events that tell the tenant's administrators something (quota warnings and refusals, billing
-- notices) are mailed to them by the API's notice mailer, an outbox drain: each event is mailed once,
-- retried a few times when the mail server fails, and never lost when it is down.
ALTER TABLE tenant_events
    ADD COLUMN mailed_at     timestamptz,
    ADD COLUMN mail_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN mail_error    text;
-- What happened before this migration is history, not news: it is not mailed.
UPDATE tenant_events SET mailed_at = at;
CREATE INDEX tenant_events_unmailed ON tenant_events (id) WHERE mailed_at IS NULL;
GRANT UPDATE (data, mailed_at, mail_attempts, mail_error) ON tenant_events TO sensormine_metering;
