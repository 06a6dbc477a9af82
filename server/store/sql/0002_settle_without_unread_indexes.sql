-- Settlement writes every gift as a movement, a gift and four ledger rows. Each secondary
-- index on a random key (user, host, room, account) adds a B-tree insert on a page of its own
-- per gift, and a batch dirties more of those pages the larger the ledger grows. With these
-- five, a settlement batch of 1,000 gifts took 12 ms (SQLite, CPU) on an empty ledger and 60 ms
-- at 270,000 gifts, 27 ms rising to 36 ms at 300,000 on PostgreSQL (wall); without them, 9-11 ms
-- and 17-18 ms, flat. No query reads them. An index comes back with the query that needs it
-- (a host's session summary, a user's statement).
DROP INDEX IF EXISTS movements_user;
DROP INDEX IF EXISTS gifts_host;
DROP INDEX IF EXISTS gifts_room;
DROP INDEX IF EXISTS gifts_sender;
DROP INDEX IF EXISTS ledger_account;
