"""Clients of external systems: PostgreSQL (connections, migrations, day partitions, the hot-store
writer and its binary COPY encoder, latest-value notifications), Kafka, MQTT and the broker's dynamic
security, Redis. The only place that builds connection strings; domains use these modules' public names."""
