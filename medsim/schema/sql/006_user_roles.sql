-- Every medsim user's own role exists (roles are cluster-wide: a restore into a fresh
-- server brings the users' rows, not their roles; medsim db restore runs this file after
-- pg_restore) and inherits the reader's privileges without being able to SET ROLE
-- medsim_reader. A non-superuser owner is given SET on each, which the service needs to
-- act as the user.
DO $$
DECLARE
    u record;
    v_super boolean := (SELECT rolsuper FROM pg_roles WHERE rolname = current_user);
BEGIN
    FOR u IN SELECT role_name FROM medsim.users LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = u.role_name) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', u.role_name);
        END IF;
        EXECUTE format('GRANT medsim_reader TO %I WITH INHERIT TRUE, SET FALSE', u.role_name);
        IF NOT v_super THEN
            EXECUTE format('GRANT %I TO current_user WITH INHERIT FALSE, SET TRUE', u.role_name);
        END IF;
    END LOOP;
    IF NOT v_super THEN
        GRANT medsim_nobody TO current_user WITH INHERIT FALSE, SET TRUE;
    END IF;
END
$$;
