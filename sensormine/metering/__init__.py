"""Usage metering: the usage ledger and its crash-safe flusher, tenant events, calendar helpers.
Billing and AI-call metering build on it."""
