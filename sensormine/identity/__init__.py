"""Who acts: users and passwords, roles and permissions, tokens, API keys, resolved identities, the audit log."""
