-- The roles medsim's grants name. Roles are cluster-wide (not in a database, nor in its
-- pg_dump), so this runs at head like every file here, and also before a restore into a
-- fresh server (medsim db restore): the dump's GRANTs then find their role.

-- Read-only access for analysts and for medsim serve's searches (grants: 004_search.sql).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'medsim_reader') THEN
        CREATE ROLE medsim_reader NOLOGIN;
    END IF;
END
$$;
-- A query that runs away is cancelled; it applies to sessions that log in as (or SET ROLE
-- to) medsim_reader. Per-person logins set their own: ALTER ROLE alice SET statement_timeout.
ALTER ROLE medsim_reader SET statement_timeout = '30s';

-- What medsim serve's search connections are between requests when it authenticates:
-- a role with no privileges at all, so a code path that forgot to act as a user reads
-- nothing instead of everything (users' own roles: medsim/access.py, sql/005_access.sql).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'medsim_nobody') THEN
        CREATE ROLE medsim_nobody NOLOGIN;
    END IF;
END
$$;
