"""Tenants and sub-tenants: the registry of tenants, plans, and the cascading configuration."""
