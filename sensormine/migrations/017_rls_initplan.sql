-- Row-level security evaluated once per query, not once per row (docs/decisions.md, "Policies read the
-- session's tenants once per query").
-- A policy `tenant_id = ANY (sensormine_visible_tenants())` called the function for every row a scan
-- read: on a 24-hour aggregate of 1 M hot rows that was about 300 of 725 ms. Wrapped in a scalar
-- subquery, the planner evaluates it once (an InitPlan) and compares each row with the result.
-- Every policy that calls the session functions is rewritten here; later policies are written this way
-- (tests/integration/test_least_privilege.py checks it).
DO $$
DECLARE
    p record;
    using_expr text;
    check_expr text;
BEGIN
    FOR p IN
        SELECT schemaname, tablename, policyname, qual, with_check FROM pg_policies
        WHERE schemaname = 'public'
          AND (qual ~ 'sensormine_(visible_tenants|is_platform)\(\)'
               OR with_check ~ 'sensormine_(visible_tenants|is_platform)\(\)')
    LOOP
        using_expr := replace(replace(p.qual, 'sensormine_visible_tenants()', '((SELECT sensormine_visible_tenants()))::text[]'),
                              'sensormine_is_platform()', '(SELECT sensormine_is_platform())');
        check_expr := replace(replace(p.with_check, 'sensormine_visible_tenants()', '((SELECT sensormine_visible_tenants()))::text[]'),
                              'sensormine_is_platform()', '(SELECT sensormine_is_platform())');
        IF using_expr IS NOT NULL THEN
            EXECUTE format('ALTER POLICY %I ON %I.%I USING (%s)', p.policyname, p.schemaname, p.tablename, using_expr);
        END IF;
        IF check_expr IS NOT NULL THEN
            EXECUTE format('ALTER POLICY %I ON %I.%I WITH CHECK (%s)', p.policyname, p.schemaname, p.tablename, check_expr);
        END IF;
    END LOOP;
END $$;
