-- The storage quota's position of a tenant (docs/quotas.md, "Storage"): its quota tenant, the
-- effective plan and the bytes its quota group stores (hot store + lake), from each member's newest
-- daily snapshot of the week up to `d`. Security definer because the writers that refuse readings
-- beyond the plan (the ingest role) cannot read the snapshots, and a sub-tenant's session cannot see
-- its parent's, yet shares its parent's quota. The limit is the plan's (Python, sensormine.tenancy.plans).
CREATE POLICY tenant_usage_snapshots_definer ON tenant_usage_snapshots FOR SELECT TO sensormine_owner USING (true);

CREATE FUNCTION sensormine_storage_quota_usage(t text, d date)
RETURNS TABLE (quota_tenant text, plan text, stored_bytes bigint, measured_on date)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT q.qt, sensormine_effective_plan(q.qt), coalesce(sum(s.hot_bytes + s.lake_bytes), 0)::bigint, max(s.day)
    FROM (SELECT sensormine_quota_tenant(t) AS qt) q
    LEFT JOIN LATERAL (
        SELECT DISTINCT ON (u.tenant_id) u.hot_bytes, u.lake_bytes, u.day FROM tenant_usage_snapshots u
        WHERE u.tenant_id IN (SELECT sensormine_quota_group(q.qt)) AND u.day <= d AND u.day > d - 7
        ORDER BY u.tenant_id, u.day DESC
    ) s ON true
    WHERE q.qt IS NOT NULL
    GROUP BY q.qt
$$;
REVOKE ALL ON FUNCTION sensormine_storage_quota_usage(text, date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION sensormine_storage_quota_usage(text, date)
    TO sensormine_ingest, sensormine_metering, sensormine_auth;
