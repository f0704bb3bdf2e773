-- Fencing tokens come from one sequence, so a lock row idle for long can be deleted: when the
-- lock is taken again its token is still above every token it ever had. The sequence starts
-- above every token issued so far; grants take greatest(next value, the row's token + 1), which
-- stays correct while instances that count per row run alongside.
CREATE SEQUENCE pgstore.fencing_tokens;
SELECT setval('pgstore.fencing_tokens',
              coalesce((SELECT max(fencing_token) FROM pgstore.locks), 0) + 1, false);
