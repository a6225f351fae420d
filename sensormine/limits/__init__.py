"""Per-plan limits: token buckets and counters (Redis or memory), the API-call and device quotas, call leases."""
