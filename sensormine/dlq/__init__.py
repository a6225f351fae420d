"""The dead-letter queue: listing rejected messages (Kafka or the dead_letters table) and replaying them."""
