"""Tenant-scoped full-text search on OpenSearch (the twins/objects/search issue); empty until it lands."""
