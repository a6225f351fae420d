"""Device schemas: compatibility rules, versioned storage, metric ranges and fast payload validation."""
