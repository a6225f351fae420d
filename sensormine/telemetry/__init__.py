"""Readings in: payload and batch parsing, Kafka envelopes, message validation, and the sinks that hand
readings to Kafka or straight to the hot store (dead-lettering what is rejected)."""
