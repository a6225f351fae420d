"""The write path every ingest front door shares: sinks that hand readings to Kafka or straight to the hot
store, validating against device schemas and dead-lettering what is rejected."""
